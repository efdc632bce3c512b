//! `edgellm ask`: one question, answered through a running daemon when one answers on its
//! socket, else in-process; the answer streamed to stdout, a summary line to stderr.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use edgellm::api::wire::GenerateBody;
use edgellm::api::{GenerateRequest, Limits, Message, Prompt, SamplingParams};
use edgellm::backend::cpu::CpuOptions;
use edgellm::backend::BackendChoice;
use edgellm::engine::{EngineError, Window};
use edgellm::frontend::{cli, client};
use edgellm::kernels::KernelChoice;

use super::{open_engine, read_arg, socket_path, DaemonArgs, ModelArgs};

#[derive(Args)]
pub struct AskArgs {
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
    /// Print one JSON object (text, finish_reason, usage, timing) instead of streaming the text
    #[arg(long)]
    json: bool,
}

pub fn run(a: AskArgs) -> Result<()> {
    let question = read_arg(a.question)?;
    let seed = super::seed_or_clock(a.seed);
    let prompt = if a.raw {
        Prompt::Raw(question)
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &question));
        Prompt::Messages(msgs)
    };
    let req = GenerateRequest {
        prompt,
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            seed,
            ..Default::default()
        },
        stop: a.stop,
        ignore_eos: false,
        session: None,
        tools: Vec::new(),
    };
    // Checked here, where the command line is parsed, as the daemon checks what it parses
    // (a daemon applies its own limits.max_tokens on top).
    let unlimited = Limits {
        max_tokens: usize::MAX,
        ..Limits::default()
    };
    req.validate(&unlimited)
        .map_err(|(_, m)| EngineError::BadRequest(m))?;
    // Options that only mean something in-process keep the answer in-process.
    let m = &a.m;
    let in_process = a.local
        || m.model.is_some()
        || m.threads != 0
        || m.kernels != KernelChoice::Auto
        || m.backend != BackendChoice::Auto
        || a.ctx != 0;
    if !in_process {
        let explicit = a.d.socket.is_some();
        let sock = socket_path(&a.d)?;
        match client::connect(&sock) {
            Ok(mut stream) => {
                let body = wire_body(&req, format!("ask-{}-{seed}", std::process::id()));
                let c = if a.json {
                    client::generate(&mut stream, body, &mut std::io::sink())?
                } else {
                    let mut out = std::io::stdout().lock();
                    let c = client::generate(&mut stream, body, &mut out)?;
                    writeln!(out)?;
                    c
                };
                finish(&c, a.json)?;
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
    let spec = m.spec(a.ctx, CpuOptions::default().max_batch)?;
    let mut engine = open_engine(&spec, "answering on")?.engine;
    let n_ctx = engine.backend.n_ctx();
    engine.set_window(Window::new(n_ctx, 4, 0));
    let c = if a.json {
        cli::ask(&mut engine, &req, std::io::sink())?
    } else {
        cli::ask(&mut engine, &req, std::io::stdout().lock())?
    };
    finish(&c, a.json)?;
    eprintln!("{}", cli::summary(&c));
    Ok(())
}

/// With `--json`: the completion as one JSON object on stdout, as the daemon's `done` reply
/// carries it (text, finish_reason, usage, timing).
fn finish(c: &edgellm::api::Completion, json: bool) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(c)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("session");
        }
        println!("{v}");
    }
    Ok(())
}

/// The request as the daemon reads it.
fn wire_body(req: &GenerateRequest, id: String) -> GenerateBody {
    let s = &req.sampling;
    let (messages, prompt) = match &req.prompt {
        Prompt::Messages(m) => (Some(m.clone()), None),
        Prompt::Raw(p) => (None, Some(p.clone())),
    };
    GenerateBody {
        id,
        messages,
        prompt,
        max_tokens: Some(req.max_tokens),
        temperature: Some(s.temperature),
        top_k: Some(s.top_k),
        top_p: Some(s.top_p),
        min_p: Some(s.min_p),
        repeat_penalty: Some(s.repeat_penalty),
        seed: Some(s.seed),
        stop: Some(req.stop.clone()),
        ..Default::default()
    }
}
