//! `edgellm serve`: config, then socket (a live daemon refused before the model loads), model,
//! warm-up, and the daemon until a signal. Also the config → load spec → memory budget steps
//! that `info` shares.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use edgellm::backend::cpu::CpuOptions;
use edgellm::backend::ort::OrtOptions;
use edgellm::backend::{self, is_onnx_dir, BackendChoice, LoadSpec};
use edgellm::config::{Config, ConfigError};
use edgellm::daemon::budget::{self, own_cgroup_limit, Budget};
use edgellm::daemon::notify::Notifier;
use edgellm::daemon::{guard, Daemon, Listener, Reload};
use edgellm::engine::{worker, Engine, Window};
use edgellm::frontend::{http, mqtt, unix};

use super::{file_name, init_logging, model_path, UsageError};

#[derive(Args)]
pub struct ServeArgs {
    /// Config file (TOML); default: the embedded defaults (edgellm config --print-default)
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Socket path (overrides socket.path)
    #[arg(long)]
    socket: Option<PathBuf>,
    /// GGUF model file (overrides model.path), or an ONNX model folder (overrides model.onnx)
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Overrides model.backend
    #[arg(long, value_enum)]
    backend: Option<BackendChoice>,
    /// Serve MQTT too: mqtt://[user[:pass]@]host:port or mqtts://… (overrides mqtt.url)
    #[arg(long)]
    mqtt: Option<String>,
    /// MQTT node id in the topics (overrides mqtt.node)
    #[arg(long)]
    node: Option<String>,
    /// MQTT fleet group: also take requests sent to the group (overrides mqtt.group)
    #[arg(long)]
    group: Option<String>,
    /// Serve the HTTP API (OpenAI and Ollama) on ADDR: host:port or unix:/path; repeatable
    /// (overrides http.listen)
    #[arg(long, value_name = "ADDR")]
    http: Vec<String>,
    /// Print the memory budget (weights, KV cache, scratch, sessions) and its limit, and
    /// exit: 0 when it fits, 1 when it does not
    #[arg(long)]
    check: bool,
}

/// What the daemon's config asks to load.
pub fn spec_from_config(cfg: &Config) -> Result<LoadSpec> {
    let mut spec = LoadSpec {
        choice: cfg.model.backend,
        gguf: None,
        onnx: cfg.model.onnx.clone(),
        cpu: CpuOptions {
            n_ctx: cfg.model.n_ctx,
            threads: cfg.model.threads,
            kernels: cfg.model.kernels.kind(),
            kv_type: cfg.model.kv_type,
            // Generation reads the last token's logits only.
            logit_rows: 1,
            ..Default::default()
        },
        ort: OrtOptions {
            library: cfg.ort.library.clone(),
            providers: cfg.ort.providers.clone(),
            provider_options: cfg.ort.provider_options.clone(),
            ep_libraries: cfg.ort.ep_libraries.clone(),
            threads: cfg.model.threads,
            n_ctx: cfg.model.n_ctx,
            max_batch: cfg.ort.max_batch,
        },
    };
    // The GGUF runs the int4 engine, and is the fallback of ONNX Runtime when it is at hand.
    spec.gguf = if spec.wants_ort() {
        model_path(cfg.model.path.as_deref()).ok()
    } else {
        Some(model_path(cfg.model.path.as_deref())?)
    };
    Ok(spec)
}

/// The memory budget of what `spec` will start, under the config's limits.
pub fn budget_for(spec: &LoadSpec, cfg: &Config) -> Result<Budget> {
    let plan = backend::plan(spec).with_context(|| {
        let shown = spec.model_path().unwrap_or(std::path::Path::new(""));
        format!("loading {}", shown.display())
    })?;
    Ok(budget::budget(
        &plan,
        session_bytes(cfg),
        cfg.memory.max_bytes,
        own_cgroup_limit(),
    ))
}

