//! The `edgellm` command. Library errors are typed; here they become messages and exit codes:
//! 0 success, 1 runtime failure, 2 bad usage or input (clap uses 2 as well).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use edgellm::backend::cpu::kv::KvType;
use edgellm::backend::cpu::model::ModelError;
use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::backend::ort::{OrtBackend, OrtOptions};
use edgellm::backend::Backend;
use edgellm::config::{Config, ConfigError};
use edgellm::daemon::budget::{own_cgroup_limit, Budget};
use edgellm::daemon::notify::Notifier;
use edgellm::daemon::{Daemon, Listener};
use edgellm::engine::chat::Message;
use edgellm::engine::load::{is_onnx_dir, BackendChoice, LoadSpec};
use edgellm::engine::perplexity::{perplexity, perplexity_stream, StreamOpts};
use edgellm::engine::sampler::SamplingParams;
use edgellm::engine::tokenizer::Tokenizer;
use edgellm::engine::{Engine, Window};
use edgellm::frontend::client::{self, ClientError};
use edgellm::frontend::{cli, mqtt, unix};
use edgellm::kernels::quant::GgmlType;
use edgellm::kernels::KernelKind;
use edgellm::queue::{GenerateRequest, Prompt};

const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "edgellm",
    version,
    about = "LLM daemon and tools for edge boards"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF model file, or an ONNX model folder for --backend ort (default: $EDGELLM_MODEL,
    /// then models/cache/SmolLM2-135M-Instruct.Q4_1.gguf)
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// cpu (the int4 engine on a GGUF), ort (ONNX Runtime on an ONNX folder, falling back to
    /// the int4 engine on the default GGUF), auto (ort when --model is a folder)
    #[arg(long, default_value = "auto")]
    backend: String,
    /// --backend ort: execution providers in order of preference, comma-separated
    /// (qnn, cuda, tensorrt, xnnpack, cpu)
    #[arg(long, default_value = "cpu")]
    providers: String,
    /// Compute threads (default: all cores)
    #[arg(long, short = 't', default_value_t = 0)]
    threads: usize,
    /// Kernels: auto, reference (exact f32), scalar, avx2, neon, neon-dotprod
    #[arg(long, default_value = "auto")]
    kernels: String,
    /// KV cache element type: f32, q8_0
    #[arg(long, default_value = "f32")]
    kv_type: String,
}

impl ModelArgs {
    /// What to load for these arguments: a folder is an ONNX model (the default GGUF, when
    /// present, is the fallback), a file a GGUF.
    fn spec(&self, n_ctx: usize, max_batch: usize) -> Result<LoadSpec> {
        let choice = BackendChoice::parse(&self.backend)
            .map_err(|e| UsageError(format!("--backend: {e}")))?;
        let (gguf, onnx) = match &self.model {
            Some(p) if is_onnx_dir(p) => (model_path(None).ok(), Some(p.clone())),
            Some(p) => (Some(p.clone()), None),
            None => (Some(model_path(None)?), None),
        };
        if choice == BackendChoice::Ort && onnx.is_none() {
            bail!(UsageError(
                "--backend ort needs --model DIR, an ONNX model folder (edgellm export-onnx writes one from a GGUF)".into()
            ));
        }
        Ok(LoadSpec {
            choice,
            gguf,
            onnx,
            cpu: self.cpu(n_ctx, max_batch)?,
            ort: OrtOptions {
                providers: self
                    .providers
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect(),
                threads: self.threads,
                n_ctx,
                ..Default::default()
            },
        })
    }

    /// CPU options for these arguments with a window of `n_ctx` tokens.
    fn cpu(&self, n_ctx: usize, max_batch: usize) -> Result<CpuOptions> {
        Ok(CpuOptions {
            n_ctx,
            threads: self.threads,
            kernels: kernels(&self.kernels)?,
            max_batch,
            kv_type: KvType::parse(&self.kv_type)
                .map_err(|e| UsageError(format!("--kv-type {}: {e}", self.kv_type)))?,
        })
    }
}

