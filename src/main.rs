//! The `edgellm` command. Library errors are typed; here they become messages and exit codes:
//! 0 success, 1 runtime failure, 2 bad usage or input (clap uses 2 as well).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::backend::Backend;
use edgellm::engine::chat::Message;
use edgellm::engine::perplexity::perplexity;
use edgellm::engine::sampler::SamplingParams;
use edgellm::engine::tokenizer::Tokenizer;
use edgellm::engine::Engine;
use edgellm::frontend::cli;
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
    /// GGUF model file (default: $EDGELLM_MODEL, then models/cache/SmolLM2-135M-Instruct.Q4_1.gguf)
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Compute threads (default: all cores)
    #[arg(long, short = 't', default_value_t = 0)]
    threads: usize,
    /// Kernels: auto, reference (exact f32), scalar, avx2, neon, neon-dotprod
    #[arg(long, default_value = "auto")]
    kernels: String,
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
        /// Score only the first N chunks
        #[arg(long)]
        chunks: Option<usize>,
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
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
                | EngineError::EmptyPrompt
                | EngineError::BadRequest(_) => 2,
                _ => 1,
            };
        }
        if cause
            .downcast_ref::<edgellm::kernels::KernelError>()
            .is_some()
            || cause.downcast_ref::<UsageError>().is_some()
        {
            return 2;
        }
    }
    1
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

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
        } => {
            let question = read_arg(question)?;
            let path = model_path(m.model.as_deref())?;
            let opts = CpuOptions {
                n_ctx: ctx,
                threads: m.threads,
                kernels: kernels(&m.kernels)?,
                ..Default::default()
            };
            let mut engine = Engine::load_cpu(&path, &opts)
                .with_context(|| format!("loading {}", path.display()))?;
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
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            });
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
            };
            let c = cli::ask(&mut engine, &req, std::io::stdout().lock())?;
            eprintln!("{}", cli::summary(&c));
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
            chunks,
        } => {
            let path = model_path(m.model.as_deref())?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let opts = CpuOptions {
                n_ctx: ctx,
                threads: m.threads,
                kernels: kernels(&m.kernels)?,
                max_batch: ctx.min(128),
            };
            let mut model = CpuBackend::open(&path, &opts)
                .with_context(|| format!("loading {}", path.display()))?;
            let tok = Tokenizer::from_gguf(model.gguf(), path.parent())?;
            let mut tokens = tok.encode(&text)?;
            if let Some(n) = chunks {
                tokens.truncate(n * ctx);
            }
            let bos = if tok.add_bos { tok.bos } else { None };
            let mut exact = if compare_exact {
                Some(CpuBackend::open(
                    &path,
                    &CpuOptions {
                        kernels: Some(KernelKind::Reference),
                        ..opts.clone()
                    },
                )?)
            } else {
                None
            };
            eprintln!(
                "perplexity: {} tokens, {} chunks of {ctx}, kernels {}{}",
                tokens.len(),
                tokens.len() / ctx.max(1),
                model.kernels().name(),
                if compare_exact {
                    ", against reference"
                } else {
                    ""
                }
            );
            let r = perplexity(
                &mut model,
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
        } => {
            if n_prompt == 0 || n_gen == 0 || reps == 0 {
                bail!(UsageError(
                    "--n-prompt, --n-gen and --reps must be at least 1".into()
                ));
            }
            let path = model_path(m.model.as_deref())?;
            let opts = edgellm::bench::options(m.threads, kernels(&m.kernels)?, n_prompt, n_gen);
            let mut backend = CpuBackend::open(&path, &opts)
                .with_context(|| format!("loading {}", path.display()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let r = edgellm::bench::run(&mut backend, &name, n_prompt, n_gen, reps)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
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
