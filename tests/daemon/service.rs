//! The real `edgellm serve` binary over a real Unix socket.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use edgellm_testkit::SynthSpec;

use super::harness::{chat, synth_file, Client, TestDaemon};
use crate::common::{default_model, temp_dir};

fn edgellm(args: &[&str], env: &[(&str, &str)]) -> (String, String, i32) {
    crate::common::edgellm_with_env(args, env)
}

/// A long generation on the real model: it runs until cancelled or past its deadline.
fn long(id: &str) -> Value {
    json!({"id": id, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true,
           "temperature": 0, "stream": true})
}

/// 200 requests from 8 connections against a queue of 4: every id gets exactly one terminal
/// reply, the refused ones `queue_full`, all others complete, streamed text equals the final
/// text, and the status counters agree.
#[test]
fn two_hundred_requests_nothing_lost() {
    let dir = temp_dir("daemon-load");
    let model = synth_file(&dir, &SynthSpec::default());
    let d = TestDaemon::start("daemon-load-run", &model, "[queue]\ncapacity = 4\n", &[]);
    let threads: Vec<_> = (0..8)
        .map(|c| {
            let sock = d.socket.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&sock);
                let ids: Vec<String> = (0..25).map(|i| format!("c{c}-r{i}")).collect();
                for (i, id) in ids.iter().enumerate() {
                    client.send(&json!({
                        "id": id, "prompt": format!("request {i} of {c}"), "max_tokens": 12,
                        "ignore_eos": true, "temperature": 0.8, "seed": i, "stream": i % 2 == 0,
                    }));
                }
                let mut terminal: HashMap<String, Vec<Value>> = HashMap::new();
                let mut streamed: HashMap<String, String> = HashMap::new();
                while terminal.len() < ids.len() {
                    let v = client.recv();
                    let id = v["id"].as_str().expect("id").to_string();
                    match v["type"].as_str() {
                        Some("token") => streamed
                            .entry(id)
                            .or_default()
                            .push_str(v["text"].as_str().expect("text")),
                        _ => terminal.entry(id).or_default().push(v),
                    }
                }
                // Nothing more arrives for these ids.
                client.send(&json!({"op": "status"}));
                let last = client.recv();
                assert_eq!(last["type"], "status", "extra reply: {last}");
                (ids, terminal, streamed)
            })
        })
        .collect();
    let (mut done, mut full) = (0u64, 0u64);
    for t in threads {
        let (ids, terminal, streamed) = t.join().expect("client thread");
        for (i, id) in ids.iter().enumerate() {
            let replies = &terminal[id];
            assert_eq!(replies.len(), 1, "{id}: {replies:?}");
            let r = &replies[0];
            match r["type"].as_str() {
                Some("done") => {
                    done += 1;
                    assert_eq!(r["finish_reason"], "length", "{r}");
                    assert_eq!(r["usage"]["completion_tokens"], 12, "{r}");
                    if i % 2 == 0 {
                        assert_eq!(
                            streamed.get(id).map(String::as_str).unwrap_or(""),
                            r["text"].as_str().expect("text"),
                            "{id}"
                        );
                    } else {
                        assert!(!streamed.contains_key(id), "{id} was not streamed");
                    }
                }
                Some("error") => {
                    assert_eq!(r["code"], "queue_full", "{r}");
                    assert!(!streamed.contains_key(id));
                    full += 1;
                }
                _ => panic!("{r}"),
            }
        }
    }
    assert_eq!(done + full, 200);
    assert!(
        full > 0,
        "a queue of 4 must overflow under 200 pipelined requests"
    );
    assert!(done >= 4);
    let s = d.status();
    let c = &s["requests"];
    assert_eq!(c["received"], 200, "{s}");
    assert_eq!(c["queue_full"], full, "{s}");
    assert_eq!(c["accepted"], done, "{s}");
    assert_eq!(c["done"], done, "{s}");
    assert_eq!(c["completion_tokens"], done * 12, "{s}");
    assert_eq!(s["queue"]["depth"], 0);
    let (status, log) = d.stop();
    assert!(status.success(), "{status}: {log}");
    assert_eq!(
        log.matches("request done").count() as u64,
        done,
        "one log line per request"
    );
}

