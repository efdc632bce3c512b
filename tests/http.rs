//! The HTTP front-end on a real `edgellm serve --http`: the official `openai` and `ollama`
//! Python clients (in the virtualenv `scripts/setup.sh --test` makes), tool calls on
//! Qwen2.5-Coder-0.5B, cancel on disconnect, limits and the API key over raw HTTP/1.1, the
//! README's curl examples, and mutated JSON bodies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use edgellm::engine::sampler::Rng;
use edgellm_testkit::SynthSpec;

use crate::common::{default_model, temp_dir};
use crate::daemon::harness::{synth_file, TestDaemon};
use crate::fuzz::{cases, first_seed, mutate_request};
use crate::qwen::qwen_model;

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A daemon serving HTTP on a free loopback port, with `extra` config.
fn start(name: &str, model: &std::path::Path, extra: &str) -> (TestDaemon, SocketAddr) {
    let port = free_port();
    let d = TestDaemon::start(
        name,
        model,
        &format!("[http]\nlisten = [\"127.0.0.1:{port}\"]\n{extra}"),
        &[],
    );
    (d, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The Python with the `openai` and `ollama` packages: `$EDGELLM_PYTHON`, else the
/// virtualenv the test setup makes.
fn python() -> PathBuf {
    let p = std::env::var_os("EDGELLM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/edgellm/venv/bin/python")
        });
    assert!(
        p.is_file(),
        "no Python with the openai and ollama clients at {}: run scripts/setup.sh --test",
        p.display()
    );
    p
}

/// Runs one of the client scripts in `tests/clients/`; its JSON output.
fn clients(script: &str, args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/clients")
                .join(script),
        )
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Writes a request on `s` (`Content-Length` added).
fn send(s: &mut TcpStream, method: &str, path: &str, headers: &[&str], body: &[u8]) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).expect("write request");
}

/// Reads one response (a `Content-Length` or chunked body) from `r`.
fn read_response(r: &mut BufReader<TcpStream>) -> Option<Resp> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        body.resize(n, 0);
        r.read_exact(&mut body).ok()?;
    } else {
        r.read_to_end(&mut body).ok()?;
    }
    Some(Resp { status, head, body })
}

/// One request on a fresh connection.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    send(&mut s, method, path, headers, body);
    read_response(&mut BufReader::new(s)).expect("a response")
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, &[], body.to_string().as_bytes())
}

/// The official clients list the model, chat (streamed and not, through both APIs), and get
/// each API's errors; all behind an API key. Greedy answers agree across APIs and streaming.
#[test]
fn official_clients_list_chat_stream_and_get_errors() {
    let model = default_model();
    let key_file = temp_dir("http-key").join("key");
    std::fs::write(&key_file, "s3cret-key\n").expect("write key");
    let (d, addr) = start(
        "http-clients",
        &model,
        &format!(
            "api_key_file = {:?}\n[model]\nn_ctx = 512\n",
            key_file.display().to_string()
        ),
    );
    let name = "SmolLM2-135M-Instruct.Q4_1";
    let out = clients(
        "http_clients.py",
        &[&format!("http://{addr}"), name, "s3cret-key"],
    );
    assert_eq!(out["openai_models"], json!([name]), "{out}");
    assert_eq!(out["ollama_list"], json!([name]), "{out}");
    assert_eq!(out["ollama_ps"], json!([name]), "{out}");
    let chat = &out["openai_chat"];
    let text = chat["text"].as_str().expect("text");
    assert!(!text.is_empty(), "{out}");
    assert_eq!(chat["model"], name);
    assert_eq!(chat["finish_reason"], "length", "{out}");
    assert_eq!(chat["completion_tokens"], 24);
    // The same greedy answer streamed, token by token, and through Ollama's API.
    let st = &out["openai_stream"];
    assert_eq!(st["text"], text, "{out}");
    assert_eq!(st["usage"], 24);
    assert_eq!(st["finish_reason"], "length");
    assert!(st["chunks"].as_u64().expect("chunks") > 10, "{out}");
    assert_eq!(out["ollama_chat"]["text"], text, "{out}");
    assert_eq!(out["ollama_chat"]["eval_count"], 24);
    assert_eq!(
        out["ollama_chat"]["prompt_eval_count"],
        chat["prompt_tokens"]
    );
    let ost = &out["ollama_stream"];
    assert_eq!(ost["text"], text, "{out}");
    assert_eq!(
        (&ost["done"], &ost["done_reason"]),
        (&json!(true), &json!("length"))
    );
    assert_eq!(
        out["openai_completion"]["text"], out["ollama_generate"]["text"],
        "{out}"
    );
    assert!(out["openai_completion"]["text"]
        .as_str()
        .is_some_and(|t| t.contains("Paris")));
    assert_eq!(out["ollama_show"]["family"], "llama");
    assert_eq!(out["ollama_show"]["quantization"], "Q4_1");
    // Errors, in each API's own shape, naming the field and the limit.
    let e = &out["openai_errors"];
    assert_eq!(e["model"]["status"], 404, "{out}");
    assert_eq!(e["model"]["code"], "model_not_found");
    assert_eq!(e["max_tokens"]["status"], 400);
    assert!(e["max_tokens"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("limits.max_tokens")));
    assert!(e["role"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("messages[0].role")));
    assert_eq!(e["type"]["param"], "temperature", "{out}");
    let e = &out["ollama_errors"];
    assert_eq!(e["model"]["status"], 404, "{out}");
    assert_eq!(e["num_predict"]["status"], 400);
    assert!(e["num_predict"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("options.num_predict")));
    // Without the key: 401 in the API's shape; /health needs none.
    let r = post(addr, "/v1/chat/completions", &json!({"messages": []}));
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r
        .head
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer"));
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    let r = request(
        addr,
        "GET",
        "/api/tags",
        &["Authorization: Bearer wrong"],
        b"",
    );
    assert_eq!((r.status, r.json()["error"].is_string()), (401, true));
    let r = request(addr, "GET", "/health", &[], b"");
    assert_eq!((r.status, &r.json()["status"]), (200, &json!("ok")));
    let s = d.status();
    assert_eq!(s["requests"]["failed"], 0, "{s}");
    // Six generations reached the queue; every refusal was answered before it.
    assert_eq!(s["requests"]["received"], 6, "{s}");
    assert_eq!(s["requests"]["done"], 6, "{s}");
}

