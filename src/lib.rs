//! edgellm: a headless LLM daemon for ARM edge boards.
//!
//! The modules follow the data flow of a request:
//!
//! ```text
//! frontend (cli, later unix socket and MQTT)
//!   → queue    (request, completion, finish reasons; the bounded queue of the daemon)
//!   → engine   (tokenizer → chat template → prefill → decode loop → sampler → text stream)
//!   → backend  (the Backend trait; cpu: the int4 engine on a mapped GGUF)
//!   → kernels  (block formats, scalar/AVX2/NEON dot products, thread pool, matmul)
//! ```
//!
//! Beside them: [`gguf`] reads the weight file in place (memory-mapped, bounds-checked), and
//! [`bench`] measures prompt and generation speed as `llama-bench` does, and [`testing`] writes
//! small synthetic models for the tests.

pub mod backend;
pub mod bench;
pub mod engine;
pub mod frontend;
pub mod gguf;
pub mod kernels;
pub mod queue;
pub mod testing;