/// Bad input never costs the connection; a stale socket is replaced, a live one is not; the
/// socket gets its mode; a peer outside the allowed uids is refused with a reply and a log line.
#[test]
fn socket_errors_stale_and_live_sockets_mode_and_peers() {
    let dir = temp_dir("daemon-socket");
    let model = synth_file(&dir, &SynthSpec::default());
    // A socket file left by a crashed daemon: nobody listens.
    let run = temp_dir("daemon-socket-run");
    drop(std::os::unix::net::UnixListener::bind(run.join("edgellm.sock")).expect("stale"));
    // The socket's group by name: this process's own group, which it may always chown to.
    let gid = nix::unistd::getgid();
    let group = nix::unistd::Group::from_gid(gid)
        .expect("group lookup")
        .expect("own group has a name")
        .name;
    let d = TestDaemon::spawn(
        &run,
        &model,
        &format!("[socket]\nmode = \"0600\"\ngroup = {group:?}\n[limits]\nmax_line_bytes = 2048\n"),
        &[],
    )
    .wait_ready();
    let meta = std::fs::metadata(&d.socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid.as_raw());
    assert!(d.log().contains("stale socket"), "{}", d.log());

    let mut c = d.connect();
    c.send_raw(b"{\"id\": \"x\", nope");
    let r = c.recv();
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    c.send_raw(&vec![b'a'; 5000]);
    let r = c.recv();
    assert_eq!(r["code"], "too_large", "{r}");
    assert!(
        r["message"].as_str().expect("message").contains("2048"),
        "{r}"
    );
    c.send(&json!({"id": "m", "prompt": "x", "max_tokens": 99999}));
    let r = c.recv();
    assert_eq!(
        (r["id"].as_str(), r["code"].as_str()),
        (Some("m"), Some("too_large"))
    );
    c.send(&json!({"id": "big", "prompt": "word ".repeat(400), "max_tokens": 4}));
    let r = c.recv();
    assert_eq!(r["code"], "too_large", "{r}");
    assert!(
        r["message"].as_str().expect("message").contains("256"),
        "{r}"
    );
    c.send(&json!({"id": "f", "prompt": "x", "max_tokens": 2, "colour": "red"}));
    let r = c.recv();
    assert!(
        r["message"].as_str().expect("message").contains("colour"),
        "{r}"
    );
    // Still usable.
    c.send(&chat("ok", "hello", 3));
    let r = c.recv();
    assert_eq!(
        (r["id"].as_str(), r["type"].as_str()),
        (Some("ok"), Some("done")),
        "{r}"
    );

    // A second daemon on the same socket refuses to start and leaves the first alone.
    let second = temp_dir("daemon-socket-second");
    let (_, err, code) = edgellm(
        &[
            "serve",
            "--model",
            model.to_str().expect("utf-8"),
            "--socket",
            d.socket.to_str().expect("utf-8"),
        ],
        &[("HOME", second.to_str().expect("utf-8"))],
    );
    assert_ne!(code, 0);
    assert!(err.contains("another edgellm daemon"), "{err}");
    c.send(&chat("still", "hello", 2));
    assert_eq!(c.recv()["type"], "done");
    // SIGINT stops it as SIGTERM does.
    let mut d = d;
    d.signal(Signal::SIGINT);
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(d.log().contains("SIGINT: shutting down"), "{}", d.log());
    assert!(!d.socket.exists());
    drop(d);

    // Only uid `other` and members of group 4243 may talk to this one.
    let uid = nix::unistd::getuid().as_raw();
    let other = uid.wrapping_add(4242);
    let d = TestDaemon::start(
        "daemon-socket-peer",
        &model,
        &format!("[socket]\nallowed_uids = [{other}]\nallowed_gids = [4243]\n"),
        &[],
    );
    let mut c = d.connect();
    let r = c.recv();
    assert_eq!(r["code"], "forbidden", "{r}");
    assert!(
        r["message"]
            .as_str()
            .expect("m")
            .contains(&format!("uid {uid}")),
        "{r}"
    );
    assert!(d.log().contains("refused a connection"), "{}", d.log());
    let s = d.socket.to_str().expect("utf-8");
    let (_, err, code) = edgellm(&["status", "--socket", s], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("forbidden"), "{err}");
    // A supplementary group lets a peer in (SO_PEERGROUPS). setpriv needs root, as CI runs.
    let out = Command::new("setpriv")
        .args(["--groups", "4243", "--"])
        .arg(env!("CARGO_BIN_EXE_edgellm"))
        .args(["status", "--socket", s])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "as a member of group 4243 (needs root): {err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\""));
    drop(d);
    let d = TestDaemon::start(
        "daemon-socket-peer-ok",
        &model,
        &format!("[socket]\nallowed_uids = [{other}, {uid}]\n"),
        &[],
    );
    let mut c = d.connect();
    c.send(&chat("me", "hi", 2));
    assert_eq!(c.recv()["type"], "done");
}

