//! Config, protocol, queue and engine worker, in-process.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use edgellm::api::{FinishReason, GenerateRequest, Prompt};
use edgellm::backend::cpu::CpuBackend;
use edgellm::backend::{Backend, BackendError, BackendInfo, Vocabulary};
use edgellm::config::{Config, ConfigError, DEFAULT_TOML};
use edgellm::daemon::budget::{budget, cgroup_limit, Limit};
use edgellm::daemon::notify::Notifier;
use edgellm::daemon::{Daemon, Listener};
use edgellm::engine::chat::ChatTemplate;
use edgellm::engine::tokenizer::Tokenizer;
use edgellm::engine::{Engine, Sink};
use edgellm::gguf::{Bytes, Gguf};
use edgellm_testkit::{synth_model, SynthSpec};

use super::harness::Client;
use crate::common::{synth_backend, temp_dir};

fn parse_err(text: &str) -> String {
    match Config::parse(text, Path::new("test.toml")) {
        Ok(c) => panic!("accepted {text:?}: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// The shipped default file and the code's defaults are the same config, and every kind of
/// mistake is refused with the key, the value and what is allowed.
#[test]
fn config_defaults_are_the_documented_file_and_errors_name_the_key() {
    let parsed = Config::parse(DEFAULT_TOML, Path::new("/etc/edgellm/edgellm.toml"))
        .expect("default config parses");
    assert_eq!(parsed, Config::default());

    let e = parse_err("[queue]\ncapacty = 3\n");
    assert!(e.contains("capacty") && e.contains("capacity"), "{e}");
    let e = parse_err("[queue]\ncapacity = \"lots\"\n");
    assert!(e.contains("capacity") && e.contains("lots"), "{e}");
    let e = parse_err("[queue]\ncapacity = 0\n");
    assert!(e.contains("queue.capacity = 0: allowed 1..=4096"), "{e}");
    let e = parse_err("[socket]\nmode = \"0999\"\n");
    assert!(
        e.contains("socket.mode = \"0999\"") && e.contains("octal"),
        "{e}"
    );
    let e = parse_err("[limits]\ndefault_max_tokens = 2000\n");
    assert!(e.contains("limits.default_max_tokens = 2000"), "{e}");
    let e = parse_err("[model]\nkernels = \"fast\"\n");
    assert!(
        e.contains("kernels = \"fast\"") && e.contains("neon-dotprod"),
        "{e}"
    );
    let e = parse_err(&format!("[socket]\npath = \"/{}\"\n", "x".repeat(120)));
    assert!(e.contains("socket.path") && e.contains("107"), "{e}");
    let e = parse_err("[mqt]\nurl = \"x\"\n");
    assert!(e.contains("mqt"), "{e}");
    let e = parse_err("[mqtt]\nurl = \"http://x\"\n");
    assert!(e.contains("mqtt.url = \"http://x\""), "{e}");
    let e = parse_err("[mqtt]\npassword = \"a\"\npassword_env = \"B\"\n");
    assert!(e.contains("at most one"), "{e}");
    let e = parse_err("[mqtt]\ngroup = \"kitchen/+\"\n");
    assert!(e.contains("mqtt.group = \"kitchen/+\""), "{e}");
    let e = parse_err("[mqtt]\ngroup = \"kitchen\"\nprotocol = 3\n");
    assert!(
        e.contains("mqtt.group") && e.contains("protocol = 5"),
        "{e}"
    );
    assert!(matches!(
        Config::parse("[queue]\ncapacity = 0\n", Path::new("x")),
        Err(ConfigError::Invalid { .. })
    ));

    // A partial file keeps the other defaults; relative paths are taken from its directory.
    let c = Config::parse(
        "[queue]\ncapacity = 3\n[socket]\npath = \"run/e.sock\"\n",
        Path::new("/etc/edgellm/edgellm.toml"),
    )
    .expect("partial config");
    assert_eq!(c.queue.capacity, 3);
    assert_eq!(c.limits, Config::default().limits);
    assert_eq!(c.socket.path, Path::new("/etc/edgellm/run/e.sock"));
}

/// A sink whose cancel flag is raised at its `n`-th check (the engine checks once per prefill
/// chunk and once before each token).
struct CancelAt {
    n: usize,
    checks: usize,
}

impl Sink for CancelAt {
    fn text(&mut self, _: &str) {}
    fn interrupt(&mut self) -> Option<FinishReason> {
        self.checks += 1;
        (self.checks >= self.n).then_some(FinishReason::Cancelled)
    }
}

fn synth_engine(spec: &SynthSpec) -> (Engine, Box<dyn Backend>) {
    let bytes = synth_model(spec);
    let g = Gguf::parse(Bytes::from_vec(bytes)).expect("parse");
    let tokenizer = Tokenizer::from_gguf(&g, None).expect("tokenizer");
    let chat = ChatTemplate::new(None, "", "").expect("template");
    let backend = Box::new(synth_backend(spec, None, 1));
    let engine = Engine::new(Box::new(synth_backend(spec, None, 1)), tokenizer, chat);
    (engine, backend)
}

/// The engine asks the sink before every token: a cancel lands within one token.
#[test]
fn cancel_stops_generation_within_one_token() {
    let (mut engine, _) = synth_engine(&SynthSpec::default());
    for n in [1, 2, 6, 21] {
        let mut req = GenerateRequest::new(Prompt::Raw("abc".into()));
        req.max_tokens = 100;
        req.ignore_eos = true;
        let mut sink = CancelAt { n, checks: 0 };
        let c = engine.generate(&req, &mut sink).expect("generate");
        assert_eq!(c.finish_reason, FinishReason::Cancelled);
        // One check before the single prefill chunk, then one before each token: raised at
        // check n, no token after it is generated.
        assert_eq!(
            c.usage.completion_tokens,
            n.saturating_sub(2),
            "cancel at check {n}"
        );
    }
}

/// A backend that blocks in `forward` while `wedged` is set: an engine stuck in a kernel.
struct Wedge {
    inner: Box<dyn Backend>,
    wedged: Arc<AtomicBool>,
}

impl Backend for Wedge {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn vocabulary(&self) -> Vocabulary<'_> {
        self.inner.vocabulary()
    }
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
    }
    fn n_ctx(&self) -> usize {
        self.inner.n_ctx()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn shift(&mut self, keep: usize, discard: usize, len: usize) -> Result<(), BackendError> {
        self.inner.shift(keep, discard, len)
    }
    fn saved_bytes(&self, len: usize) -> usize {
        self.inner.saved_bytes(len)
    }
    fn save(&self, len: usize, out: &mut Vec<u8>) -> Result<(), BackendError> {
        self.inner.save(len, out)
    }
    fn load(&mut self, len: usize, data: &[u8]) -> Result<(), BackendError> {
        self.inner.load(len, data)
    }
    fn forward(&mut self, t: &[u32], pos: usize, all: bool) -> Result<&[f32], BackendError> {
        while self.wedged.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.inner.forward(t, pos, all)
    }
}

/// `WATCHDOG=1` is sent while the engine loop beats, stops while it is wedged (so systemd
/// would restart the service), and comes back when it moves again.
#[test]
fn wedged_engine_stops_the_watchdog_pings() {
    let dir = temp_dir("daemon-wedge");
    let spec = SynthSpec::default();
    let (engine, inner) = synth_engine(&spec);
    let wedged = Arc::new(AtomicBool::new(false));
    let Engine {
        tokenizer, chat, ..
    } = engine;
    let engine = Engine::new(
        Box::new(Wedge {
            inner,
            wedged: wedged.clone(),
        }),
        tokenizer,
        chat,
    );
    let notify_path = dir.join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind");
    notify
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let sock = dir.join("s.sock");
    let mut config = Config::default();
    config.socket.path = sock.clone();
    config.shutdown.grace_ms = 100;
    let g = Gguf::parse(Bytes::from_vec(synth_model(&spec))).expect("parses");
    let plan = CpuBackend::plan(&g, &Default::default()).expect("plan");
    let listener = edgellm::frontend::unix::bind(&sock, 0o600, None).expect("bind");
    let daemon = Daemon {
        config,
        engine,
        listener: Listener {
            socket: listener,
            owned_path: Some(sock.clone()),
        },
        notifier: Notifier::to_socket(
            notify_path.to_str().expect("utf-8"),
            Some(Duration::from_millis(500)),
        )
        .expect("notifier"),
        model: "synth".into(),
        mqtt: None,
        http: None,
        budget: budget(&plan, 0, 0, None),
        fallback_reason: None,
        fallback: None,
        model_file: None,
        reload: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        daemon.run(async {
            let _ = stop_rx.await;
        })
    });
    // Counts WATCHDOG=1 datagrams over `span`.
    let pings = |span: Duration| {
        let until = Instant::now() + span;
        let mut n = 0;
        let mut buf = [0u8; 512];
        while Instant::now() < until {
            if let Ok(k) = notify.recv(&mut buf) {
                if buf[..k].starts_with(b"WATCHDOG=1") {
                    n += 1;
                }
            }
        }
        n
    };
    assert!(pings(Duration::from_millis(1000)) >= 3, "pings while idle");

    wedged.store(true, Ordering::Relaxed);
    let mut c = Client::connect(&sock);
    c.send(&json!({"id": "w", "prompt": "abc", "max_tokens": 4}));
    // Pings already sent before the engine's heartbeat went stale are read and dropped here.
    pings(Duration::from_millis(600));
    assert_eq!(pings(Duration::from_millis(1000)), 0, "pings while wedged");

    wedged.store(false, Ordering::Relaxed);
    let mut others = Vec::new();
    let (done, _) = c.until_terminal("w", &mut others);
    assert_eq!(done["type"], "done", "{done}");
    assert!(
        pings(Duration::from_millis(900)) >= 2,
        "pings after recovery"
    );

    let _ = stop_tx.send(());
    server.join().expect("join").expect("daemon run");
    assert!(!sock.exists(), "socket removed on exit");
}

/// The cgroup limit is the smallest `memory.max` (v2) or `memory.limit_in_bytes` (v1) from the
/// process's cgroup up to the mount; "max" and v1's unlimited value are no limit.
#[test]
fn cgroup_limit_is_the_smallest_on_the_way_up() {
    let root = temp_dir("cgroup-tree");
    let write = |rel: &str, name: &str, v: &str| {
        let d = root.join(rel);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join(name), v).expect("write");
    };
    write("system.slice", "memory.max", "300000000\n");
    write("system.slice/edgellm.service", "memory.max", "max\n");
    let l = cgroup_limit("0::/system.slice/edgellm.service\n", &root).expect("a limit");
    assert_eq!(l.bytes, 300_000_000);
    assert!(l.source.contains("system.slice/memory.max"), "{}", l.source);
    write("system.slice/edgellm.service", "memory.max", "200000000\n");
    let l = cgroup_limit("0::/system.slice/edgellm.service\n", &root).expect("a limit");
    assert_eq!(l.bytes, 200_000_000);
    assert_eq!(cgroup_limit("0::/elsewhere\n", &root), None);

    write(
        "memory/box",
        "memory.limit_in_bytes",
        "9223372036854771712\n",
    );
    assert_eq!(cgroup_limit("4:memory:/box\n0::/\n", &root), None);
    write("memory/box/inner", "memory.limit_in_bytes", "150000000\n");
    let l = cgroup_limit("5:cpu:/\n4:memory:/box/inner\n", &root).expect("v1 limit");
    assert_eq!(l.bytes, 150_000_000);
}

