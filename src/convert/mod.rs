//! Converters: tools that read one model file and write another. They sit beside the
//! application layer and may use any layer below it; nothing in the daemon imports them.
//!
//! - [`writer`]: the GGUF writer (the layout [`crate::gguf`] reads).
//! - [`quantize`]: `edgellm quantize`, a GGUF's matrices requantized to another type, rounded
//!   to nearest or by [`gptq`] against the activations of a [`calibrate`] run.
//! - [`export_onnx`]: `edgellm export-onnx`, a GGUF's int4 weights as an ONNX model folder in
//!   onnxruntime-genai's layout, for the ORT backend.
//! - [`export_npu`]: `edgellm export-onnx --target qnn`, static-shape QDQ graphs calibrated on
//!   the int4 engine, for an NPU's execution provider.

pub mod calibrate;
pub mod export_npu;
pub mod export_onnx;
pub mod gptq;
pub mod quantize;
pub mod writer;
