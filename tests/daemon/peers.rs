//! Peers against each other: who owns a request and a session, connections bounded, a refused
//! peer told why, duplicate ids. Other uids are real: CI runs as root and opens connections as
//! uids 1000, 1001 and 1002 with `setpriv`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use edgellm_testkit::SynthSpec;

use super::harness::{chat, synth_file, Client, TestDaemon};
use crate::common::default_model;

/// A directory every uid may traverse (the checkout may sit under a private home), for a
/// daemon whose socket other uids connect to.
fn public_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("edgellm-test-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create dir");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// A daemon on `model` whose socket every uid may open (mode 0666).
fn public_daemon(name: &str, model: &Path, extra: &str) -> TestDaemon {
    let dir = public_dir(name);
    let extra = format!("[socket]\nmode = \"0666\"\n{extra}");
    TestDaemon::spawn(&dir, model, &extra, &[]).wait_ready()
}

fn long(id: &str) -> Value {
    json!({"id": id, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true,
           "temperature": 0, "stream": true})
}

/// Reads until `id`'s first token (it runs).
fn until_running(c: &mut Client, id: &str) {
    loop {
        let v = c.recv();
        if v["id"] == id && v["type"] == "token" {
            return;
        }
        assert_ne!(v["type"], "error", "{v}");
    }
}

fn status_of(c: &mut Client) -> Value {
    c.send(&json!({"op": "status"}));
    loop {
        let v = c.recv();
        if v["type"] == "status" {
            return v;
        }
    }
}

/// Ownership: uid 1001 cannot cancel uid 1000's request nor see its id; uid 1000 can; an admin
/// uid (1002) can. Sessions are per uid: 1001 naming 1000's session gets `session_unknown`,
/// never its cache.
#[test]
fn requests_and_sessions_belong_to_their_peer() {
    let d = public_daemon(
        "peers-own",
        &default_model(),
        "[socket]\nadmin_uids = [1002]\n",
    );
    let mut alice = Client::connect_as(&d.socket, 1000);
    let mut bob = Client::connect_as(&d.socket, 1001);
    let mut admin = Client::connect_as(&d.socket, 1002);

    alice.send(&long("victim"));
    until_running(&mut alice, "victim");
    bob.send(&json!({"op": "cancel", "id": "victim"}));
    let r = bob.recv();
    assert_eq!(
        (r["type"].as_str(), r["state"].as_str()),
        (Some("cancel"), Some("unknown")),
        "{r}"
    );
    let s = status_of(&mut bob);
    assert!(!s["queue"]["running"].is_null(), "{s}");
    assert!(s["queue"]["running"].get("id").is_none(), "{s}");
    assert!(!s.to_string().contains("victim"), "{s}");
    let s = status_of(&mut alice);
    assert_eq!(s["queue"]["running"]["id"], "victim", "{s}");
    // Still running after bob's attempt: the admin stops it.
    admin.send(&json!({"op": "cancel", "id": "victim"}));
    assert_eq!(admin.recv()["state"], "running");
    let mut others = Vec::new();
    let (done, _) = alice.until_terminal("victim", &mut others);
    assert_eq!(done["finish_reason"], "cancelled", "{done}");
    // Alice's own cancel reaches her request.
    alice.send(&long("mine"));
    until_running(&mut alice, "mine");
    alice.send(&json!({"op": "cancel", "id": "mine"}));
    let mut others = Vec::new();
    let (ack, _) = alice.until_terminal("mine", &mut others);
    assert_eq!(ack["state"], "running", "{ack}");
    let (done, _) = alice.until_terminal("mine", &mut others);
    assert_eq!(done["finish_reason"], "cancelled", "{done}");

    // Sessions: alice tells hers a secret; bob names the same session.
    alice.send(&json!({"id": "s1", "session": "kitchen", "history": [],
        "messages": [{"role": "user", "content": "My PIN is 4711. Remember it."}],
        "max_tokens": 4, "temperature": 0}));
    let (done, _) = alice.until_terminal("s1", &mut others);
    assert_eq!(done["type"], "done", "{done}");
    bob.send(&json!({"id": "s2", "session": "kitchen",
        "messages": [{"role": "user", "content": "What is my PIN?"}],
        "max_tokens": 4, "temperature": 0}));
    let (r, _) = bob.until_terminal("s2", &mut others);
    assert_eq!(r["code"], "session_unknown", "{r}");
    // Bob starting a session of the same name gets his own, with nothing of alice's cached.
    bob.send(&json!({"id": "s3", "session": "kitchen", "history": [],
        "messages": [{"role": "user", "content": "What is my PIN?"}],
        "max_tokens": 4, "temperature": 0}));
    let (r, _) = bob.until_terminal("s3", &mut others);
    assert_eq!(r["usage"]["cached_tokens"], 0, "{r}");
    // Alice's session is still hers.
    alice.send(&json!({"id": "s4", "session": "kitchen",
        "messages": [{"role": "user", "content": "What is my PIN?"}],
        "max_tokens": 4, "temperature": 0}));
    let (r, _) = alice.until_terminal("s4", &mut others);
    assert!(r["usage"]["cached_tokens"].as_u64().unwrap_or(0) > 0, "{r}");
    assert_eq!(r["session"]["turns"], 2, "{r}");
}

