//! The command line's errors as the README states them: exit code 2 for bad input (a missing
//! or bad model, a missing or bad config), each error naming its file once, and `config --check`
//! refusing what `serve` refuses.

use std::time::Duration;

use edgellm_testkit::SynthSpec;

use super::harness::{synth_file, TestDaemon};
use crate::common::{edgellm_with_env, temp_dir};

fn edgellm(args: &[&str]) -> (String, String, i32) {
    edgellm_with_env(args, &[])
}

#[test]
fn bad_input_exits_2_and_names_its_file_once() {
    let dir = temp_dir("errors-cli");
    let missing = dir.join("missing.gguf").display().to_string();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, b"GGUF\x03\x00\x00\x00\x01").expect("write");
    let truncated = truncated.display().to_string();
    for model in [&missing, &truncated] {
        for args in [
            vec!["ask", "--model", model, "hi"],
            vec!["tokenize", "--model", model, "hi"],
            vec!["info", "--model", model],
            vec!["serve", "--check", "--model", model],
        ] {
            let (_, err, code) = edgellm(&args);
            assert_eq!(code, 2, "{args:?}: {err}");
            assert!(
                err.contains(model.as_str()),
                "{args:?} names the file: {err}"
            );
            assert_eq!(
                err.matches("(os error").count(),
                usize::from(model == &missing),
                "{args:?}: the OS error once: {err}"
            );
        }
    }
    let config = dir.join("missing.toml").display().to_string();
    for args in [
        vec!["serve", "--config", &config],
        vec!["config", "--check", &config],
        vec!["status", "--config", &config],
    ] {
        let (_, err, code) = edgellm(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.matches("(os error 2)").count(), 1, "{args:?}: {err}");
        assert!(err.contains("missing.toml"), "{err}");
    }
}

/// `config --check` refuses what `serve` would: a socket group that does not exist, MQTT over
/// TLS without its CA.
#[test]
fn config_check_refuses_what_serve_refuses() {
    let dir = temp_dir("errors-config");
    let model = synth_file(&dir, &SynthSpec::default())
        .display()
        .to_string();
    for (name, extra, key) in [
        ("group", "group = \"no-such-group-here\"\n", "socket.group"),
        (
            "tls",
            "[mqtt]\nenabled = true\nurl = \"mqtts://127.0.0.1:8883\"\n",
            "mqtt.ca_file",
        ),
    ] {
        let path = dir.join(format!("{name}.toml"));
        let sock = dir.join(format!("{name}.sock")).display().to_string();
        let text = format!("[model]\npath = {model:?}\n[socket]\npath = {sock:?}\n{extra}");
        std::fs::write(&path, text).expect("write");
        let p = path.display().to_string();
        let (_, err, code) = edgellm(&["config", "--check", &p]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(key), "{name}: {err}");
        assert!(!err.contains("valid"), "{name}: {err}");
        let (_, err, code) = edgellm(&["serve", "--config", &p]);
        assert_ne!(code, 0, "{name}: serve refuses it too: {err}");
        assert!(err.contains(key), "{name}: {err}");
    }
}

/// A line over `limits.max_line_bytes` that ends with the connection (no newline) is answered
/// `too_large` before the connection closes.
#[test]
fn a_too_long_last_line_is_answered() {
    let dir = temp_dir("errors-line");
    let model = synth_file(&dir, &SynthSpec::default());
    let d = TestDaemon::start("errors-line-run", &model, "", &[]);
    for n in [65_537usize, 200_000] {
        let mut c = d.connect();
        let line = format!("{{\"id\":\"x\",\"prompt\":\"{}\"}}", "a".repeat(n));
        c.write_bytes(line.as_bytes());
        c.shutdown_write();
        let v = c.recv();
        assert_eq!(v["code"], "too_large", "{v}");
        assert!(c.recv_line().is_none());
    }
    std::thread::sleep(Duration::from_millis(10));
}