/// Tool calls on Qwen2.5-Coder-0.5B: `turn_on(name)` and "Turn on the kitchen light" yield a
/// parsed call through both APIs, streamed and not; the call and the tool's result go back in
/// the next prompt and the model answers.
#[test]
fn tool_calls_are_parsed_on_qwen() {
    let (_d, addr) = start("http-tools", &qwen_model(), "[model]\nn_ctx = 1024\n");
    let out = clients(
        "http_tools.py",
        &[
            &format!("http://{addr}"),
            "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M",
        ],
    );
    let is_kitchen_call = |c: &Value| {
        c["name"] == "turn_on"
            && c["arguments"]["name"]
                .as_str()
                .is_some_and(|n| n.contains("kitchen"))
    };
    for api in ["openai", "openai_stream", "ollama"] {
        let calls = out[api]["calls"].as_array().expect("calls");
        assert_eq!(calls.len(), 1, "{api}: {out}");
        assert!(is_kitchen_call(&calls[0]), "{api}: {out}");
    }
    assert_eq!(out["openai"]["finish_reason"], "tool_calls", "{out}");
    assert_eq!(out["openai"]["content"], Value::Null, "{out}");
    assert!(out["openai"]["calls"][0]["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("call_")));
    assert_eq!(out["openai_stream"]["finish_reason"], "tool_calls");
    assert_eq!(
        out["openai_stream"]["content"], "",
        "the call is not streamed as text"
    );
    // The call and its result are in the next prompt (the template renders them: see
    // qwen::chat_template_renders_tools_and_tool_turns_as_hugging_face), and the model answers,
    // in words or (this small model, greedily) by calling again.
    let after = &out["openai_after_tool"];
    let asked = out["openai"]["prompt_tokens"].as_u64().expect("tokens");
    assert!(
        after["prompt_tokens"].as_u64().expect("tokens") > asked + 20,
        "{out}"
    );
    assert!(
        after["content"].as_str().is_some_and(|c| !c.is_empty())
            || after["calls"].as_u64() > Some(0),
        "{out}"
    );
}

/// Reads `data:` events of a server-sent stream until `n` content chunks came; their count.
fn read_events(r: &mut BufReader<TcpStream>, n: usize) -> usize {
    let mut head = String::new();
    while head != "\r\n" {
        head.clear();
        r.read_line(&mut head).expect("head");
    }
    let mut got = 0;
    let mut line = String::new();
    while got < n {
        line.clear();
        r.read_line(&mut line).expect("line");
        if line.contains("\"content\":") && !line.contains("\"content\":\"\"") {
            got += 1;
        }
    }
    got
}

/// Waits until nothing runs; the status then.
fn idle(d: &TestDaemon) -> Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let s = d.status();
        if s["queue"]["running"].is_null() && s["queue"]["depth"] == 0 {
            return s;
        }
        assert!(Instant::now() < until, "still busy: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that goes away mid-stream, or while its request runs unstreamed, has the request
/// cancelled; a streamed one within one token of what the daemon had sent when it saw the
/// hang-up.
#[test]
fn a_client_that_disconnects_cancels_its_request() {
    let (d, addr) = start(
        "http-disconnect",
        &default_model(),
        "[model]\nn_ctx = 2048\n[limits]\nmax_tokens = 2000\n",
    );
    let long = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "Tell me a story."}],
               "max_tokens": 2000, "ignore_eos": true, "temperature": 0, "stream": stream})
        .to_string()
    };
    // Streamed: read 5 tokens, hang up.
    let before = idle(&d)["requests"].clone();
    let mut s = TcpStream::connect(addr).expect("connect");
    send(
        &mut s,
        "POST",
        "/v1/chat/completions",
        &[],
        long(true).as_bytes(),
    );
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let read = read_events(&mut r, 5);
    drop(r);
    drop(s);
    let after = idle(&d)["requests"].clone();
    assert_eq!(
        after["cancelled"].as_u64(),
        before["cancelled"].as_u64().map(|c| c + 1),
        "{after}"
    );
    let generated = after["completion_tokens"].as_u64().unwrap_or(0)
        - before["completion_tokens"].as_u64().unwrap_or(0);
    assert!(
        generated >= read as u64,
        "read {read}, {generated} generated"
    );
    // The daemon logs how many tokens the engine had sent when it saw the hang-up: at most the
    // one in progress then follows.
    let log = d.log();
    let seen: u64 = log
        .lines()
        .find(|l| l.contains("client went away") && l.contains("http-1"))
        .and_then(|l| l.split("tokens=").nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no hang-up line with tokens=: {log}"));
    assert!(
        seen >= read as u64 && generated <= seen + 1,
        "read {read}, {seen} sent when the hang-up was seen, {generated} generated"
    );
    assert!(d.log().contains("client went away"), "{}", d.log());

    // Not streamed: the request runs, the client hangs up, the request is cancelled.
    let mut s = TcpStream::connect(addr).expect("connect");
    send(
        &mut s,
        "POST",
        "/v1/chat/completions",
        &[],
        long(false).as_bytes(),
    );
    let until = Instant::now() + Duration::from_secs(10);
    while d.status()["queue"]["running"].is_null() {
        assert!(Instant::now() < until, "never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    drop(s);
    let after2 = idle(&d)["requests"].clone();
    assert_eq!(
        after2["cancelled"].as_u64(),
        after["cancelled"].as_u64().map(|c| c + 1),
        "{after2}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// Bodies over the limit, malformed JSON, wrong fields, routes and methods, slow bodies and
/// connections over the limit are answered (4xx/503 JSON naming the field or the limit);
/// `/metrics` counts what ran.
#[test]
fn limits_errors_and_metrics() {
    let (d, addr) = start(
        "http-limits",
        &default_model(),
        "max_body_bytes = 4096\nrequest_timeout_ms = 1000\nmax_connections = 3\nmodel_aliases = [\"llama3.2\"]\n",
    );
    let big = json!({"prompt": "x".repeat(5000)});
    let r = post(addr, "/v1/completions", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("4096") && m.contains("http.max_body_bytes")));
    let r = request(addr, "POST", "/api/chat", &[], b"{\"model\": ");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|m| m.contains("malformed JSON")));
    let r = post(addr, "/v1/chat/completions", &json!({"messages": "hi"}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "messages", "{}", r.text());
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}),
    );
    assert_eq!((r.status, &r.json()["error"]["param"]), (400, &json!("n")));
    let r = post(
        addr,
        "/api/chat",
        &json!({"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}],
                "stream": false, "options": {"num_predict": 3, "num_ctx": 8192}}),
    );
    assert_eq!(
        r.status,
        200,
        "an alias, and num_ctx beyond the window: {}",
        r.text()
    );
    assert_eq!(r.json()["model"], "llama3.2:latest");
    assert_eq!(r.json()["eval_count"], 3);
    let r = post(
        addr,
        "/api/generate",
        &json!({"model": "llama3.2", "prompt": "hi", "format": "json"}),
    );
    assert_eq!(
        (r.status, r.json()["error"].as_str().is_some()),
        (400, true)
    );
    let r = request(addr, "GET", "/v1/chat/completions", &[], b"");
    assert_eq!(r.status, 405);
    let r = request(addr, "GET", "/nope", &[], b"");
    assert_eq!((r.status, r.json()["error"].is_string()), (404, true));
    let r = request(addr, "GET", "/v1/models/gpt-4", &[], b"");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    // A body that does not arrive within the request timeout.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"POST /api/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"mo")
        .expect("write");
    let t = Instant::now();
    let r = read_response(&mut BufReader::new(s)).expect("answered");
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(5));
    // Connections beyond http.max_connections: 503 at once (after the ones above have closed).
    std::thread::sleep(Duration::from_millis(300));
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(addr).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut text = String::new();
    let _ = extra.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("http.max_connections"), "{text}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    // Metrics: the request that ran is counted, with its latencies.
    let r = request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let m = r.text();
    for line in [
        "edgellm_requests_total{outcome=\"completed\"} 1",
        "edgellm_completion_tokens_total 3",
        "edgellm_time_to_first_token_seconds_count 1",
        "edgellm_time_per_output_token_seconds_count 2",
        "edgellm_queue_depth 0",
        "edgellm_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line:?} not in\n{m}");
    }
    assert!(m.contains("edgellm_resident_memory_bytes "), "{m}");
    assert!(m.contains("edgellm_kv_cache_fill_ratio "), "{m}");
    let s = d.status();
    assert_eq!(
        s["requests"]["received"], 1,
        "only the valid one reached the queue: {s}"
    );
}