/// How a client finds the daemon.
#[derive(Args, Clone)]
struct DaemonArgs {
    /// The daemon's socket (default: socket.path of --config, or of /etc/edgellm/edgellm.toml
    /// when it exists, else /run/edgellm/edgellm.sock)
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The daemon's config file, to find its socket
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer a question with the model, streamed to stdout
    Ask {
        #[command(flatten)]
        m: ModelArgs,
        /// The question (or the text to complete with --raw); "-" reads stdin
        question: String,
        /// Replace the default system prompt
        #[arg(long)]
        system: Option<String>,
        /// Plain completion: no chat template
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// 0 is greedy
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        #[arg(long, default_value_t = 0.05)]
        min_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repeat_penalty: f32,
        /// Random seed (default: from the clock)
        #[arg(long)]
        seed: Option<u64>,
        /// Stop before this string (repeatable)
        #[arg(long)]
        stop: Vec<String>,
        /// Context window in tokens (default: the model's, at most 4096)
        #[arg(long, default_value_t = 0)]
        ctx: usize,
        #[command(flatten)]
        d: DaemonArgs,
        /// Answer in-process even when a daemon is running
        #[arg(long)]
        local: bool,
    },
    /// Run the daemon: the Unix socket front-end, the queue and the engine worker
    Serve {
        /// Config file (TOML); default: the embedded defaults (edgellm config --print-default)
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Socket path (overrides socket.path)
        #[arg(long)]
        socket: Option<PathBuf>,
        /// GGUF model file (overrides model.path), or an ONNX model folder (overrides model.onnx)
        #[arg(long, short = 'm')]
        model: Option<PathBuf>,
        /// cpu, ort or auto (overrides model.backend)
        #[arg(long)]
        backend: Option<String>,
        /// Serve MQTT too: mqtt://[user[:pass]@]host:port or mqtts://… (overrides mqtt.url)
        #[arg(long)]
        mqtt: Option<String>,
        /// MQTT node id in the topics (overrides mqtt.node)
        #[arg(long)]
        node: Option<String>,
        /// Print the memory budget (weights, KV cache, scratch, sessions) and its limit, and
        /// exit: 0 when it fits, 1 when it does not
        #[arg(long)]
        check: bool,
    },
    /// What this machine and config give the daemon (JSON): the backend and provider in use,
    /// ONNX Runtime's version and providers, the CPU's features and the int4 kernels chosen,
    /// and the memory budget. Loads the model as `serve` would.
    Info {
        /// Config file (TOML); default: the embedded defaults
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// GGUF model file or ONNX model folder (overrides model.path / model.onnx)
        #[arg(long, short = 'm')]
        model: Option<PathBuf>,
    },
    /// Print the running daemon's status (JSON)
    Status {
        #[command(flatten)]
        d: DaemonArgs,
    },
    /// Print the default config, or check a config file
    Config {
        /// Print the documented default config
        #[arg(long, conflicts_with = "check")]
        print_default: bool,
        /// Check this config file and print it resolved
        #[arg(long)]
        check: Option<PathBuf>,
    },
    /// Print the token ids of TEXT as a JSON array (special tokens parsed)
    Tokenize {
        /// GGUF model file
        #[arg(long, short = 'm')]
        model: Option<PathBuf>,
        /// Text to tokenize; "-" reads stdin
        text: String,
    },
    /// Perplexity of a text file, as llama-perplexity computes it
    Perplexity {
        #[command(flatten)]
        m: ModelArgs,
        file: PathBuf,
        /// Chunk size in tokens
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Also run the exact f32 path and report mean KL divergence and top-1 agreement
        #[arg(long)]
        compare_exact: bool,
        /// Also run the int4 engine on the GGUF with its own (fast) kernels and report the
        /// same: how the ORT backend and the int4 engine agree as each runs by default
        #[arg(long, conflicts_with = "compare_exact")]
        compare_int4: bool,
        /// Score only the first N chunks
        #[arg(long)]
        chunks: Option<usize>,
        /// Score the text as one stream through a sliding KV cache of --window positions
        #[arg(long)]
        stream: bool,
        /// --stream: the window W (positions in the cache)
        #[arg(long, default_value_t = 256, requires = "stream")]
        window: usize,
        /// --stream: attention sinks kept at the start of the cache
        #[arg(long, default_value_t = 4, requires = "stream")]
        sinks: usize,
        /// --stream: positions evicted per slide (1: every token sees W - 1 before it)
        #[arg(long, default_value_t = 1, requires = "stream")]
        discard: usize,
        /// --stream: also score every 4th target with its last W tokens recomputed from scratch
        #[arg(long, requires = "stream")]
        recompute: bool,
        /// --recompute: score every Nth target instead of every 4th
        #[arg(long, default_value_t = 4, requires = "recompute")]
        recompute_every: usize,
        /// --stream: use only the first N tokens of the text
        #[arg(long, requires = "stream")]
        tokens: Option<usize>,
    },
    /// Write an ONNX model folder (onnxruntime-genai's layout) from a GGUF, keeping its int4
    /// blocks, for the ORT backend
    ExportOnnx {
        /// GGUF model file
        model: PathBuf,
        /// Output folder (created)
        out: PathBuf,
        /// MatMulNBits' accuracy level: 4 quantizes activations to 8 bits (fast, as the int4
        /// engine's kernels do), 1 computes in f32 (as its reference kernels do)
        #[arg(long, default_value_t = 4)]
        accuracy_level: i64,
    },
    /// Requantize a GGUF model's matrices to another type (as llama-quantize --allow-requantize)
    Quantize {
        input: PathBuf,
        output: PathBuf,
        /// Target type of the layer matrices: q4_0, q4_1, q5_0, q8_0
        #[arg(long = "type")]
        ty: String,
    },
    /// Measure prompt and generation speed (one JSON object)
    Bench {
        #[command(flatten)]
        m: ModelArgs,
        /// Prompt tokens
        #[arg(short = 'p', long, default_value_t = 128)]
        n_prompt: usize,
        /// Generated tokens
        #[arg(short = 'n', long, default_value_t = 64)]
        n_gen: usize,
        /// Repetitions (the median is reported)
        #[arg(short = 'r', long, default_value_t = 5)]
        reps: usize,
        /// Per-token latency percentiles of one generation --windows windows long, through the
        /// sliding window (after it first fills)
        #[arg(long, conflicts_with = "session")]
        long: bool,
        /// Time to first token of a session's follow-up turn against a cold request with the
        /// same conversation
        #[arg(long)]
        session: bool,
        /// --long/--session: the context window
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
        /// --long: generate this many windows' worth of tokens
        #[arg(long, default_value_t = 8)]
        windows: usize,
        /// --long: attention sinks, and positions evicted per slide (0: a quarter of the window)
        #[arg(long, default_value_t = 4)]
        sinks: usize,
        #[arg(long, default_value_t = 0)]
        discard: usize,
        /// --session: made-up exchanges in the conversation before the follow-up
        #[arg(long, default_value_t = 12)]
        turns: usize,
    },
}

