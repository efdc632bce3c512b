//! edgellm: a headless LLM daemon for ARM edge boards.
//!
//! The modules are layers; each imports only the ones below it (`ARCHITECTURE.md` has the
//! rules and the data flow). From the top:
//!
//! ```text
//! daemon    `edgellm serve` assembled: front-ends, queue and engine worker under systemd
//! frontend  unix socket, MQTT, the command-line client and `ask` in-process
//! config    the daemon's TOML: documented defaults, the file, validate()
//! queue     bounded priority queue with deadlines and cancel, between front-ends and engine
//! engine    tokenizer → chat template → prefill → decode loop → sampler → text; the worker
//! backend   the Backend trait, open() and the memory plan; cpu (int4 engine), ort (ONNX Runtime)
//! models    the model directory, manifests, downloads from a package index, checksums
//! gguf      the weight file, memory-mapped and bounds-checked
//! kernels   block formats, scalar/AVX2/NEON dot products, thread pool, matmul
//! api       the vocabulary: requests, replies, status, the wire protocol (imports nothing)
//! ```
//!
//! Beside them, [`convert`] holds the tools that write model files (`quantize`, `export-onnx`,
//! the GGUF writer). The `edgellm` binary (`src/main.rs`, `src/app/`) is the application layer
//! on top: one file per command.

pub mod api;
pub mod backend;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod engine;
pub mod frontend;
pub mod gguf;
pub mod kernels;
pub mod models;
pub mod queue;
