//! MQTT load run of `edgellm serve` (a benchmark, not a test): a mosquitto of its own (with
//! persistence, on a free loopback port), the daemon on the real model, and N requests from C
//! MQTT 5 clients (persistent sessions, each keeping a few in flight), with the broker
//! restarted R times during the run. Prints one JSON object and exits 1 unless every request
//! was answered exactly once, counting by id across the broker's redeliveries (the same reply
//! delivered twice, same `seq`, is a redelivery; two different terminal replies for one id
//! would be a request run twice).
//!
//!   scripts/mqtt-load.sh [--requests 500] [--clients 8] [--restarts 2] [--model M.gguf]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, Incoming, MqttOptions};
use serde_json::{json, Value};

struct Args {
    requests: usize,
    clients: usize,
    restarts: usize,
    window: usize,
    max_tokens: usize,
    model: PathBuf,
    binary: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        requests: 500,
        clients: 8,
        restarts: 2,
        window: 4,
        max_tokens: 8,
        model: PathBuf::from("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf"),
        binary: PathBuf::from("target/release/edgellm"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k}: a value is missing"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{k} = {s:?}: {e}"));
        match k.as_str() {
            "--requests" => a.requests = num(v()?)?,
            "--clients" => a.clients = num(v()?)?.max(1),
            "--restarts" => a.restarts = num(v()?)?,
            "--window" => a.window = num(v()?)?.max(1),
            "--max-tokens" => a.max_tokens = num(v()?)?,
            "--model" => a.model = PathBuf::from(v()?),
            "--binary" => a.binary = PathBuf::from(v()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Broker {
    child: Child,
    conf: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Broker {
    fn start(dir: &Path) -> Result<Broker, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\npersistence true\npersistence_location {}/\nlistener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 10000\n",
                dir.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = spawn_broker(&conf, dir)?;
        let b = Broker {
            child,
            conf,
            dir: dir.to_path_buf(),
            port,
        };
        b.wait_listening()?;
        Ok(b)
    }

    fn wait_listening(&self) -> Result<(), String> {
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > until {
                return Err(format!("mosquitto did not listen on {}", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGTERM (mosquitto saves its sessions), a second down, started again on the same port.
    fn restart(&mut self) -> Result<(), String> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_secs(1));
        self.child = spawn_broker(&self.conf, &self.dir)?;
        self.wait_listening()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_broker(conf: &Path, dir: &Path) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("broker.log"))
        .map_err(|e| e.to_string())?;
    Command::new("mosquitto")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("mosquitto (scripts/setup.sh --test installs it): {e}"))
}

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn status(&self) -> Option<Value> {
        let mut s = UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"{\"op\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }
}

fn start_daemon(a: &Args, dir: &Path, broker: &Broker) -> Result<Daemon, String> {
    let socket = dir.join("edgellm.sock");
    let config = dir.join("edgellm.toml");
    let model = std::fs::canonicalize(&a.model)
        .map_err(|e| format!("--model {}: {e}", a.model.display()))?;
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\nn_ctx = 512\n[socket]\npath = {:?}\n[mqtt]\nenabled = true\nurl = \"mqtt://127.0.0.1:{}\"\nnode = \"load\"\nreconnect_min_ms = 100\nreconnect_max_ms = 400\n",
            model.display().to_string(),
            socket.display().to_string(),
            broker.port
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("daemon.log")).map_err(|e| e.to_string())?;
    let child = Command::new(&a.binary)
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", a.binary.display()))?;
    let mut d = Daemon { child, socket };
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(st)) = d.child.try_wait() {
            return Err(format!(
                "the daemon exited ({st}); its log is {}",
                dir.join("daemon.log").display()
            ));
        }
        if let Some(s) = d.status() {
            if s["mqtt"]["connected"] == true {
                return Ok(d);
            }
        }
        if Instant::now() > until {
            return Err(format!(
                "the daemon did not connect to the broker; its log is {}",
                dir.join("daemon.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Terminal replies by id, as distinct (type, seq) pairs, and how many deliveries.
    terminal: HashMap<String, (HashSet<(String, u64)>, usize)>,
    sent: usize,
    stray: usize,
}

/// A client: sends its `ids`, keeping `window` in flight, and reads replies until every id has
/// a terminal one and `quiet` has passed without a message (or `limit`).
fn client(
    port: u16,
    k: usize,
    ids: Vec<String>,
    a: (usize, usize),
    answered: Arc<AtomicUsize>,
) -> Seen {
    let (window, max_tokens) = a;
    let topic = format!("edgellm/replies/load/c{k}");
    let mut o = MqttOptions::new(format!("load-{k}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(600));
    let (c, mut conn) = Client::new(o, 1024);
    let (tx, rx) = mpsc::channel::<Option<Value>>();
    let sub = c.clone();
    let t = topic.clone();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            let sent = match ev {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = sub.try_subscribe(t.clone(), QoS::AtLeastOnce);
                    Ok(())
                }
                Ok(Event::Incoming(Incoming::SubAck(_))) => tx.send(None),
                Ok(Event::Incoming(Incoming::Publish(p))) => tx.send(Some(
                    serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                )),
                Ok(_) => Ok(()),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    Ok(())
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    let mut seen = Seen::default();
    // The first subscription ack.
    while let Ok(m) = rx.recv_timeout(Duration::from_secs(10)) {
        if m.is_none() {
            break;
        }
    }
    let publish = |id: &str| {
        let req = json!({"id": id, "prompt": "Say hello", "max_tokens": max_tokens,
                         "temperature": 0, "stream": true});
        let props = PublishProperties {
            response_topic: Some(topic.clone()),
            ..Default::default()
        };
        let _ = c.publish_with_properties(
            "edgellm/load/request",
            QoS::AtLeastOnce,
            false,
            req.to_string(),
            props,
        );
    };
    let mut next = 0;
    let limit = Instant::now() + Duration::from_secs(600);
    let quiet = Duration::from_secs(3);
    let mut last = Instant::now();
    loop {
        let done = seen.terminal.len();
        while next < ids.len() && next < done + window {
            publish(&ids[next]);
            next += 1;
            seen.sent += 1;
        }
        let all = done == ids.len();
        if (all && last.elapsed() >= quiet) || Instant::now() > limit {
            return seen;
        }
        let m = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(m)) => m,
            Ok(None) | Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return seen,
        };
        last = Instant::now();
        let ty = m["type"].as_str().unwrap_or("").to_string();
        if ty == "token" {
            continue;
        }
        let Some(id) = m["id"].as_str().filter(|i| ids.iter().any(|x| x == i)) else {
            seen.stray += 1;
            continue;
        };
        let e = seen.terminal.entry(id.to_string()).or_default();
        if e.1 == 0 {
            answered.fetch_add(1, Ordering::Relaxed);
        }
        e.0.insert((ty, m["seq"].as_u64().unwrap_or(0)));
        e.1 += 1;
    }
}

fn run(a: Args) -> Result<bool, String> {
    let dir = std::env::temp_dir().join(format!("edgellm-mqtt-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut broker = Broker::start(&dir)?;
    let daemon = start_daemon(&a, &dir, &broker)?;
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..a.clients)
        .map(|k| {
            let ids: Vec<String> = (0..a.requests)
                .filter(|i| i % a.clients == k)
                .map(|i| format!("r{i}"))
                .collect();
            let (port, answered) = (broker.port, answered.clone());
            let shape = (a.window, a.max_tokens);
            std::thread::spawn(move || client(port, k, ids, shape, answered))
        })
        .collect();
    // The broker restarted at even fractions of the run, by answers.
    let mut restarts = Vec::new();
    for r in 1..=a.restarts {
        let at = a.requests * r / (a.restarts + 1);
        let until = Instant::now() + Duration::from_secs(600);
        while answered.load(Ordering::Relaxed) < at && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let t = Instant::now();
        broker.restart()?;
        restarts.push(json!({
            "after_answers": answered.load(Ordering::Relaxed),
            "at_s": (t - started).as_secs_f64(),
        }));
    }
    let mut seen = Seen::default();
    for t in threads {
        let s = t.join().map_err(|_| "a client panicked".to_string())?;
        seen.sent += s.sent;
        seen.stray += s.stray;
        seen.terminal.extend(s.terminal);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let status = daemon.status().unwrap_or(Value::Null);
    let once = seen.terminal.values().filter(|(d, _)| d.len() == 1).count();
    let twice = seen.terminal.values().filter(|(d, _)| d.len() > 1).count();
    let redelivered: usize = seen.terminal.values().map(|(d, n)| n - d.len()).sum();
    let mut types: HashMap<String, usize> = HashMap::new();
    for (d, _) in seen.terminal.values() {
        for (t, _) in d {
            *types.entry(t.clone()).or_default() += 1;
        }
    }
    let missing = a.requests - seen.terminal.len();
    let _ = nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGTERM);
    let ok = once == a.requests && twice == 0 && missing == 0;
    let report = json!({
        "requests": a.requests,
        "clients": a.clients,
        "window_per_client": a.window,
        "max_tokens": a.max_tokens,
        "broker_restarts": restarts,
        "elapsed_s": (elapsed * 10.0).round() / 10.0,
        "answered_exactly_once": once,
        "answered_twice": twice,
        "missing": missing,
        "redelivered_replies": redelivered,
        "stray_replies": seen.stray,
        "terminal_types": types,
        "daemon_mqtt": status["mqtt"],
        "daemon_requests": status["requests"],
        "ok": ok,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    if ok && std::env::var_os("KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs kept in {}", dir.display());
    }
    Ok(ok)
}

fn main() {
    let code = match parse_args().and_then(run) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("mqtt_load: {e}");
            2
        }
    };
    std::process::exit(code);
}
