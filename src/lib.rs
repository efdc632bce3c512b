//! edgellm: a headless LLM daemon for ARM edge boards.
//!
//! The modules follow the data flow of a request:
//!
//! ```text
//! frontend (cli; the daemon's unix socket, and its JSON protocol)
//!   → queue    (request, completion, finish reasons; the bounded priority queue with deadlines)
//!   → engine   (tokenizer → chat template → prefill → decode loop → sampler → text stream;
//!               the daemon's engine worker thread)
//!   → backend  (the Backend trait; cpu: the int4 engine on a mapped GGUF)
//!   → kernels  (block formats, scalar/AVX2/NEON dot products, thread pool, matmul)
//! ```
//!
//! [`daemon`] puts front-ends, queue and engine worker together under systemd (`edgellm serve`),
//! configured by [`config`]. Beside them: [`gguf`] reads the weight file in place (memory-mapped, bounds-checked), and
//! [`bench`] measures prompt and generation speed as `llama-bench` does, and [`testing`] writes
//! small synthetic models for the tests.

pub mod backend;
pub mod bench;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod frontend;
pub mod gguf;
pub mod kernels;
pub mod queue;
pub mod testing;
