//! The application layer: one file per `edgellm` command, each with its arguments (a clap
//! `Args` struct) and its `run`. This is the only place that uses `anyhow`: library errors are
//! typed, and here they become messages and exit codes (0 success, 1 runtime failure, 2 bad
//! usage or input, as clap uses 2 as well).

pub mod ask;
pub mod bench;
pub mod chat;
pub mod config;
pub mod docs;
pub mod export_onnx;
pub mod info;
pub mod models;
pub mod perplexity;
pub mod progress;
pub mod quantize;
pub mod serve;
pub mod status;
pub mod tokenize;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use edgellm::backend::cpu::CpuOptions;
use edgellm::backend::ort::OrtOptions;
use edgellm::backend::{self, is_onnx_dir, BackendChoice, KvType, LoadSpec, Opened, Provider};
use edgellm::config::{Config, ConfigError};
use edgellm::engine::{Engine, EngineError};
use edgellm::frontend::client::ClientError;
use edgellm::frontend::{cli, mqtt};
use edgellm::kernels::KernelChoice;

use edgellm::models::DEFAULT_MODEL;

/// Bad usage: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// An error as one line: its causes after it, each once (an error whose message already
/// quotes its source, as "reading X: No such file", does not get the source repeated).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if line.contains(&c) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&c);
    }
    line
}

/// Bad input (a bad or missing model file or config, a prompt too long, an unknown option
/// value) is 2; the rest 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    use edgellm::api::ErrorCode;
    for cause in e.chain() {
        if let Some(edgellm::daemon::DaemonError::ModelChanged(_)) =
            cause.downcast_ref::<edgellm::daemon::DaemonError>()
        {
            return edgellm::daemon::guard::EXIT_MODEL_CHANGED as u8;
        }
        let engine_error = match cause.downcast_ref::<cli::AskError>() {
            Some(cli::AskError::Engine(ee)) => Some(ee),
            _ => cause.downcast_ref::<EngineError>(),
        };
        if let Some(ee) = engine_error {
            return match ee {
                EngineError::PromptTooLong { .. }
                | EngineError::TurnTooLong { .. }
                | EngineError::EmptyPrompt
                | EngineError::BadRequest(_)
                | EngineError::Open(
                    edgellm::backend::OpenError::Model(_) | edgellm::backend::OpenError::Spec(_),
                ) => 2,
                _ => 1,
            };
        }
        if let Some(ClientError::Daemon { code, .. }) = cause.downcast_ref::<ClientError>() {
            return match code {
                ErrorCode::BadRequest | ErrorCode::TooLarge => 2,
                _ => 1,
            };
        }
        if cause
            .downcast_ref::<edgellm::kernels::KernelError>()
            .is_some()
            || cause.downcast_ref::<edgellm::gguf::GgufError>().is_some()
            || matches!(
                cause.downcast_ref::<edgellm::backend::OpenError>(),
                Some(edgellm::backend::OpenError::Model(_) | edgellm::backend::OpenError::Spec(_))
            )
            || cause
                .downcast_ref::<edgellm::backend::cpu::model::ModelError>()
                .is_some()
            || cause.downcast_ref::<UsageError>().is_some()
            || matches!(
                cause.downcast_ref::<mqtt::MqttError>(),
                Some(mqtt::MqttError::Config(_))
            )
            || matches!(
                cause.downcast_ref::<ConfigError>(),
                Some(
                    ConfigError::Parse { .. }
                        | ConfigError::Invalid { .. }
                        | ConfigError::Read { .. }
                )
            )
        {
            return 2;
        }
    }
    1
}

/// Logs at `RUST_LOG` if set, else `filter`. Under journald (`JOURNAL_STREAM` set) straight to
/// the journal with each event's priority (so `journalctl -p warning` filters), through
/// tracing-journald; elsewhere, or when the journal's socket cannot be reached, to stderr
/// (without timestamps or colours under journald, which adds its own).
pub fn init_logging(filter: &str) -> edgellm::daemon::SetLogFilter {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{reload, EnvFilter, Layer};
    let from_env = std::env::var("RUST_LOG").is_ok();
    let initial = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let (filter_layer, handle) = reload::Layer::new(initial);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let journal_layer = journald
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| l.with_syslog_identifier("edgellm".into()));
    let fmt_layer = journal_layer.is_none().then(|| {
        let ansi = !journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let l = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi);
        if journald {
            l.without_time().boxed()
        } else {
            l.boxed()
        }
    });
    let _ = tracing_subscriber::registry()
        .with(filter_layer)
        .with(journal_layer)
        .with(fmt_layer)
        .try_init();
    Box::new(move |f: &str| {
        if from_env {
            return Err("RUST_LOG is set and overrides log.filter".into());
        }
        let new = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        handle.reload(new).map_err(|e| e.to_string())
    })
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// GGUF model file, an ONNX model folder for --backend ort, or the name of one in the model
    /// directory (`edgellm models list`) (default: $EDGELLM_MODEL, then
    /// Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf in the model directory)
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// cpu (the int4 engine on a GGUF), ort (ONNX Runtime on an ONNX folder, falling back to
    /// the int4 engine on the default GGUF), auto (ort when --model is a folder)
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// --backend ort: execution providers in order of preference, comma-separated
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu")]
    pub providers: Vec<Provider>,
    /// Compute threads (default: all cores)
    #[arg(long, short = 't', default_value_t = 0)]
    pub threads: usize,
    /// Kernels (reference: exact f32)
    #[arg(long, value_enum, default_value_t = KernelChoice::Auto)]
    pub kernels: KernelChoice,
    /// KV cache element type
    #[arg(long, value_enum, default_value_t = KvType::F16)]
    pub kv_type: KvType,
    /// Leave Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 matrices in the mapping as the file has them instead of
    /// repacking them into eight-row groups at load (x86; slower; for comparison)
    #[arg(long)]
    pub no_repack: bool,
}