/// Two requests with one id on a connection, then a half-close: the duplicate is refused and
/// the original still gets its `done`; the same while the daemon stops on SIGTERM.
#[test]
fn a_duplicate_id_never_loses_the_original() {
    let d = TestDaemon::start("peers-dup", &default_model(), "", &[]);
    // Long enough on the real model to be running when the duplicate and the stop come (40
    // tokens took 95 ms on an idle 2-core VM: done before the 100 ms wait after SIGTERM ended,
    // and the daemon gone before the duplicate was sent).
    let req = json!({"id": "r1", "prompt": "Once upon a time", "max_tokens": 200,
                     "ignore_eos": true, "temperature": 0});
    for sigterm in [false, true] {
        let mut c = d.connect();
        c.send(&req);
        if sigterm {
            // Running before the stop begins.
            c.send(&json!({"op": "status"}));
            let s = c.recv();
            assert_eq!(s["type"], "status");
            d.signal(Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(100));
        }
        c.send(&req);
        c.shutdown_write();
        let mut replies = Vec::new();
        while let Some(line) = c.recv_line() {
            replies.push(serde_json::from_str::<Value>(&line).expect("json"));
        }
        let errors: Vec<_> = replies.iter().filter(|v| v["type"] == "error").collect();
        assert_eq!(errors.len(), 1, "{replies:?}");
        assert_eq!(errors[0]["code"], "bad_request");
        assert!(
            errors[0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("already in flight")),
            "{replies:?}"
        );
        let done: Vec<_> = replies.iter().filter(|v| v["type"] == "done").collect();
        assert_eq!(done.len(), 1, "the original's done: {replies:?}");
        assert_eq!(done[0]["id"], "r1");
        assert_eq!(done[0]["usage"]["completion_tokens"], 200, "{replies:?}");
    }
}

/// Connection limits: beyond the per-uid cap or the total a connection is answered
/// `too_many_connections` at once (a `status` on it answered), an idle one is closed with
/// `idle_timeout`.
#[test]
fn connections_are_bounded_and_idle_ones_closed() {
    let dir = public_dir("peers-conns-model");
    let model = synth_file(&dir, &SynthSpec::default());
    let d = public_daemon(
        "peers-conns",
        &model,
        "[socket]\nmax_connections = 3\nmax_connections_per_uid = 2\nidle_timeout_ms = 3000\n",
    );
    let status = |c: &mut Client| {
        c.send(&json!({"op": "status"}));
        c.recv()
    };
    // Two idle connections of uid 1000 (made, and seen by the daemon).
    let mut a1 = Client::connect_as(&d.socket, 1000);
    let mut a2 = Client::connect_as(&d.socket, 1000);
    assert_eq!(status(&mut a1)["type"], "status");
    assert_eq!(status(&mut a2)["type"], "status");
    // A third of uid 1000: refused at once, though it sends nothing.
    let t = Instant::now();
    let mut a3 = Client::connect_as(&d.socket, 1000);
    let r = a3.recv();
    assert_eq!(r["code"], "too_many_connections", "{r}");
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("socket.max_connections_per_uid")),
        "{r}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(a3.recv_line().is_none(), "closed after the refusal");
    // Its status request is answered.
    let mut a4 = Client::connect_as(&d.socket, 1000);
    let s = status(&mut a4);
    assert_eq!(s["type"], "status", "{s}");
    // Another uid still gets in; then the total is reached for everyone.
    let mut b1 = Client::connect_as(&d.socket, 1001);
    assert_eq!(status(&mut b1)["type"], "status");
    let mut b2 = Client::connect_as(&d.socket, 1001);
    let r = b2.recv();
    assert_eq!(r["code"], "too_many_connections", "{r}");
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("(socket.max_connections)")),
        "{r}"
    );
    // Idle connections are told and closed; then there is room again.
    let r = a1.recv();
    assert_eq!(r["code"], "idle_timeout", "{r}");
    assert!(a1.recv_line().is_none());
    let r = a2.recv();
    assert_eq!(r["code"], "idle_timeout", "{r}");
    let r = b1.recv();
    assert_eq!(r["code"], "idle_timeout", "{r}");
    // A connection with a request in flight is not idle, however long it runs.
    let mut c = d.connect();
    c.send(&json!({"id": "slow", "prompt": "x", "max_tokens": 400, "ignore_eos": true}));
    let mut others = Vec::new();
    let (done, _) = c.until_terminal("slow", &mut others);
    assert_eq!(done["type"], "done", "{done}");
    assert!(others.is_empty(), "{others:?}");
}

