//! Signals and files under a running daemon: SIGHUP reloads what can be reloaded and says so;
//! a model file truncated in place is reported by name and the daemon exits non-zero for
//! systemd to restart it, never a silent SIGBUS.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use edgellm_testkit::SynthSpec;

use super::harness::{chat, synth_file, TestDaemon};
use crate::common::temp_dir;

fn wait_log(d: &TestDaemon, what: &str) -> String {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let log = d.log();
        if log.contains(what) {
            return log;
        }
        assert!(Instant::now() < until, "no {what:?} in the log: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reloads_what_it_can_and_says_what_changed() {
    let dir = temp_dir("signals-hup");
    let model = synth_file(&dir, &SynthSpec::default());
    let mut d = TestDaemon::start("signals-hup-run", &model, "", &[]);
    let config = d.dir.join("edgellm.toml");
    let original = std::fs::read_to_string(&config).expect("config");

    // Unchanged: said so, still serving.
    d.signal(Signal::SIGHUP);
    wait_log(&d, "SIGHUP: configuration unchanged");
    assert!(d.child.try_wait().expect("wait").is_none(), "alive");

    // A limit, the allow-list, the log filter and a key that needs a restart.
    let changed = original.replace("n_ctx = 256", "n_ctx = 128")
        + "[limits]\nmax_tokens = 7\ndefault_max_tokens = 7\n[log]\nfilter = \"debug\"\n";
    std::fs::write(&config, &changed).expect("write");
    d.signal(Signal::SIGHUP);
    let log = wait_log(&d, "SIGHUP: limits.max_tokens = 7 (was 1024)");
    assert!(log.contains("SIGHUP: log.filter"), "{log}");
    assert!(
        log.contains("SIGHUP: model.n_ctx = 128 (was 256) needs a restart"),
        "{log}"
    );
    let mut c = d.connect();
    c.send(&chat("big", "hi", 8));
    let r = c.recv();
    assert_eq!(r["code"], "too_large", "the new limit holds: {r}");
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("limit is 7")),
        "{r}"
    );
    // The window did not change.
    assert_eq!(d.status()["n_ctx"], 256);

    // The allow-list: root is no longer in it.
    let locked = changed.replace("[socket]\n", "[socket]\nallowed_uids = [4242]\n");
    std::fs::write(&config, locked).expect("write");
    d.signal(Signal::SIGHUP);
    wait_log(&d, "SIGHUP: socket.allowed_uids = [4242] (was [])");
    let mut c = d.connect();
    c.send(&json!({"op": "status"}));
    assert_eq!(c.recv()["code"], "forbidden");

    // A file that no longer parses changes nothing.
    std::fs::write(&config, "[limits\n").expect("write");
    d.signal(Signal::SIGHUP);
    wait_log(&d, "keeping the settings in force");
    std::fs::write(&config, &original).expect("write");
    d.signal(Signal::SIGHUP);
    wait_log(&d, "SIGHUP: socket.allowed_uids = [] (was [4242])");
    let s = d.status();
    assert_eq!(s["type"], "status");
    let status = d.wait_exit_after(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0), "{}", d.log());
}

#[test]
fn a_model_truncated_in_place_is_named_and_the_daemon_exits_non_zero() {
    // Idle: the periodic check finds it. Busy: the running request reads vanished pages first
    // and the SIGBUS handler reports it. Either way the file is named and the status is 74.
    for busy in [false, true] {
        let dir = temp_dir(&format!("signals-shrink-{busy}"));
        let model = if busy {
            // The real model: a generation long enough to be cut in the middle.
            let p = dir.join("model.gguf");
            std::fs::copy(crate::common::default_model(), &p).expect("copy the model");
            p
        } else {
            synth_file(&dir, &SynthSpec::default())
        };
        let mut d = TestDaemon::start(&format!("signals-shrink-run-{busy}"), &model, "", &[]);
        let mut client = None;
        if busy {
            let mut c = d.connect();
            c.send(
                &json!({"id": "r", "prompt": "Once upon a time", "max_tokens": 200,
                           "ignore_eos": true, "stream": true}),
            );
            assert_eq!(c.recv()["type"], "token");
            client = Some(c);
        }
        let len = std::fs::metadata(&model).expect("model").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&model)
            .expect("open");
        f.set_len(len / 3).expect("truncate");
        let status = d.wait_exit(Duration::from_secs(30));
        let log = d.log();
        assert_eq!(status.code(), Some(74), "{status:?}: {log}");
        assert!(log.contains(&model.display().to_string()), "{log}");
        // Busy, the next token faults within milliseconds, so the SIGBUS handler almost always
        // speaks first; the check, twice a second, may rarely win the race, which is as good.
        let named = log.contains("changed size while mapped")
            || (busy && log.contains("SIGBUS reading the model file"));
        assert!(named, "{log}");
        assert!(log.contains("by rename"), "{log}");
        if let Some(mut c) = client {
            // The client sees the connection end, not a hang.
            while c.recv_line().is_some() {}
        }
    }
}