impl ModelArgs {
    /// What to load for these arguments: a folder is an ONNX model (the default GGUF, when
    /// present, is the fallback), a file a GGUF.
    pub fn spec(&self, n_ctx: usize, max_batch: usize) -> Result<LoadSpec> {
        let (gguf, onnx) = match &self.model {
            Some(p) => match model_path(Some(p))? {
                p if is_onnx_dir(&p) => (model_path(None).ok(), Some(p)),
                p => (Some(p), None),
            },
            None => (Some(model_path(None)?), None),
        };
        if self.backend == BackendChoice::Ort && onnx.is_none() {
            bail!(UsageError(
                "--backend ort needs --model DIR, an ONNX model folder (edgellm export-onnx writes one from a GGUF)".into()
            ));
        }
        Ok(LoadSpec {
            choice: self.backend,
            gguf,
            onnx,
            cpu: self.cpu(n_ctx, max_batch),
            ort: OrtOptions {
                providers: self.providers.clone(),
                threads: self.threads,
                n_ctx,
                ..Default::default()
            },
        })
    }

    /// CPU options for these arguments with a window of `n_ctx` tokens.
    pub fn cpu(&self, n_ctx: usize, max_batch: usize) -> CpuOptions {
        CpuOptions {
            n_ctx,
            threads: self.threads,
            kernels: self.kernels.kind(),
            max_batch,
            kv_type: self.kv_type,
            // Generation reads the last token's logits only.
            logit_rows: 1,
            repack: !self.no_repack,
        }
    }
}

/// An engine on the backend a spec opened.
pub struct Loaded {
    pub engine: Engine,
    /// Why the int4 engine runs instead of ONNX Runtime, when it does.
    pub fallback: Option<String>,
    /// The model file or folder it runs.
    pub path: PathBuf,
}

/// Opens `spec` and builds the engine on it; `doing` says what the int4 engine does when it
/// takes over from ONNX Runtime ("answering", "measuring").
pub fn open_engine(spec: &LoadSpec, doing: &str) -> Result<Loaded> {
    let shown = spec.model_path().unwrap_or(Path::new("")).display();
    let Opened {
        backend,
        fallback,
        path,
    } = backend::open(spec).with_context(|| format!("loading {shown}"))?;
    if let Some(why) = &fallback {
        eprintln!("edgellm: ort backend unavailable ({why}); {doing} the int4 CPU engine");
    }
    let engine = Engine::from_backend(backend).with_context(|| format!("loading {shown}"))?;
    Ok(Loaded {
        engine,
        fallback,
        path,
    })
}

/// How a client finds the daemon.
#[derive(Args, Clone)]
pub struct DaemonArgs {
    /// The daemon's socket (default: socket.path of --config, or of /etc/edgellm/edgellm.toml
    /// when it exists, else /run/edgellm/edgellm.sock)
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The daemon's config file, to find its socket
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
}

/// The daemon's socket for a client: `--socket`, else the config's (`--config`, or the system
/// config when it exists), else the default.
pub fn socket_path(d: &DaemonArgs) -> Result<PathBuf> {
    if let Some(s) = &d.socket {
        return Ok(s.clone());
    }
    let system = Path::new(edgellm::config::SYSTEM_CONFIG);
    let file = d.config.as_deref().or(system.is_file().then_some(system));
    Ok(match file {
        Some(f) => Config::load(f)?.socket.path,
        None => Config::default().socket.path,
    })
}

/// `--seed`, else one from the clock.
pub fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

/// The argument, or stdin when it is "-".
pub fn read_arg(s: String) -> Result<String> {
    if s == "-" {
        let mut buf = String::new();
        std::io::stdin()
            .read_to_string(&mut buf)
            .context("reading stdin")?;
        Ok(buf)
    } else {
        Ok(s)
    }
}

/// The file name of a model path, for reports.
pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `--model` (a path, or a name in the model directory), then `$EDGELLM_MODEL`, then the default
/// model in the model directory, in `models/cache/` of the current directory, or in
/// /var/lib/edgellm/models.
pub fn model_path(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = arg {
        // A path as given when something is there or it names a directory; else a name.
        if p.exists() || p.components().count() > 1 {
            return Ok(p.to_path_buf());
        }
        let name = p.to_string_lossy();
        return edgellm::models::resolve(&name, &edgellm::models::default_dir())
            .map_err(|e| UsageError(e.to_string()).into());
    }
    if let Some(p) = std::env::var_os("EDGELLM_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let mut tried = Vec::new();
    let candidates = [
        edgellm::models::default_dir().join(DEFAULT_MODEL),
        PathBuf::from("models/cache").join(DEFAULT_MODEL),
        PathBuf::from(edgellm::models::SYSTEM_MODEL_DIR).join(DEFAULT_MODEL),
    ];
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        let shown = c.display().to_string();
        if !tried.contains(&shown) {
            tried.push(shown);
        }
    }
    bail!(UsageError(format!(
        "no model given and the default model is not at any of: {}. Run `edgellm models fetch qwen2.5-coder-0.5b-instruct`, or pass --model or EDGELLM_MODEL",
        tried.join(", ")
    )))
}