/// `--model` on `serve` and `info`: a folder is the ONNX model, a file the GGUF.
pub fn set_model(cfg: &mut Config, model: Option<PathBuf>) -> anyhow::Result<()> {
    match model.map(|m| model_path(Some(&m))).transpose()? {
        Some(m) if is_onnx_dir(&m) => cfg.model.onnx = Some(m),
        Some(m) => cfg.model.path = Some(m),
        None => {}
    }
    Ok(())
}

/// Bytes the session store may take, as the memory budget counts them (0 when sessions are off).
fn session_bytes(cfg: &Config) -> u64 {
    if cfg.sessions.max_count == 0 {
        0
    } else {
        cfg.sessions.max_bytes
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let as_loaded = cfg.clone();
    if let Some(s) = a.socket {
        cfg.socket.path = s;
    }
    set_model(&mut cfg, a.model)?;
    if let Some(b) = a.backend {
        cfg.model.backend = b;
    }
    if let Some(u) = a.mqtt {
        cfg.mqtt.enabled = true;
        cfg.mqtt.url = u;
    }
    if let Some(n) = a.node {
        cfg.mqtt.node = n;
    }
    if let Some(g) = a.group {
        cfg.mqtt.group = g;
    }
    if !a.http.is_empty() {
        cfg.http.listen = a.http;
    }
    cfg.validate().map_err(|message| ConfigError::Invalid {
        path: a
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("command line")),
        message,
    })?;
    let set_log_filter = init_logging(&cfg.log.filter);
    let mqtt = if cfg.mqtt.enabled {
        Some(mqtt::Settings::from_config(
            &cfg.mqtt,
            cfg.limits.max_line_bytes,
            cfg.queue.capacity,
        )?)
    } else {
        None
    };
    let spec = spec_from_config(&cfg)?;
    let mut budget = budget_for(&spec, &cfg)?;
    if a.check {
        println!("{}", serde_json::to_string_pretty(&budget)?);
        eprintln!("{}", budget.summary());
        budget.check().map_err(anyhow::Error::msg)?;
        return Ok(());
    }
    budget.check().map_err(anyhow::Error::msg)?;
    tracing::info!("{}", budget.summary());
    let activated = unix::from_systemd()?;
    if activated.is_none() {
        unix::claim_path(&cfg.socket.path)?;
    }
    // Bound before the model loads: a port in use is refused at once.
    let http_settings = http::Settings::from_config(&cfg.http)?;
    let http_bound = http::bind(
        &http_settings.listen,
        cfg.socket_mode().map_err(UsageError)?,
        cfg.socket.group.as_deref(),
    )?;
    let shown = spec.model_path().map(PathBuf::from).unwrap_or_default();
    tracing::info!(model = %shown.display(), backend = ?cfg.model.backend, "loading the model");
    let opened = backend::open(&spec).with_context(|| format!("loading {}", shown.display()))?;
    let fallback_reason = opened.fallback;
    if fallback_reason.is_some() {
        // The int4 engine took over: its budget is the one that holds now.
        budget = budget::budget(
            &backend::cpu_plan(&spec)?,
            session_bytes(&cfg),
            cfg.memory.max_bytes,
            own_cgroup_limit(),
        );
        budget.check().map_err(anyhow::Error::msg)?;
        tracing::info!("{}", budget.summary());
    }
    // The int4 engine's GGUF is mapped: guarded against changes in place.
    let mapped = match opened.backend.vocabulary() {
        edgellm::backend::Vocabulary::Gguf { gguf, .. } => gguf.mapped_range(),
        _ => None,
    };
    let model_file = mapped.and_then(|_| guard::ModelFile::new(&opened.path));
    if model_file.is_some() {
        guard::install_sigbus_handler(&opened.path, mapped)
            .context("installing the SIGBUS handler")?;
    }
    let about = about_model(&opened.path, opened.backend.vocabulary());
    let mut engine = Engine::from_backend(opened.backend)
        .with_context(|| format!("loading {}", opened.path.display()))?;
    let n_ctx = engine.backend.n_ctx();
    let window = Window::new(n_ctx, cfg.model.n_sink, cfg.model.n_discard);
    if window.is_none() {
        tracing::warn!(
            n_ctx,
            "the window is too small to slide: generations stop with finish_reason length when it is full"
        );
    }
    engine.set_window(window);
    engine.set_sessions(cfg.sessions.max_count, cfg.sessions.max_bytes);
    // Should ONNX Runtime fail while running, the int4 engine takes over (when there is a GGUF).
    let fallback: Option<worker::Fallback> =
        match (engine.backend.info().backend == "ort", spec.gguf.is_some()) {
            (true, true) => {
                let spec = spec.clone();
                Some(Box::new(move || {
                    Engine::from_backend(backend::open_cpu(&spec)?.backend)
                }))
            }
            _ => None,
        };
    let listener = match activated {
        Some(socket) => {
            tracing::info!("listening on the socket passed by systemd");
            Listener {
                socket,
                owned_path: None,
            }
        }
        None => {
            let mode = cfg.socket_mode().map_err(UsageError)?;
            let socket = unix::bind(&cfg.socket.path, mode, cfg.socket.group.as_deref())?;
            tracing::info!(socket = %cfg.socket.path.display(), "listening");
            Listener {
                socket,
                owned_path: Some(cfg.socket.path.clone()),
            }
        }
    };
    let http = if http_bound.is_empty() {
        None
    } else {
        let info = engine.backend.info();
        let mut s = http_settings;
        s.model = http::ModelCard {
            n_ctx: info.n_ctx,
            template: engine.chat.source.clone(),
            tools: engine.chat.takes_tools(),
            quantization: about.quantization.unwrap_or_else(|| {
                // The most common tensor type.
                info.tensor_types
                    .iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(t, _)| t.clone())
                    .unwrap_or_default()
            }),
            ..about.card
        };
        s.model.aliases = cfg.http.model_aliases.clone();
        for b in &http_bound {
            tracing::info!(api = %b.describe(), model = %s.model.name, "serving HTTP");
        }
        Some((http_bound, s))
    };
    let mut daemon = Daemon {
        model: file_name(&opened.path),
        config: cfg,
        engine,
        fallback_reason,
        fallback,
        listener,
        notifier: Notifier::from_env(),
        mqtt,
        http,
        budget,
        model_file,
        reload: a.config.map(|path| Reload {
            path,
            loaded: as_loaded,
            set_log_filter,
        }),
    };
    daemon.warm_up()?;
    daemon.run(std::future::pending())?;
    Ok(())
}