/// On the real model: a deadline passing in the queue, a deadline passing while running,
/// cancel of a running request (the engine is free at once), priorities, and a client that
/// goes away.
#[test]
fn deadlines_cancel_priorities_and_disconnects() {
    let model = default_model();
    let d = TestDaemon::start(
        "daemon-deadlines",
        &model,
        "[model]\nn_ctx = 2048\n[limits]\nmax_tokens = 2000\n",
        &[],
    );
    let mut a = d.connect();
    let mut b = d.connect();
    let mut others = Vec::new();
    a.send(&long("A"));
    assert_eq!(a.recv()["type"], "token", "A started");

    b.send(&json!({"id": "B", "prompt": "b", "max_tokens": 3, "temperature": 0}));
    b.send(&json!({"id": "C", "prompt": "c", "max_tokens": 3, "temperature": 0, "priority": 5}));
    b.send(&json!({"id": "D", "prompt": "d", "max_tokens": 3, "deadline_ms": 300}));
    let t0 = Instant::now();
    let (r, _) = b.until_terminal("D", &mut others);
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("deadline")),
        "{r}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "answered when it passed"
    );
    let s = d.status();
    assert_eq!(s["queue"]["running"]["id"], "A", "A still running: {s}");
    assert_eq!(s["queue"]["depth"], 2, "{s}");

    b.send(&json!({"op": "cancel", "id": "A"}));
    let (r, _) = a.until_terminal("A", &mut others);
    assert_eq!(r["finish_reason"], "cancelled", "{r}");
    let n = r["usage"]["completion_tokens"].as_u64().expect("tokens");
    assert!(n > 0 && n < 1000, "{r}");
    // The cancel ack, then C (priority 5) before B.
    let mut order = Vec::new();
    let mut ack = None;
    while order.len() < 2 {
        let v = b.recv();
        match v["type"].as_str() {
            Some("cancel") => ack = Some(v),
            Some("done") => order.push(v["id"].as_str().expect("id").to_string()),
            _ => panic!("{v}"),
        }
    }
    assert_eq!(ack.expect("cancel ack")["state"], "running");
    assert_eq!(order, ["C", "B"]);

    // A deadline that passes while running stops it with finish_reason "deadline".
    let mut e = long("E");
    e["deadline_ms"] = json!(400);
    b.send(&e);
    let (r, text) = b.until_terminal("E", &mut others);
    assert_eq!(r["finish_reason"], "deadline", "{r}");
    assert_eq!(text, r["text"].as_str().expect("text"));
    let n = r["usage"]["completion_tokens"].as_u64().expect("tokens");
    assert!(n > 0 && n < 1000, "{r}");

    // A client that goes away mid-generation has its request cancelled.
    let mut f = d.connect();
    f.send(&long("F"));
    assert_eq!(f.recv()["type"], "token");
    drop(f);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let s = d.status();
        if s["requests"]["cancelled"] == 2 && s["queue"]["running"].is_null() {
            break;
        }
        assert!(Instant::now() < until, "F not cancelled: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("client went away"), "{}", d.log());

    // A client that only shuts down its sending side still gets its answer.
    let mut g = d.connect();
    g.send(&chat("G", "What is the capital of France?", 12));
    g.shutdown_write();
    let (r, _) = g.until_terminal("G", &mut others);
    assert_eq!(r["type"], "done", "{r}");
    assert!(others.is_empty(), "{others:?}");
}

