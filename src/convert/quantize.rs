//! `edgellm quantize`: a GGUF's matrices requantized to another type.

use super::writer::GgufWriter;
use crate::gguf::{Gguf, Value};
use crate::kernels::quant::{dequantize_row, quantize, GgmlType};

/// The types `quantize` writes (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantType {
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q8_0")]
    Q8_0,
}

impl QuantType {
    pub fn ggml(self) -> GgmlType {
        match self {
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q4_1 => GgmlType::Q4_1,
            QuantType::Q5_0 => GgmlType::Q5_0,
            QuantType::Q5_1 => GgmlType::Q5_1,
            QuantType::Q8_0 => GgmlType::Q8_0,
        }
    }
}

/// A copy of `g` with its 2-D weight matrices re-encoded as `ty`, as `llama-quantize
/// --allow-requantize` does for the non-K types: the token embeddings (which are also the output
/// matrix when tied) keep their type when they are Q8_0 or better, 1-D tensors stay F32, and
/// `general.file_type` is updated.
pub fn requantize(g: &Gguf, ty: GgmlType) -> Vec<u8> {
    let mut w = GgufWriter::new();
    let file_type = match ty {
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q8_0 => 7,
        _ => 0,
    };
    for k in &g.keys {
        if k == "general.file_type" {
            w.kv(k, Value::U32(file_type));
        } else {
            w.kv(k, g.metadata[k].clone());
        }
    }
    let keep_embd = matches!(
        g.tensor("token_embd.weight").map(|t| t.ty),
        Some(GgmlType::Q8_0 | GgmlType::F16 | GgmlType::F32)
    ) && g.tensor("output.weight").is_none();
    for t in &g.tensors {
        let convert = t.dims.len() == 2
            && t.ty != ty
            && t.ty.supported()
            && t.dims[0] % ty.block_size() as u64 == 0
            && !(keep_embd && t.name == "token_embd.weight");
        if convert {
            let cols = t.dims[0] as usize;
            let data = g.tensor_data(t);
            let rb = t.ty.row_bytes(cols);
            let mut row = vec![0f32; cols];
            let mut out = Vec::with_capacity(ty.row_bytes(cols) * data.len() / rb);
            for r in data.chunks_exact(rb) {
                dequantize_row(t.ty, r, &mut row);
                out.extend_from_slice(&quantize(ty, &row));
            }
            w.tensor(&t.name, &t.dims, ty, out);
        } else {
            w.tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
        }
    }
    w.to_bytes()
}
