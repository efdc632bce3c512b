//! `edgellm chat`: an interactive conversation in-process. The history is kept as a session
//! (a follow-up turn prefills only what is new); `/reset`, `/system TEXT`, `/help`, `/exit`;
//! Ctrl-C cancels the answer being written (at the prompt it says how to leave), Ctrl-D ends.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;

use edgellm::api::{FinishReason, GenerateRequest, Message, Prompt, SamplingParams, SessionRef};
use edgellm::backend::cpu::CpuOptions;
use edgellm::engine::Window;
use edgellm::frontend::cli;

use super::{open_engine, ModelArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// System prompt (default: the chat template's own)
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 is greedy
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Random seed (default: from the clock)
    #[arg(long)]
    seed: Option<u64>,
    /// Context window in tokens (default: the model's, at most 4096); a conversation longer
    /// than it slides, the oldest turns leaving first
    #[arg(long, default_value_t = 0)]
    ctx: usize,
    /// Print each answer's token counts and speeds after it
    #[arg(long)]
    verbose: bool,
}

/// Set by SIGINT; taken by the answer being written, or by the prompt.
static INTERRUPT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPT.store(true, Ordering::Relaxed);
}

/// SIGINT sets [`INTERRUPT`] instead of ending the process.
fn catch_sigint() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with its handler set is a valid argument; the handler only
    // stores to an atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A line typed at the prompt.
enum Line {
    Text(String),
    /// Ctrl-C while waiting.
    Interrupted,
    /// Ctrl-D or the end of stdin.
    End,
}

/// Reads one line from stdin (fd 0) without buffering past it. Ctrl-C while waiting comes
/// back as [`Line::Interrupted`]: the wait polls, so a SIGINT that lands between two reads is
/// seen too.
fn read_line() -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        if INTERRUPT.swap(false, Ordering::Relaxed) {
            return Ok(Line::Interrupted);
        }
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ready == 0 {
            continue;
        }
        let mut b = [0u8; 1];
        // SAFETY: reads at most one byte into a live one-byte buffer.
        let n = unsafe { libc::read(0, b.as_mut_ptr().cast(), 1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(if line.is_empty() {
                Line::End
            } else {
                Line::Text(String::from_utf8_lossy(&line).into_owned())
            });
        }
        if b[0] == b'\n' {
            return Ok(Line::Text(String::from_utf8_lossy(&line).into_owned()));
        }
        line.push(b[0]);
    }
}

const HELP: &str = "/reset         forget the conversation\n/system TEXT   set the system prompt (and start over)\n/help          this\n/exit          leave (or Ctrl-D); Ctrl-C stops an answer";

pub fn run(a: ChatArgs) -> Result<()> {
    let spec = a.m.spec(a.ctx, CpuOptions::default().max_batch)?;
    let loaded = open_engine(&spec, "chatting on")?;
    let mut engine = loaded.engine;
    let n_ctx = engine.backend.n_ctx();
    engine.set_window(Window::new(n_ctx, 4, 0));
    // One session, kept resident between turns.
    engine.set_sessions(1, u64::MAX);
    catch_sigint().context("installing the Ctrl-C handler")?;
    eprintln!(
        "edgellm chat: {} ({n_ctx}-token window). /help for commands, Ctrl-D to leave.",
        super::file_name(&loaded.path)
    );
    let mut system = a.system.clone();
    let mut history: Vec<Message> = Vec::new();
    let mut seed = super::seed_or_clock(a.seed);
    let mut session_n = 0u32;
    let mut stdout = std::io::stdout();
    loop {
        write!(stdout, ">>> ")?;
        stdout.flush()?;
        let text = match read_line()? {
            Line::End => {
                writeln!(stdout)?;
                return Ok(());
            }
            Line::Interrupted => {
                writeln!(stdout, "\n(Ctrl-D or /exit leaves)")?;
                continue;
            }
            Line::Text(t) => t,
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            let (cmd, arg) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            match cmd {
                "exit" | "bye" | "quit" => return Ok(()),
                "reset" | "clear" => {
                    history.clear();
                    session_n += 1;
                    writeln!(stdout, "(conversation forgotten)")?;
                }
                "system" => {
                    let arg = arg.trim();
                    system = (!arg.is_empty()).then(|| arg.to_string());
                    history.clear();
                    session_n += 1;
                    match &system {
                        Some(s) => writeln!(stdout, "(system prompt set, starting over: {s})")?,
                        None => writeln!(
                            stdout,
                            "(system prompt back to the template's; starting over)"
                        )?,
                    }
                }
                "help" | "?" => writeln!(stdout, "{HELP}")?,
                other => writeln!(stdout, "unknown command /{other}\n{HELP}")?,
            }
            continue;
        }
        let mut earlier = Vec::new();
        if let Some(s) = &system {
            earlier.push(Message::new("system", s));
        }
        earlier.extend(history.iter().cloned());
        let user = Message::new("user", text);
        seed = seed.wrapping_add(1);
        let req = GenerateRequest {
            prompt: Prompt::Messages(vec![user.clone()]),
            max_tokens: a.max_tokens,
            sampling: SamplingParams {
                temperature: a.temperature,
                seed,
                ..Default::default()
            },
            stop: Vec::new(),
            ignore_eos: false,
            session: Some(SessionRef {
                id: format!("chat-{session_n}"),
                owner: "chat".into(),
                history: Some(earlier),
            }),
            tools: Vec::new(),
        };
        INTERRUPT.store(false, Ordering::Relaxed);
        let c = match cli::ask_until(&mut engine, &req, std::io::stdout().lock(), &INTERRUPT) {
            Ok(c) => c,
            Err(e) => {
                // A turn the engine refuses (too long for the window, say) leaves the
                // conversation as it was.
                writeln!(stdout, "edgellm: {e}")?;
                continue;
            }
        };
        if c.finish_reason == FinishReason::Cancelled {
            // The partial answer is not kept: the conversation is as before this turn.
            writeln!(stdout, "[cancelled]")?;
            continue;
        }
        history.push(user);
        history.push(Message::new("assistant", &c.text));
        if a.verbose {
            eprintln!("{}", cli::summary(&c));
        }
    }
}