/// Under a NOTIFY_SOCKET with a watchdog: READY=1 with a STATUS= line, WATCHDOG=1 pings, and on
/// SIGTERM STOPPING=1, the running request and the queued one get their terminal replies, new
/// ones are refused, the socket file goes, and the exit status is 0.
#[test]
fn notify_watchdog_and_graceful_stop() {
    let model = default_model();
    let mut d = TestDaemon::start(
        "daemon-notify",
        &model,
        "[model]\nn_ctx = 2048\n[limits]\nmax_tokens = 2000\n[shutdown]\ngrace_ms = 600\n",
        &[("WATCHDOG_USEC", "400000")],
    );
    let ready = d
        .notes
        .iter()
        .find(|n| n.starts_with("READY=1"))
        .expect("ready")
        .clone();
    assert!(ready.contains("STATUS=cpu-int4"), "{ready}");
    assert!(ready.contains("queue 0/16"), "{ready}");
    let n = d.notes.len();
    assert!(
        d.wait_note(n, Duration::from_secs(2), |m| m == "WATCHDOG=1"),
        "{:?}",
        d.notes
    );

    let mut a = d.connect();
    a.send(&long("H"));
    assert_eq!(a.recv()["type"], "token");
    // Finishes within the grace period.
    a.send(&chat("I", "Say hi.", 4));
    // Still queued when the grace period ends: answered shutting_down.
    a.send(&long("J"));
    let before = d.notes.len();
    d.signal(Signal::SIGTERM);
    assert!(
        d.wait_note(before, Duration::from_secs(5), |m| m.contains("STOPPING=1")),
        "{:?}",
        d.notes
    );
    a.send(&chat("K", "late", 2));
    let mut replies: HashMap<String, Value> = HashMap::new();
    while replies.len() < 4 {
        let v = a.recv();
        if v["type"] != "token" {
            let id = v["id"].as_str().expect("id").to_string();
            assert!(replies.insert(id, v).is_none(), "two terminal replies");
        }
    }
    assert_eq!(
        replies["H"]["finish_reason"], "cancelled",
        "{:?}",
        replies["H"]
    );
    assert_eq!(replies["K"]["code"], "shutting_down", "{:?}", replies["K"]);
    for id in ["I", "J"] {
        let r = &replies[id];
        assert!(
            r["type"] == "done" || r["code"] == "shutting_down",
            "{id}: {r}"
        );
    }
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", d.log());
    assert!(!d.socket.exists(), "socket removed");
    assert!(d.log().contains("SIGTERM"), "{}", d.log());
}

