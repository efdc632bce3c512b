//! One integration test binary (as ripgrep does): each module guards one part.
//!
//! - `cli`: `models` against a local package index, `chat` and progress bars on a pty, `info`.
//! - `gguf_errors`: malformed files are typed errors, never panics.
//! - `fuzz`: deterministic mutators over GGUF headers and request lines.
//! - `engine`: a synthetic model through the whole engine (runs under qemu on aarch64 too).
//! - `daemon`: config, protocol, queue; `edgellm serve` over a real socket, notify, units.
//! - `http`: the HTTP API against the official `openai` and `ollama` Python clients.
//! - `mqtt`: the MQTT front-end against real mosquitto brokers.
//! - `package`: the Debian packages: contents, lintian, dpkg on this machine, and booted
//!   under systemd in a Debian root with `systemd-nspawn`.
//! - `ort`: the ONNX Runtime backend on real ONNX Runtime and onnxruntime-genai's model.
//! - `npu`: `export-onnx --target qnn` run by Qualcomm's QNN provider on its HTP simulator.
//! - `smollm2`: the real default model against llama.cpp's reference data, and the CLI.
//! - `quantize`: `edgellm quantize --calibrate` (GPTQ) on a synthetic model and the default one.
//! - `qwen`: the second real model (Qwen2.5-Coder-0.5B Q4_K_M) against llama.cpp's reference.

mod cli;
mod common;
mod daemon;
mod engine;
mod fuzz;
mod gguf_errors;
mod http;
mod mqtt;
mod npu;
mod ort;
mod package;
mod quantize;
mod qwen;
mod smollm2;