/// What the HTTP API says of a model, read off its file and metadata before the engine takes
/// the vocabulary.
struct About {
    card: http::ModelCard,
    quantization: Option<String>,
}

fn about_model(path: &std::path::Path, v: edgellm::backend::Vocabulary<'_>) -> About {
    use std::hash::{Hash, Hasher};
    let meta = std::fs::metadata(path).ok();
    let size = if path.is_dir() {
        edgellm::models::dir_bytes(path)
    } else {
        meta.as_ref().map_or(0, std::fs::Metadata::len)
    };
    let modified = meta.and_then(|m| m.modified().ok());
    let name = file_name(path);
    let name = name.strip_suffix(".gguf").unwrap_or(&name).to_string();
    // Names this file as Ollama's digests name blobs, without reading 500 MB for it.
    let digest: String = (0..4u8)
        .map(|k| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (k, &name, size, modified).hash(&mut h);
            format!("{:016x}", h.finish())
        })
        .collect();
    let (mut family, mut parameter_size, mut quantization) = (String::new(), String::new(), None);
    if let edgellm::backend::Vocabulary::Gguf { gguf, .. } = v {
        family = gguf
            .get_str("general.architecture")
            .unwrap_or("")
            .to_string();
        parameter_size = gguf.get_str("general.size_label").unwrap_or("").to_string();
        quantization = edgellm::models::file_type(gguf).map(str::to_string);
    }
    About {
        card: http::ModelCard {
            name,
            size,
            modified,
            digest,
            family,
            parameter_size,
            ..Default::default()
        },
        quantization,
    }
}