/// Socket activation: systemd-socket-activate holds the socket and passes it as LISTEN_FDS.
#[test]
fn takes_its_socket_from_systemd() {
    let dir = temp_dir("daemon-activate");
    let model = synth_file(&dir, &SynthSpec::default());
    let sock = dir.join("activated.sock");
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\nn_ctx = 256\n[socket]\npath = \"unused.sock\"\n",
            model.display().to_string()
        ),
    )
    .expect("config");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(env!("CARGO_BIN_EXE_edgellm"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd) must be installed");
    let until = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < until, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, which accepts it once ready.
    let mut c = Client::connect(&sock);
    c.send(&chat("s", "hello", 3));
    let r = c.recv();
    assert_eq!(r["type"], "done", "{r}");
    assert!(!dir.join("unused.sock").exists(), "bound its own socket");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    );
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// `edgellm ask` goes through the running daemon and answers as in-process generation does;
/// without a daemon it falls back; `edgellm status` prints the daemon's status.
#[test]
fn ask_and_status_through_the_daemon() {
    let dir = temp_dir("daemon-client");
    let model = synth_file(&dir, &SynthSpec::default());
    let m = model.to_str().expect("utf-8");
    // The config's log filter holds (RUST_LOG is unset): no per-request info lines at "warn".
    let d = TestDaemon::start(
        "daemon-client-run",
        &model,
        "[log]\nfilter = \"warn\"\n",
        &[],
    );
    let s = d.socket.to_str().expect("utf-8");
    let q = ["--temperature", "0", "--max-tokens", "8", "tell me"];
    let (via, err, code) = edgellm(&[&["ask", "--socket", s][..], &q].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("daemon at"), "{err}");
    let (local, err, code) = edgellm(&[&["ask", "--local", "--model", m][..], &q].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("daemon at"), "{err}");
    assert_eq!(via, local);
    assert!(!via.trim().is_empty());
    // --json through the daemon: the same answer, as one object.
    let (j, err, code) = edgellm(&[&["ask", "--json", "--socket", s][..], &q].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&j).expect("one JSON object");
    assert_eq!(v["text"].as_str(), Some(via.trim_end_matches('\n')), "{v}");
    assert_eq!(d.status()["requests"]["done"], 2);
    assert!(!d.log().contains("request done"), "{}", d.log());

    // A generation four times the window (n_ctx 256) slides it and says how much it evicted.
    let mut c = d.connect();
    c.send(&json!({"id": "slide", "prompt": "x", "max_tokens": 1024, "ignore_eos": true}));
    let r = c.recv();
    assert_eq!(r["usage"]["completion_tokens"], 1024, "{r}");
    let evicted = r["usage"]["evicted_tokens"]
        .as_u64()
        .expect("evicted_tokens");
    assert!(evicted >= 1024 - 256, "{r}");

    let (out, err, code) = edgellm(&["status", "--socket", s], &[]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(v["backend"], "cpu-int4");
    assert_eq!(v["queue"]["capacity"], 16);

    // Limits come back as errors with exit code 2.
    let (_, err, code) = edgellm(&["ask", "--socket", s, "--max-tokens", "5000", "x"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("too_large") && err.contains("1024"), "{err}");

    let gone = dir.join("nobody.sock");
    let g = gone.to_str().expect("utf-8");
    let (fallback, err, code) = edgellm(
        &[&["ask", "--socket", g][..], &q].concat(),
        &[("EDGELLM_MODEL", m)],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("answering in-process"), "{err}");
    assert_eq!(fallback, local);
    let (_, err, code) = edgellm(&["status", "--socket", g], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("no daemon answers"), "{err}");
}

/// Sessions on the real model over the socket: a follow-up turn reuses the cache, which
/// stands for the same conversation a client would send whole; a session interleaved with another and with plain
/// requests answers exactly as when it runs alone; an unknown session without history is
/// `session_unknown`; status shows the running request's window fill and evictions, and the
/// sessions held; a conversation over the window drops its oldest turns and says so.
#[test]
fn sessions_status_and_overflow_on_the_real_model() {
    let model = default_model();
    let d = TestDaemon::start(
        "daemon-sessions",
        &model,
        "[sessions]\nmax_count = 4\n",
        &[],
    );
    let mut c = d.connect();
    let mut ask = |id: &str, session: &str, q: &str, first: bool| -> Value {
        let mut v = chat(id, q, 24);
        v["session"] = json!(session);
        if first {
            v["history"] = json!([]);
        }
        c.send(&v);
        let r = c.recv();
        assert_eq!(r["type"], "done", "{r}");
        r
    };
    let qs = [
        "What is the capital of France?",
        "And of Italy?",
        "Which of the two is bigger?",
    ];
    let solo: Vec<Value> = qs
        .iter()
        .enumerate()
        .map(|(i, q)| ask(&format!("s{i}"), "solo", q, i == 0))
        .collect();
    for r in &solo[1..] {
        let u = &r["usage"];
        assert!(u["cached_tokens"].as_u64() > Some(30), "{r}");
        assert!(u["prompt_tokens"].as_u64() < Some(30), "{r}");
    }
    assert_eq!(solo[2]["session"]["turns"], 3, "{}", solo[2]);
    let mut mixed = Vec::new();
    let mut p = d.connect();
    for (i, q) in qs.iter().enumerate() {
        mixed.push(ask(&format!("m{i}"), "mixed", q, i == 0));
        ask(&format!("o{i}"), "other", "Tell me about cats.", i == 0);
        p.send(&chat(&format!("p{i}"), "Say hello.", 8));
        assert_eq!(p.recv()["type"], "done");
    }
    for (m, s) in mixed.iter().zip(&solo) {
        assert_eq!(
            m["text"], s["text"],
            "interleaving changed the session's answer"
        );
        assert_eq!(m["usage"]["cached_tokens"], s["usage"]["cached_tokens"]);
    }
    let st = d.status();
    assert_eq!(st["sessions"]["held"], 3, "{st}");
    assert!(st["sessions"]["bytes"].as_u64() > Some(100_000), "{st}");

    // The same conversation sent whole, without a session.
    let mut conv = Vec::new();
    for (q, r) in qs.iter().zip(&solo).take(2) {
        conv.push(json!({"role": "user", "content": q}));
        conv.push(json!({"role": "assistant", "content": r["text"]}));
    }
    conv.push(json!({"role": "user", "content": qs[2]}));
    c.send(&json!({"id": "cold", "messages": conv, "max_tokens": 24, "temperature": 0}));
    let cold = c.recv();
    assert_eq!(cold["usage"]["cached_tokens"], 0, "{cold}");
    // The session's cache stands for the same conversation: the cold prompt is what the
    // session reused plus what it prefilled (give or take the replies' tokenization: the
    // session keeps the tokens sampled, the cold request tokenizes the replies' text).
    let u = |r: &Value, k: &str| r["usage"][k].as_i64().unwrap_or(-1000);
    let whole = u(&solo[2], "cached_tokens") + u(&solo[2], "prompt_tokens");
    assert!(
        (u(&cold, "prompt_tokens") - whole).abs() <= 4,
        "{cold} vs {}",
        solo[2]
    );

    let mut v = chat("lost", "Hello?", 8);
    v["session"] = json!("never-seen");
    c.send(&v);
    let r = c.recv();
    assert_eq!(r["code"], "session_unknown", "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("history"),
        "{r}"
    );

    // While a long generation runs, status shows its window fill and evictions (n_ctx 256).
    let mut long = d.connect();
    long.send(
        &json!({"id": "long", "prompt": "Once upon a time", "max_tokens": 1000,
                      "ignore_eos": true, "temperature": 0, "stream": true}),
    );
    assert_eq!(long.recv()["type"], "token");
    let mut seen = None;
    let until = Instant::now() + Duration::from_secs(90);
    while Instant::now() < until {
        let st = d.status();
        if st["kv"]["evicted"].as_u64() > Some(0) {
            seen = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = seen.expect("status never showed an eviction");
    assert_eq!(st["kv"]["id"], "long", "{st}");
    assert_eq!(st["kv"]["n_ctx"], 256, "{st}");
    let used = st["kv"]["used"].as_u64().unwrap_or(0);
    assert!((1..=256).contains(&used), "{st}");
    long.send(&json!({"op": "cancel", "id": "long"}));
    let done = loop {
        let v = long.recv();
        if v["type"] == "done" {
            break v;
        }
    };
    assert_eq!(done["finish_reason"], "cancelled", "{done}");

    // A conversation over the window: the oldest turns go, the reply says how many tokens.
    let mut msgs = vec![json!({"role": "system", "content": "You are terse."})];
    for i in 0..30 {
        msgs.push(json!({"role": "user", "content": format!("Remember the number {i}.")}));
        msgs.push(json!({"role": "assistant", "content": format!("Noted: {i}.")}));
    }
    msgs.push(json!({"role": "user", "content": "Which number came last?"}));
    c.send(&json!({"id": "over", "messages": msgs, "max_tokens": 8, "temperature": 0}));
    let r = c.recv();
    assert_eq!(r["type"], "done", "{r}");
    let dropped = r["usage"]["prompt_tokens_dropped"].as_u64().unwrap_or(0);
    assert!(dropped > 200, "{r}");
    assert!(r["usage"]["prompt_tokens"].as_u64() < Some(256), "{r}");
    assert_eq!(r["usage"]["evicted_tokens"], 0, "{r}");
    let huge = json!([{"role": "user", "content": "word ".repeat(400)}]);
    c.send(&json!({"id": "huge", "messages": huge, "max_tokens": 8}));
    let r = c.recv();
    assert_eq!(r["code"], "too_large", "{r}");
    // Both numbers: the turn's tokens (over 256) and the window's.
    let m = r["message"].as_str().unwrap_or("");
    let n: usize = m
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or(0);
    assert!(n > 256 && m.contains("window holds 256"), "{r}");
}

/// Resident memory of the daemon after 1,000 requests is within 5 MiB of what it was after
/// the first 10: plain chats, window-sliding generations, session turns over more sessions
/// than the store holds (so sessions are saved, loaded, evicted and rebuilt), and refusals.
#[test]
fn resident_memory_stays_flat_over_a_thousand_requests() {
    let dir = temp_dir("daemon-rss");
    let model = synth_file(&dir, &SynthSpec::default());
    let d = TestDaemon::start(
        "daemon-rss-run",
        &model,
        "[sessions]\nmax_count = 4\nmax_bytes = 2000000\n[log]\nfilter = \"warn\"\n",
        &[],
    );
    let rss = || d.rss();
    let mut c = d.connect();
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut after_10 = 0;
    for i in 0..1000usize {
        let id = format!("r{i}");
        let v = match i % 5 {
            0 => json!({"id": id, "prompt": "x", "max_tokens": 600, "ignore_eos": true}),
            1 | 2 => {
                let mut v = chat(&id, &format!("turn {i} of a long chat"), 12);
                v["session"] = json!(format!("s{}", (i / 5) % 8));
                if (i / 5) % 3 == 0 {
                    v["history"] = json!([]);
                }
                v
            }
            3 => {
                json!({"id": id, "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999})
            }
            _ => chat(&id, "hello there", 16),
        };
        c.send(&v);
        let r = c.recv();
        let kind = match r["type"].as_str() {
            Some("done") => "done".to_string(),
            _ => r["code"].as_str().unwrap_or("?").to_string(),
        };
        *outcomes.entry(kind).or_default() += 1;
        if i == 9 {
            after_10 = rss();
        }
    }
    let after_1000 = rss();
    eprintln!("RSS after 10: {after_10} B, after 1000: {after_1000} B; outcomes {outcomes:?}");
    assert_eq!(outcomes.values().sum::<usize>(), 1000);
    assert!(
        outcomes.get("done").copied().unwrap_or(0) >= 600,
        "{outcomes:?}"
    );
    assert!(outcomes.contains_key("session_unknown"), "{outcomes:?}");
    assert_eq!(outcomes.get("too_large"), Some(&200), "{outcomes:?}");
    let st = d.status();
    assert!(st["sessions"]["evicted"].as_u64() > Some(0), "{st}");
    assert!(
        after_1000 <= after_10 + (5 << 20),
        "resident memory grew from {after_10} to {after_1000} bytes"
    );
}

/// `edgellm config`: the default printed is the shipped file; a bad file stops `serve` before
/// anything loads, naming the key.
#[test]
fn config_command_and_bad_config_stop_serve() {
    let dir = temp_dir("daemon-config");
    let (out, _, code) = edgellm(&["config", "--print-default"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out, edgellm::config::DEFAULT_TOML);
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    // The package test adds and removes the edgellm group: not while this looks.
    let _dpkg = crate::package::DPKG
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let edgellm_group = nix::unistd::Group::from_name("edgellm")
        .ok()
        .flatten()
        .is_some();
    for f in std::fs::read_dir(repo).expect("configs/") {
        let p = f.expect("entry").path();
        if p.extension().is_some_and(|e| e == "toml") {
            let (_, err, code) = edgellm(&["config", "--check", p.to_str().expect("utf-8")], &[]);
            // The board example names the edgellm group (socket.group, allowed_gids): on a
            // machine without it, it is refused as serve would refuse it.
            let text = std::fs::read_to_string(&p).expect("read");
            let v: toml::Value = toml::from_str(&text).expect("TOML");
            let socket = &v["socket"];
            let names_group = socket.get("group").and_then(|g| g.as_str()) == Some("edgellm")
                || ["allowed_gids", "admin_gids"].iter().any(|k| {
                    socket
                        .get(k)
                        .and_then(|a| a.as_array())
                        .is_some_and(|a| a.iter().any(|g| g.as_str() == Some("edgellm")))
                });
            // No example hard-codes a machine's numeric group ids.
            for k in ["allowed_gids", "admin_gids"] {
                let ids = socket
                    .get(k)
                    .and_then(|a| a.as_array())
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    ids.iter().all(|g| g.is_str()),
                    "{}: socket.{k} = {ids:?}: name the group",
                    p.display()
                );
            }
            if names_group && !edgellm_group {
                assert_eq!(code, 2, "{}: {err}", p.display());
                assert!(err.contains("edgellm"), "{err}");
            } else {
                assert_eq!(code, 0, "{}: {err}", p.display());
            }
        }
    }
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[queue]\ncapacity = 100000\n").expect("write");
    let (_, err, code) = edgellm(
        &[
            "serve",
            "--config",
            bad.to_str().expect("utf-8"),
            "--model",
            "/nonexistent.gguf",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("queue.capacity = 100000: allowed 1..=4096"),
        "{err}"
    );
    assert!(
        !err.contains("nonexistent"),
        "config checked before the model: {err}"
    );
}

/// `serve --check` prints the memory budget of the real model and exits 0; the KV cache is
/// layers × 2 × kv_dim × n_ctx elements (f16 by default, f32, or q8_0's 34 bytes per 32); a budget over
/// `memory.max_bytes` stops serve before it binds, naming every part and the limit.
#[test]
fn serve_check_prints_the_budget_and_over_budget_refuses_to_start() {
    let dir = temp_dir("daemon-budget");
    let model = default_model();
    let sock = dir.join("s.sock");
    let budget = |extra: &str| {
        let cfg = dir.join("c.toml");
        let text = format!(
            "[model]\npath = {:?}\nn_ctx = 1024\n{extra}\n[socket]\npath = {:?}\n",
            model.display().to_string(),
            sock.display().to_string()
        );
        std::fs::write(&cfg, text).expect("write");
        let (out, err, code) = edgellm(
            &["serve", "--check", "--config", cfg.to_str().expect("utf-8")],
            &[],
        );
        (
            serde_json::from_str::<Value>(&out).unwrap_or(Value::Null),
            err,
            code,
        )
    };
    // SmolLM2-135M: 30 layers, 3 KV heads of 64.
    let (f16s, err, code) = budget("");
    assert_eq!(code, 0, "{err}");
    assert_eq!(f16s["kv_cache"], json!(30 * 2 * 192 * 2 * 1024), "{f16s}");
    assert!(f16s["weights"].as_u64().unwrap_or(0) > 80 << 20, "{f16s}");
    assert!(err.contains("memory budget"), "{err}");
    let (f32s, err, code) = budget("kv_type = \"f32\"");
    assert_eq!(code, 0, "{err}");
    assert_eq!(f32s["kv_cache"], json!(30 * 2 * 192 * 4 * 1024), "{f32s}");
    let (q8, err, code) = budget("kv_type = \"q8_0\"");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        q8["kv_cache"],
        json!(30 * 2 * (192 / 32 * 34) * 1024),
        "{q8}"
    );
    assert!(!sock.exists(), "--check binds nothing");

    let (_, err, code) = budget("[memory]\nmax_bytes = 100000000\n");
    assert_eq!(code, 1, "{err}");
    for part in [
        "weights",
        "KV cache 22.5 MiB",
        "scratch",
        "sessions 64.0 MiB",
        "runtime",
    ] {
        assert!(err.contains(part), "{part} missing: {err}");
    }
    assert!(
        err.contains("over the limit of 95.4 MiB (memory.max_bytes)"),
        "{err}"
    );
    let cfg = dir.join("c.toml");
    let (_, err, code) = edgellm(&["serve", "--config", cfg.to_str().expect("utf-8")], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("over the limit"), "{err}");
    assert!(!sock.exists(), "refused before binding");
}

/// The units pass `systemd-analyze verify`, and the service's exposure is 2.0 or lower.
#[test]
fn units_pass_systemd_analyze() {
    let dir = temp_dir("daemon-units");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
    for unit in ["edgellm.service", "edgellm.socket"] {
        let text = std::fs::read_to_string(format!("{src}/{unit}")).expect("unit");
        assert!(text.contains("/usr/bin/edgellm") || unit.ends_with(".socket"));
        // verify checks that ExecStart exists: point it at the binary under test.
        let text = text.replace("/usr/bin/edgellm", env!("CARGO_BIN_EXE_edgellm"));
        std::fs::write(dir.join(unit), text).expect("write unit");
    }
    let service = std::fs::read_to_string(format!("{src}/edgellm.service")).expect("service");
    for must in [
        "Type=notify",
        "WatchdogSec=",
        "Environment=ORT_DISABLE_TELEMETRY=1",
        "User=edgellm",
        "RuntimeDirectory=edgellm",
        "StateDirectory=edgellm",
    ] {
        assert!(service.contains(must), "{must}");
    }
    let device_lines: Vec<&str> = service
        .lines()
        .filter(|l| l.contains("DeviceAllow="))
        .collect();
    assert!(
        device_lines.len() >= 3,
        "DeviceAllow examples for NPUs/GPUs"
    );
    assert!(
        device_lines.iter().all(|l| l.starts_with('#')),
        "commented out"
    );
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join("edgellm.socket"))
        .arg(dir.join("edgellm.service"))
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify: {err}");
    assert!(
        !err.contains("edgellm.s"),
        "verify complained about our units: {err}"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(dir.join("edgellm.service"))
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure line: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(level <= 2.0, "{line}");
    // The allow-lists and per-uid ownership see real uids: no user namespace in the unit.
    let unit = std::fs::read_to_string(dir.join("edgellm.service")).expect("unit");
    assert!(
        !unit
            .lines()
            .any(|l| l.trim_start().starts_with("PrivateUsers=")),
        "PrivateUsers= maps every peer to nobody and defeats socket.allowed_uids"
    );
}