/// The config refuses a listener other machines can reach without an API key, and the daemon
/// refuses a port in use before loading the model.
#[test]
fn open_listeners_need_a_key_and_busy_ports_are_refused() {
    let dir = temp_dir("http-config");
    let config = dir.join("c.toml");
    std::fs::write(&config, "[http]\nlisten = [\"0.0.0.0:11434\"]\n").expect("write");
    let (_, err, code) = crate::common::edgellm_with_env(
        &["serve", "--config", config.to_str().expect("utf-8")],
        &[],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("http.listen") && err.contains("api_key"),
        "{err}"
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let (_, err, code) = crate::common::edgellm_with_env(
        &[
            "serve",
            "--socket",
            dir.join("s.sock").to_str().expect("utf-8"),
            "--model",
            default_model().to_str().expect("utf-8"),
            "--http",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

/// The README's curl examples, run as written against a daemon on the port they name.
#[test]
fn readme_curl_examples_run() {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("README");
    let mut examples = Vec::new();
    let mut block: Option<String> = None;
    for line in readme.lines() {
        match (&mut block, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => block = Some(String::new()),
            (Some(b), l) if l.starts_with("```") => {
                if b.contains("curl") && b.contains("localhost:11434") {
                    examples.push(b.clone());
                }
                block = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    assert!(examples.len() >= 4, "{} curl examples", examples.len());
    // The examples name port 11434; the test's daemon takes it only if it is free here.
    let port = free_port();
    let d = TestDaemon::start(
        "http-readme",
        &crate::qwen::qwen_model(),
        &format!("[http]\nlisten = [\"127.0.0.1:{port}\"]\n[model]\nn_ctx = 512\n"),
        &[],
    );
    for ex in &examples {
        let script = ex.replace("localhost:11434", &format!("localhost:{port}"));
        let out = Command::new("bash")
            .args(["-eo", "pipefail", "-c", &script])
            .output()
            .expect("bash");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{script}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Each prints JSON (a document, lines of it, or server-sent events of it), no error.
        let first = stdout
            .lines()
            .map(|l| l.strip_prefix("data: ").unwrap_or(l))
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let v: Value = serde_json::Deserializer::from_str(first)
            .into_iter()
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("{script}: not JSON: {stdout}"));
        assert!(
            v.get("error").is_none() && !stdout.contains("\"error\""),
            "{script}: {stdout}"
        );
        if script.contains("/metrics") {
            assert!(
                stdout.contains("edgellm_queue_depth 0"),
                "{script}: {stdout}"
            );
        }
    }
    drop(d);
}

/// Bodies of every generate endpoint, the corpus the mutator starts from.
fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    [
        (
            "/v1/chat/completions",
            json!({"model": "synth", "messages": [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": -3,
                "stream": true, "stream_options": {"include_usage": true},
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                "tool_choice": "auto"}),
        ),
        (
            "/v1/completions",
            json!({"prompt": ["Once"], "max_tokens": 2, "stop": "x", "n": 1, "logprobs": null}),
        ),
        (
            "/api/chat",
            json!({"model": "synth:latest", "messages": [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
                {"role": "tool", "content": "{}"}],
                "stream": false, "keep_alive": "5m",
                "options": {"num_predict": 2, "temperature": 0, "top_k": 3, "num_ctx": 64, "stop": ["a"]}}),
        ),
        (
            "/api/generate",
            json!({"model": "synth", "prompt": "hi", "system": "s", "raw": false,
                   "options": {"num_predict": 1, "seed": 7, "repeat_last_n": -1}}),
        ),
        ("/api/show", json!({"model": "synth"})),
    ]
    .into_iter()
    .map(|(p, v)| (p, v.to_string().into_bytes()))
    .collect()
}

/// Mutated JSON bodies on every endpoint, over one keep-alive connection: each is answered
/// with a status and a JSON body (never a dropped connection, never a 5xx, never a panic).
#[test]
fn mutated_bodies_are_answered() {
    let dir = temp_dir("http-fuzz-model");
    let model = synth_file(&dir, &SynthSpec::default());
    let (d, addr) = start(
        "http-fuzz",
        &model,
        "model_aliases = [\"synth\"]\n[limits]\nmax_tokens = 2\ndefault_max_tokens = 2\n",
    );
    let corpus = bodies();
    let n = (cases() / 10).max(1);
    let connect = || {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        (s.try_clone().expect("clone"), BufReader::new(s))
    };
    let (mut w, mut r) = connect();
    let (mut ok, mut refused) = (0, 0);
    let t = Instant::now();
    for seed in first_seed()..first_seed() + n {
        let mut rng = Rng::new(seed);
        let (path, body) = &corpus[(rng.next_u64() as usize) % corpus.len()];
        let mut body = body.clone();
        mutate_request(&mut body, &mut rng);
        send(&mut w, "POST", path, &[], &body);
        let resp = read_response(&mut r).unwrap_or_else(|| {
            panic!(
                "seed {seed}: {path} dropped the connection on {:?}",
                String::from_utf8_lossy(&body)
            )
        });
        assert!(
            resp.status < 500,
            "seed {seed}: {path} answered {} to {:?}: {}",
            resp.status,
            String::from_utf8_lossy(&body),
            resp.text()
        );
        if resp.status == 200 {
            ok += 1;
        } else {
            refused += 1;
            assert!(
                resp.json()["error"].is_object() || resp.json()["error"].is_string(),
                "seed {seed}: {}",
                resp.text()
            );
        }
        if resp.head.to_ascii_lowercase().contains("connection: close") {
            (w, r) = connect();
        }
    }
    assert!(ok > 0 && refused > 0, "{ok} {refused}");
    assert!(!d.log().contains("panicked"), "{}", d.log());
    eprintln!(
        "fuzz http: {n} bodies, {ok} answered, {refused} refused, {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// SIGTERM with a stream in flight: new connections are refused, the stream runs to its end
/// (`[DONE]`) within the grace period, and the daemon exits 0.
#[test]
fn a_stream_in_flight_at_shutdown_ends_whole() {
    let (mut d, addr) = start("http-shutdown", &default_model(), "[model]\nn_ctx = 1024\n");
    let mut s = TcpStream::connect(addr).expect("connect");
    let body = json!({"messages": [{"role": "user", "content": "Tell me a story."}],
                      "max_tokens": 300, "ignore_eos": true, "stream": true});
    send(
        &mut s,
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string().as_bytes(),
    );
    let mut r = BufReader::new(s);
    read_events(&mut r, 3);
    let status = d.wait_exit_after(nix::sys::signal::Signal::SIGTERM);
    let mut rest = String::new();
    r.read_to_string(&mut rest).expect("read the rest");
    // The raw chunked body: the finish, the end of the events, the end of the body.
    let tail = &rest[rest.len().saturating_sub(600)..];
    assert!(rest.contains("\"finish_reason\":\"length\""), "{tail}");
    assert!(tail.contains("data: [DONE]"), "{tail}");
    assert!(rest.ends_with("\r\n0\r\n\r\n"), "{tail}");
    assert!(status.success(), "{status}: {}", d.log());
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}