/// A peer outside the allow-list that writes its request (larger than the socket's buffer)
/// before it reads, as `nc` and simple clients do, reads `forbidden`, not a reset.
#[test]
fn a_refused_peer_that_writes_first_reads_why() {
    let dir = public_dir("peers-forbidden-model");
    let model = synth_file(&dir, &SynthSpec::default());
    let d = public_daemon("peers-forbidden", &model, "[socket]\nallowed_uids = [0]\n");
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
line = json.dumps({"id": "r1", "prompt": "y" * 300000}).encode() + b"\n"
try:
    s.sendall(line)
    s.shutdown(socket.SHUT_WR)
    print(s.makefile("rb").readline().decode().strip())
except OSError as e:
    print("ERROR %s" % e)
"#;
    for _ in 0..3 {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", script])
            .arg(&d.socket)
            .output()
            .expect("setpriv and python3");
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!line.starts_with("ERROR"), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(v["code"], "forbidden", "{v}");
    }
    // Root is in the list.
    let mut c = d.connect();
    c.send(&chat("ok", "hi", 2));
    let mut others = Vec::new();
    assert_eq!(c.until_terminal("ok", &mut others).0["type"], "done");
}

/// Thousands of tiny chat messages inside `max_line_bytes`: fitted to the window in one pass,
/// answered within the deadline (plus a token), `status` answering meanwhile with a fresh
/// engine heartbeat; past `limits.max_messages` refused at once.
#[test]
fn thousands_of_messages_are_fitted_within_the_deadline() {
    let d = public_daemon(
        "peers-chat",
        &default_model(),
        "[limits]\nmax_messages = 20000\nmax_line_bytes = 2000000\n",
    );
    let messages: Vec<Value> = (0..10_000)
        .map(|i| {
            json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("m{i}")})
        })
        .collect();
    let mut c = d.connect();
    let t = Instant::now();
    c.send(
        &json!({"id": "many", "messages": messages, "max_tokens": 4, "temperature": 0,
                   "deadline_ms": 20000}),
    );
    // Status answers while it is prepared, with the engine's heartbeat fresh.
    let mut s = d.connect();
    for _ in 0..3 {
        let v = status_of(&mut s);
        assert!(
            v["engine_heartbeat_ms"]
                .as_u64()
                .is_some_and(|ms| ms < 5000),
            "{v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = c.recv();
    let took = t.elapsed();
    assert_eq!(r["type"], "done", "{r}");
    assert!(
        r["usage"]["prompt_tokens_dropped"].as_u64().unwrap_or(0) > 0,
        "{r}"
    );
    // A quadratic fitting takes minutes here; one pass, seconds.
    assert!(took < Duration::from_secs(21), "{took:?}");

    // A deadline shorter than the preparation stops it there.
    c.send(&json!({"id": "short", "messages": messages, "max_tokens": 4, "deadline_ms": 5}));
    let r = c.recv();
    assert!(
        r["finish_reason"] == "deadline" || r["code"] == "deadline",
        "{r}"
    );

    // Over the limit of messages: refused, naming it.
    let d2 = public_daemon("peers-chat-limit", &default_model(), "");
    let mut c = d2.connect();
    let too_many: Vec<Value> = (0..257)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect();
    c.send(&json!({"id": "x", "messages": too_many}));
    let r = c.recv();
    assert_eq!(r["code"], "too_large", "{r}");
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("limits.max_messages")),
        "{r}"
    );
}
