//! A daemon under test: `edgellm serve` started with its own config, socket and notify socket,
//! and line-oriented clients.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use edgellm_testkit::{synth_model, SynthSpec};

use crate::common::temp_dir;

/// A synthetic model file in `dir`.
pub fn synth_file(dir: &Path, spec: &SynthSpec) -> PathBuf {
    let p = dir.join("synth.gguf");
    std::fs::write(&p, synth_model(spec)).expect("write synthetic model");
    p
}

pub struct TestDaemon {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    notify: UnixDatagram,
    /// Every notify message received so far, in order.
    pub notes: Vec<String>,
}

impl TestDaemon {
    /// Starts `edgellm serve` on `model` with `extra` appended to its config, and waits for
    /// READY=1 on the notify socket.
    pub fn start(name: &str, model: &Path, extra: &str, env: &[(&str, &str)]) -> TestDaemon {
        let dir = temp_dir(name);
        let d = TestDaemon::spawn(&dir, model, extra, env);
        d.wait_ready()
    }

    /// Starts the daemon in `dir` without waiting.
    pub fn spawn(dir: &Path, model: &Path, extra: &str, env: &[(&str, &str)]) -> TestDaemon {
        let socket = dir.join("edgellm.sock");
        let config = dir.join("edgellm.toml");
        let text = format!(
            "[model]\npath = {:?}\nn_ctx = 256\n\n[socket]\npath = {:?}\n{extra}\n",
            model.display().to_string(),
            socket.display().to_string()
        );
        let text = merge_sections(&text);
        std::fs::write(&config, text).expect("write config");
        let notify_path = dir.join("notify");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let log = std::fs::File::create(dir.join("log")).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgellm"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_USEC")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start edgellm serve");
        TestDaemon {
            child,
            dir: dir.to_path_buf(),
            socket,
            notify,
            notes: Vec::new(),
        }
    }

    pub fn wait_ready(mut self) -> TestDaemon {
        let until = Instant::now() + Duration::from_secs(120);
        while !self.notes.iter().any(|n| n.starts_with("READY=1")) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("daemon exited before READY ({status}): {}", self.log());
            }
            assert!(Instant::now() < until, "no READY=1: {}", self.log());
            self.poll_notes();
        }
        self
    }

    /// Reads whatever notify messages have arrived (waits up to 100 ms for the first).
    pub fn poll_notes(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            self.notes
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            self.notify.set_nonblocking(true).expect("nonblocking");
        }
        self.notify.set_nonblocking(false).expect("blocking");
    }

    /// Waits until a notify message satisfying `f` arrives after the first `from` messages.
    pub fn wait_note(&mut self, from: usize, within: Duration, f: impl Fn(&str) -> bool) -> bool {
        let until = Instant::now() + within;
        loop {
            if self.notes.iter().skip(from).any(|n| f(n)) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            self.poll_notes();
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The daemon's resident set size now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        let pid = self.child.id();
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    pub fn status(&self) -> Value {
        let mut c = self.connect();
        c.send(&json!({"op": "status"}));
        let v = c.recv();
        assert_eq!(v["type"], "status", "{v}");
        v
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal the daemon");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < until,
                "daemon did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits for the exit.
    pub fn wait_exit_after(&mut self, sig: nix::sys::signal::Signal) -> ExitStatus {
        self.signal(sig);
        self.wait_exit(Duration::from_secs(30))
    }

    /// SIGTERM and wait; the exit status.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let s = self.wait_exit(Duration::from_secs(30));
        (s, self.log())
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Joins repeated `[section]` headers, a later `key = value` replacing an earlier one, so tests
/// can override keys of the base config.
fn merge_sections(text: &str) -> String {
    let mut sections: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    let mut current = 0;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            current = match sections.iter().position(|(h, _)| h == t) {
                Some(i) => i,
                None => {
                    sections.push((t.to_string(), Vec::new()));
                    sections.len() - 1
                }
            };
        } else if !t.is_empty() {
            let key = t.split('=').next().unwrap_or("").trim();
            let lines = &mut sections[current].1;
            lines.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
            lines.push(line.to_string());
        }
    }
    let mut out = String::new();
    for (h, lines) in sections {
        if !h.is_empty() {
            out.push_str(&h);
            out.push('\n');
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// Relays stdin to a Unix socket and the socket to stdout, connected as whoever runs it
/// (`setpriv` sets another uid); stdin's end shuts the socket's sending side. A read error
/// (ECONNRESET) is printed as a line `RELAY-ERROR <what>`.
const RELAY: &str = r#"
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def up():
    for line in sys.stdin.buffer:
        try:
            s.sendall(line)
        except OSError:
            break
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
out = sys.stdout.buffer
while True:
    try:
        b = s.recv(65536)
    except OSError as e:
        out.write(("RELAY-ERROR %s\n" % e).encode()); out.flush(); break
    if not b:
        break
    out.write(b); out.flush()
out.flush()
os._exit(0)
"#;

/// One connection, a JSON value per line: a socket of this process, or one another uid opened
/// (through `setpriv` and a relay).
pub struct Client {
    reader: BufReader<Box<dyn std::io::Read + Send>>,
    writer: Option<Box<dyn Write + Send>>,
    socket: Option<UnixStream>,
    relay: Option<Child>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let s =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Client {
            reader: BufReader::new(Box::new(s.try_clone().expect("clone"))),
            writer: Some(Box::new(s.try_clone().expect("clone"))),
            socket: Some(s),
            relay: None,
        }
    }

    /// A connection opened by uid `uid` (gid the same, no supplementary groups), with
    /// `setpriv` as CI runs as root. Waits until the connection is made.
    pub fn connect_as(path: &Path, uid: u32) -> Client {
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "/usr/bin/python3", "-u", "-c", RELAY])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("setpriv (util-linux) and python3");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        Client {
            reader: BufReader::new(Box::new(stdout)),
            writer: Some(Box::new(stdin)),
            socket: None,
            relay: Some(child),
        }
    }

    pub fn send(&mut self, v: &Value) {
        self.send_raw(v.to_string().as_bytes());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.try_send_raw(bytes).expect("send");
    }

    /// Bytes as they are, no newline added.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        let w = self.writer.as_mut().expect("the sending side is open");
        w.write_all(bytes).expect("send");
        w.flush().expect("send");
    }

    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut b = bytes.to_vec();
        b.push(b'\n');
        let w = self.writer.as_mut().expect("the sending side is open");
        w.write_all(&b)?;
        w.flush()
    }

    pub fn recv(&mut self) -> Value {
        let line = self.recv_line().expect("connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    /// The next line, or `None` at the end of the connection.
    pub fn recv_line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read reply");
        (n > 0).then_some(line)
    }

    /// Reads until the terminal reply of `id`; returns it and the streamed text of `id`.
    /// Replies of other ids are kept in `others`.
    pub fn until_terminal(&mut self, id: &str, others: &mut Vec<Value>) -> (Value, String) {
        let mut text = String::new();
        loop {
            let v = self.recv();
            if v["id"] != id {
                others.push(v);
                continue;
            }
            match v["type"].as_str() {
                Some("token") => text.push_str(v["text"].as_str().expect("token text")),
                _ => return (v, text),
            }
        }
    }

    /// Shuts the sending side (the relay does it when its stdin closes).
    pub fn shutdown_write(&mut self) {
        self.writer = None;
        if let Some(s) = &self.socket {
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(c) = &mut self.relay {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A chat request.
pub fn chat(id: &str, content: &str, max_tokens: usize) -> Value {
    json!({
        "id": id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}