/// Over budget is refused with each part and the limit in MiB; the tighter of the config's
/// and the cgroup's limits applies.
#[test]
fn memory_budget_names_each_part_and_the_limit() {
    let g = Gguf::parse(Bytes::from_vec(synth_model(&SynthSpec::default()))).expect("parses");
    let plan = CpuBackend::plan(&g, &Default::default()).expect("plan");
    let fits = budget(&plan, 1 << 20, 1 << 30, None);
    assert!(fits.check().is_ok());
    assert_eq!(
        fits.total,
        plan.weights + plan.kv_cache + plan.scratch + (1 << 20) + fits.runtime
    );
    let cg = Limit {
        bytes: 10 << 20,
        source: "cgroup /x/memory.max".into(),
    };
    let over = budget(&plan, 1 << 20, 1 << 30, Some(cg));
    let e = over.check().expect_err("over the cgroup limit");
    for part in [
        "weights",
        "KV cache",
        "scratch",
        "sessions 1.0 MiB",
        "runtime",
    ] {
        assert!(e.contains(part), "{part} missing: {e}");
    }
    assert!(
        e.contains("limit of 10.0 MiB (cgroup /x/memory.max)"),
        "{e}"
    );
    let own = budget(&plan, 0, 5 << 20, Some(over.limit.clone().expect("limit")));
    let e = own.check().expect_err("over the config limit");
    assert!(e.contains("(memory.max_bytes)"), "{e}");
}

/// Socket peers by name or number: names are looked up when the config is read (the board
/// example config names its group instead of hard-coding a gid); an unknown name is an error
/// naming the key and the name.
#[test]
fn socket_peers_by_name_or_number() {
    let c = Config::parse(
        "[socket]\nallowed_uids = [\"root\", 1000]\nallowed_gids = [\"root\", 7]\nadmin_gids = [\"root\"]\n",
        Path::new("x"),
    )
    .expect("parses");
    assert_eq!(c.socket.allowed_uids, vec![0, 1000]);
    assert_eq!(c.socket.allowed_gids, vec![0, 7]);
    assert_eq!(c.socket.admin_gids, vec![0]);
    let e = parse_err("[socket]\nallowed_gids = [\"no-such-group-here\"]\n");
    assert!(
        e.contains("allowed_gids") && e.contains("no group named \"no-such-group-here\""),
        "{e}"
    );
    let e = parse_err("[socket]\nadmin_uids = [\"no-such-user-here\"]\n");
    assert!(
        e.contains("admin_uids") && e.contains("no user named"),
        "{e}"
    );
    let e = parse_err("[socket]\nallowed_uids = [-1]\n");
    assert!(e.contains("allowed_uids"), "{e}");
}