fn main() -> ExitCode {
    // Before any thread starts: ONNX Runtime, if it is loaded later, must not phone home.
    edgellm::backend::ort::runtime::disable_telemetry();
    let cli = Cli::parse();
    // The daemon logs at the level of its config (set up once the config is read); the tools
    // only warn.
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        init_logging("warn");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgellm: error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Bad input (a bad model file, a prompt too long, an unknown option value) is 2; the rest 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    use edgellm::engine::EngineError;
    for cause in e.chain() {
        let engine_error = match cause.downcast_ref::<cli::AskError>() {
            Some(cli::AskError::Engine(ee)) => Some(ee),
            _ => cause.downcast_ref::<EngineError>(),
        };
        if let Some(ee) = engine_error {
            return match ee {
                EngineError::PromptTooLong { .. }
                | EngineError::TurnTooLong { .. }
                | EngineError::EmptyPrompt
                | EngineError::BadRequest(_) => 2,
                _ => 1,
            };
        }
        if let Some(ClientError::Daemon { code, .. }) = cause.downcast_ref::<ClientError>() {
            return if code == "bad_request" || code == "too_large" {
                2
            } else {
                1
            };
        }
        if cause
            .downcast_ref::<edgellm::kernels::KernelError>()
            .is_some()
            || cause.downcast_ref::<UsageError>().is_some()
            || matches!(
                cause.downcast_ref::<mqtt::MqttError>(),
                Some(mqtt::MqttError::Config(_))
            )
            || matches!(
                cause.downcast_ref::<ConfigError>(),
                Some(ConfigError::Parse { .. } | ConfigError::Invalid { .. })
            )
        {
            return 2;
        }
    }
    1
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Logs to stderr: `RUST_LOG` if set, else `filter`. Under journald (`JOURNAL_STREAM` set)
/// without timestamps or colours, which journald adds or does not want.
fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Ask {
            m,
            question,
            system,
            raw,
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
            ctx,
            d,
            local,
        } => {
            let question = read_arg(question)?;
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            });
            // Options that only mean something in-process keep the answer in-process.
            let in_process = local
                || m.model.is_some()
                || m.threads != 0
                || m.kernels != "auto"
                || m.backend != "auto"
                || ctx != 0;
            if !in_process {
                let explicit = d.socket.is_some();
                let sock = socket_path(&d)?;
                match client::connect(&sock) {
                    Ok(mut stream) => {
                        let mut req = serde_json::json!({
                            "id": format!("ask-{}-{seed}", std::process::id()),
                            "max_tokens": max_tokens,
                            "temperature": temperature,
                            "top_k": top_k,
                            "top_p": top_p,
                            "min_p": min_p,
                            "repeat_penalty": repeat_penalty,
                            "seed": seed,
                            "stop": stop,
                        });
                        if raw {
                            req["prompt"] = question.into();
                        } else {
                            let mut msgs = Vec::new();
                            if let Some(s) = system {
                                msgs.push(Message::new("system", &s));
                            }
                            msgs.push(Message::new("user", &question));
                            req["messages"] = serde_json::to_value(msgs)?;
                        }
                        let mut out = std::io::stdout().lock();
                        let c = client::generate(&mut stream, req, &mut out)?;
                        use std::io::Write;
                        writeln!(out)?;
                        eprintln!("{} (daemon at {})", cli::summary(&c), sock.display());
                        return Ok(());
                    }
                    Err(e) if explicit => eprintln!(
                        "edgellm: no daemon answers at {} ({e}); answering in-process",
                        sock.display()
                    ),
                    Err(e) => tracing::debug!("no daemon at {}: {e}", sock.display()),
                }
            }
            let (mut engine, fallback) = m.spec(ctx, CpuOptions::default().max_batch)?.load()?;
            if let Some(why) = fallback {
                eprintln!(
                    "edgellm: ort backend unavailable ({why}); answering on the int4 CPU engine"
                );
            }
            let n_ctx = engine.backend.n_ctx();
            engine.set_window(Window::new(n_ctx, 4, 0));
            let prompt = if raw {
                Prompt::Raw(question)
            } else {
                let mut msgs = Vec::new();
                if let Some(s) = system {
                    msgs.push(Message::new("system", &s));
                }
                msgs.push(Message::new("user", &question));
                Prompt::Messages(msgs)
            };
            let req = GenerateRequest {
                prompt,
                max_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repeat_penalty,
                    seed,
                    ..Default::default()
                },
                stop,
                ignore_eos: false,
                session: None,
            };
            let c = cli::ask(&mut engine, &req, std::io::stdout().lock())?;
            eprintln!("{}", cli::summary(&c));
            Ok(())
        }
        Cmd::Serve {
            config,
            socket,
            model,
            backend,
            mqtt,
            node,
            check,
        } => serve(config, socket, model, backend, mqtt, node, check),
        Cmd::Info { config, model } => info(config, model),
        Cmd::ExportOnnx {
            model,
            out,
            accuracy_level,
        } => {
            let path = model;
            let r = edgellm::backend::ort::export::export(&path, &out, accuracy_level)
                .with_context(|| format!("exporting {}", path.display()))?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Status { d } => {
            let sock = socket_path(&d)?;
            let mut stream = client::connect(&sock)
                .with_context(|| format!("no daemon answers at {}", sock.display()))?;
            let v = client::status(&mut stream)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Config {
            print_default,
            check,
        } => {
            if let Some(p) = check {
                let c = Config::load(&p)?;
                eprintln!("{}: valid", p.display());
                print!("{}", toml::to_string_pretty(&c)?);
            } else if print_default {
                print!("{}", edgellm::config::DEFAULT_TOML);
            } else {
                bail!(UsageError(
                    "edgellm config: give --print-default or --check FILE".into()
                ));
            }
            Ok(())
        }
        Cmd::Tokenize { model, text } => {
            let text = read_arg(text)?;
            let path = model_path(model.as_deref())?;
            let g = edgellm::gguf::Gguf::open(&path)?;
            let tok = Tokenizer::from_gguf(&g, path.parent())?;
            let ids = tok.encode(&text)?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Cmd::Perplexity {
            m,
            file,
            ctx,
            compare_exact,
            compare_int4,
            chunks,
            stream,
            window,
            sinks,
            discard,
            recompute,
            recompute_every,
            tokens: limit,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            if stream {
                let (mut engine, fallback) = m.spec(window, window.min(64))?.load()?;
                if let Some(why) = fallback {
                    eprintln!(
                        "edgellm: ort backend unavailable ({why}); measuring the int4 CPU engine"
                    );
                }
                let mut tokens = engine.tokenizer.encode(&text)?;
                if let Some(n) = limit {
                    tokens.truncate(n);
                }
                eprintln!(
                    "perplexity --stream: {} tokens, window {window}, {sinks} sinks, evicting {discard} at a time{}",
                    tokens.len(),
                    if recompute {
                        format!(", recompute every {recompute_every}th target")
                    } else {
                        String::new()
                    }
                );
                let r = perplexity_stream(
                    engine.backend.as_mut(),
                    &tokens,
                    StreamOpts {
                        window,
                        sinks,
                        discard,
                        recompute_every: if recompute { recompute_every.max(1) } else { 0 },
                    },
                    &mut |d, n, p| eprintln!("[{d}/{n}] {p:.4}"),
                )?;
                eprintln!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_stderr);
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            let spec = m.spec(ctx, ctx.min(128))?;
            let (mut engine, fallback) = spec.load()?;
            if let Some(why) = fallback {
                eprintln!(
                    "edgellm: ort backend unavailable ({why}); measuring the int4 CPU engine"
                );
            }
            let tok = &engine.tokenizer;
            let mut tokens = tok.encode(&text)?;
            if let Some(n) = chunks {
                tokens.truncate(n * ctx);
            }
            let bos = if tok.add_bos { tok.bos } else { None };
            // The path compared against: the int4 engine on the GGUF, with its reference
            // kernels (--compare-exact) or the ones it chose (--compare-int4).
            let compare = compare_exact || compare_int4;
            let mut exact = match (compare, &spec.gguf) {
                (true, Some(path)) => Some(CpuBackend::open(
                    path,
                    &CpuOptions {
                        kernels: if compare_exact {
                            Some(KernelKind::Reference)
                        } else {
                            spec.cpu.kernels
                        },
                        ..spec.cpu.clone()
                    },
                )?),
                (true, None) => bail!(UsageError(format!(
                    "{} needs the GGUF model (the default one is missing)",
                    if compare_exact {
                        "--compare-exact"
                    } else {
                        "--compare-int4"
                    }
                ))),
                _ => None,
            };
            let info = engine.backend.info();
            eprintln!(
                "perplexity: {} tokens, {} chunks of {ctx}, {} ({}){}",
                tokens.len(),
                tokens.len() / ctx.max(1),
                info.backend,
                info.compute,
                if compare_exact {
                    ", against reference"
                } else if compare_int4 {
                    ", against the int4 engine"
                } else {
                    ""
                }
            );
            let r = perplexity(
                engine.backend.as_mut(),
                exact.as_mut().map(|e| e as &mut dyn Backend),
                &tokens,
                ctx,
                bos,
                &mut |c, n, p| eprintln!("[{c}/{n}] {p:.4}"),
            )?;
            eprintln!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_stderr);
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Quantize { input, output, ty } => {
            let ty = match ty.to_ascii_lowercase().as_str() {
                "q4_0" => GgmlType::Q4_0,
                "q4_1" => GgmlType::Q4_1,
                "q5_0" => GgmlType::Q5_0,
                "q8_0" => GgmlType::Q8_0,
                other => bail!(UsageError(format!(
                    "--type {other}: allowed q4_0, q4_1, q5_0, q8_0"
                ))),
            };
            let g = edgellm::gguf::Gguf::open(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let bytes = edgellm::gguf::writer::requantize(&g, ty);
            let tmp = output.with_extension("part");
            std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &output)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!("wrote {} ({})", output.display(), ty.name());
            Ok(())
        }
        Cmd::Bench {
            m,
            n_prompt,
            n_gen,
            reps,
            long,
            session,
            ctx,
            windows,
            sinks,
            discard,
            turns,
        } => {
            if long || session {
                let path = model_path(m.model.as_deref())?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let opts = m.cpu(ctx, CpuOptions::default().max_batch)?;
                let mut engine = Engine::load_cpu(&path, &opts)
                    .with_context(|| format!("loading {}", path.display()))?;
                let n_ctx = engine.backend.n_ctx();
                let out = if long {
                    let window = Window::new(n_ctx, sinks, discard).ok_or_else(|| {
                        UsageError(format!(
                            "--sinks {sinks} --discard {discard}: must leave room in the window of {n_ctx}"
                        ))
                    })?;
                    let r = edgellm::bench::run_long(&mut engine, &name, window, windows.max(1))?;
                    serde_json::to_string(&r)?
                } else {
                    let r = edgellm::bench::run_session(&mut engine, &name, turns, reps)?;
                    serde_json::to_string(&r)?
                };
                println!("{out}");
                return Ok(());
            }
            if n_prompt == 0 || n_gen == 0 || reps == 0 {
                bail!(UsageError(
                    "--n-prompt, --n-gen and --reps must be at least 1".into()
                ));
            }
            // A window that holds prompt and generation, one batch per prompt.
            let mut spec = m.spec(n_prompt.max(n_gen), n_prompt)?;
            spec.ort.max_batch = n_prompt;
            let (mut engine, fallback) = spec.load()?;
            if let Some(why) = fallback {
                eprintln!(
                    "edgellm: ort backend unavailable ({why}); measuring the int4 CPU engine"
                );
            }
            let path = match engine.backend.info().backend.as_str() {
                "ort" => spec.onnx.clone(),
                _ => spec.gguf.clone(),
            }
            .unwrap_or_default();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let r = edgellm::bench::run(engine.backend.as_mut(), &name, n_prompt, n_gen, reps)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}

/// What the daemon's config asks to load; `true` when ONNX Runtime is wanted.
fn spec_from_config(cfg: &Config) -> Result<(LoadSpec, bool)> {
    let cpu = CpuOptions {
        n_ctx: cfg.model.n_ctx,
        threads: cfg.model.threads,
        kernels: cfg.kernels(),
        kv_type: cfg.kv_type().map_err(UsageError)?,
        ..Default::default()
    };
    let choice = BackendChoice::parse(&cfg.model.backend).map_err(UsageError)?;
    let want_ort =
        choice == BackendChoice::Ort || (choice == BackendChoice::Auto && cfg.model.onnx.is_some());
    // The GGUF runs the int4 engine, and is the fallback of ONNX Runtime when it is at hand.
    let gguf = if want_ort {
        model_path(cfg.model.path.as_deref()).ok()
    } else {
        Some(model_path(cfg.model.path.as_deref())?)
    };
    let spec = LoadSpec {
        choice,
        gguf,
        onnx: cfg.model.onnx.clone(),
        cpu,
        ort: OrtOptions {
            library: cfg.ort.library.clone(),
            providers: cfg.ort.providers.clone(),
            provider_options: cfg.ort.provider_options.clone(),
            threads: cfg.model.threads,
            n_ctx: cfg.model.n_ctx,
            max_batch: cfg.ort.max_batch,
        },
    };
    Ok((spec, want_ort))
}

fn cpu_plan(path: &Path, opts: &CpuOptions) -> Result<edgellm::backend::cpu::MemoryPlan> {
    edgellm::gguf::Gguf::open(path)
        .map_err(ModelError::from)
        .and_then(|g| CpuBackend::plan(&g, opts))
        .with_context(|| format!("loading {}", path.display()))
}

/// The memory plan of the backend the spec will start: ONNX Runtime's when wanted and its
/// model is readable, else the int4 engine's (which a failing ONNX setup falls back to).
fn plan_for(spec: &LoadSpec, want_ort: bool) -> Result<edgellm::backend::cpu::MemoryPlan> {
    let ort_plan = match (&spec.onnx, want_ort) {
        (Some(dir), true) => Some(OrtBackend::plan(dir, &spec.ort)),
        _ => None,
    };
    Ok(match (ort_plan, &spec.gguf) {
        (Some(Ok(p)), _) => p,
        (Some(Err(_)), Some(g)) | (None, Some(g)) => cpu_plan(g, &spec.cpu)?,
        (Some(Err(e)), None) => return Err(e).context("reading the ONNX model"),
        (None, None) => bail!(UsageError("no model: set model.path or model.onnx".into())),
    })
}

/// `--model` on `serve` and `info`: a folder is the ONNX model, a file the GGUF.
fn set_model(cfg: &mut Config, model: Option<PathBuf>) {
    match model {
        Some(m) if is_onnx_dir(&m) => cfg.model.onnx = Some(m),
        Some(m) => cfg.model.path = Some(m),
        None => {}
    }
}

/// Bytes the session store may take, as the memory budget counts them (0 when sessions are off).
fn session_bytes(cfg: &Config) -> u64 {
    if cfg.sessions.max_count == 0 {
        0
    } else {
        cfg.sessions.max_bytes
    }
}

/// `edgellm info`.
fn info(config: Option<PathBuf>, model: Option<PathBuf>) -> Result<()> {
    let mut cfg = match &config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    set_model(&mut cfg, model);
    cfg.validate().map_err(UsageError)?;
    let (spec, want_ort) = spec_from_config(&cfg)?;
    let plan = plan_for(&spec, want_ort)?;
    let sessions = session_bytes(&cfg);
    let budget = Budget::new(&plan, sessions, cfg.memory.max_bytes, own_cgroup_limit());
    let (engine, fallback) = spec.load()?;
    let b = engine.backend.info();
    // Loaded by the model above, or (a config without ONNX) loaded now to say what is there.
    let rt = edgellm::backend::ort::runtime::loaded()
        .unwrap_or_else(|| edgellm::backend::ort::runtime::init(cfg.ort.library.as_deref()));
    let ort = match rt {
        Ok(rt) => serde_json::json!({
            "library": rt.library, "version": rt.version, "providers_available": rt.providers,
        }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    let features: Vec<&str> = cpu_features();
    let kernels = match KernelKind::parse(&cfg.model.kernels)? {
        Some(k) => k,
        None => KernelKind::best(),
    };
    let out = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backend": match &fallback {
            Some(why) => format!("{} (fallback: {why})", b.backend),
            None => b.backend.clone(),
        },
        "compute": b.compute,
        "threads": b.threads,
        "n_ctx": b.n_ctx,
        "ort": ort,
        "ort_providers_configured": cfg.ort.providers,
        "cpu": { "arch": std::env::consts::ARCH, "features": features, "kernels": kernels.name() },
        "memory": budget,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The CPU features the int4 kernels look for.
fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("sse4.2", is_x86_feature_detected!("sse4.2")),
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("f16c", is_x86_feature_detected!("f16c")),
            ("avxvnni", is_x86_feature_detected!("avxvnni")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        for (name, on) in [
            ("neon", std::arch::is_aarch64_feature_detected!("neon")),
            (
                "dotprod",
                std::arch::is_aarch64_feature_detected!("dotprod"),
            ),
            ("i8mm", std::arch::is_aarch64_feature_detected!("i8mm")),
            ("fp16", std::arch::is_aarch64_feature_detected!("fp16")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    f
}

/// `edgellm serve`: config, then socket (a live daemon refused before the model loads), model,
/// warm-up, and the daemon until a signal.
fn serve(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    model: Option<PathBuf>,
    backend: Option<String>,
    mqtt_url: Option<String>,
    node: Option<String>,
    check: bool,
) -> Result<()> {
    let mut cfg = match &config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(s) = socket {
        cfg.socket.path = s;
    }
    set_model(&mut cfg, model);
    if let Some(b) = backend {
        cfg.model.backend = b;
    }
    if let Some(u) = mqtt_url {
        cfg.mqtt.enabled = true;
        cfg.mqtt.url = u;
    }
    if let Some(n) = node {
        cfg.mqtt.node = n;
    }
    cfg.validate().map_err(|message| ConfigError::Invalid {
        path: config.unwrap_or_else(|| PathBuf::from("command line")),
        message,
    })?;
    init_logging(&cfg.log.filter);
    let mqtt = if cfg.mqtt.enabled {
        Some(mqtt::Settings::from_config(
            &cfg.mqtt,
            cfg.limits.max_line_bytes,
        )?)
    } else {
        None
    };
    let (spec, want_ort) = spec_from_config(&cfg)?;
    let gguf = spec.gguf.clone();
    let plan = plan_for(&spec, want_ort)?;
    let sessions = session_bytes(&cfg);
    let mut budget = Budget::new(&plan, sessions, cfg.memory.max_bytes, own_cgroup_limit());
    if check {
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
    let shown = spec
        .onnx
        .as_ref()
        .filter(|_| want_ort)
        .or(gguf.as_ref())
        .cloned()
        .unwrap_or_default();
    tracing::info!(model = %shown.display(), backend = %cfg.model.backend, "loading the model");
    let (mut engine, fallback_reason) = spec
        .load()
        .with_context(|| format!("loading {}", shown.display()))?;
    if let (Some(_), Some(g)) = (&fallback_reason, &gguf) {
        // The int4 engine took over: its budget is the one that holds now.
        budget = Budget::new(
            &cpu_plan(g, &spec.cpu)?,
            sessions,
            cfg.memory.max_bytes,
            own_cgroup_limit(),
        );
        budget.check().map_err(anyhow::Error::msg)?;
        tracing::info!("{}", budget.summary());
    }
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
    let fallback: Option<edgellm::engine::worker::Fallback> =
        match (engine.backend.info().backend == "ort", gguf.clone()) {
            (true, Some(g)) => {
                let opts = spec.cpu.clone();
                Some(Box::new(move || Engine::load_cpu(&g, &opts)))
            }
            _ => None,
        };
    let path = if fallback_reason.is_none() {
        shown.clone()
    } else {
        gguf.clone().unwrap_or_default()
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
    let mut daemon = Daemon {
        model: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config: cfg,
        engine,
        fallback_reason,
        fallback,
        listener,
        notifier: Notifier::from_env(),
        mqtt,
        budget,
    };
    daemon.warm_up()?;
    daemon.run(std::future::pending())?;
    Ok(())
}

/// The daemon's socket for a client: `--socket`, else the config's (`--config`, or the system
/// config when it exists), else the default.
fn socket_path(d: &DaemonArgs) -> Result<PathBuf> {
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

fn kernels(s: &str) -> Result<Option<KernelKind>> {
    Ok(KernelKind::parse(s)?)
}

fn read_arg(s: String) -> Result<String> {
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

/// `--model`, then `$EDGELLM_MODEL`, then the default model under `models/cache/` in the current
/// directory or beside the executable's source tree.
fn model_path(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("EDGELLM_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let mut tried = Vec::new();
    let mut candidates = vec![PathBuf::from("models/cache").join(DEFAULT_MODEL)];
    if let Ok(exe) = std::env::current_exe() {
        // target/{release,debug}/edgellm → the checkout's models/cache
        if let Some(root) = exe
            .parent()
            .and_then(|d| d.parent())
            .and_then(|d| d.parent())
        {
            candidates.push(root.join("models/cache").join(DEFAULT_MODEL));
        }
    }
    candidates.push(PathBuf::from("/var/lib/edgellm/models").join(DEFAULT_MODEL));
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    bail!(UsageError(format!(
        "no model given and the default model is not at any of: {}. Run models/fetch.sh, or pass --model or EDGELLM_MODEL",
        tried.join(", ")
    )))
}
