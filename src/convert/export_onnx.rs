//! `edgellm export-onnx MODEL.gguf OUT/`: a GGUF llama model as an ONNX decoder folder in
//! onnxruntime-genai's layout (`genai_config.json`, `model.onnx` + `model.onnx.data`,
//! `tokenizer.json`, `chat_template.jinja`), so that the ORT backend runs the same weights as
//! the int4 engine and each can check the other.
//!
//! Weights: every 4-bit matrix becomes a `com.microsoft:MatMulNBits` (bits 4, block 32) that
//! keeps the GGUF's 4-bit codes and scales as they are — only the nibbles move, since ggml packs
//! element j with j + 16 in a byte and MatMulNBits packs 2j with 2j + 1:
//! - Q4_0 (`d × (q − 8)`): scale d, the default zero point 8.
//! - Q4_1 (`d × q + m`): scale d, the default zero point 8, and the rest added back exactly:
//!   `x · (d q + m)ᵀ = MatMulNBits(x) + BlockSums(x) · Mᵀ`, where BlockSums sums x over each
//!   block of 32 (Reshape + ReduceSum) and M holds each block's `m + 8d`. (ORT also takes float zero
//!   points, `(q − (−m/d)) × d`, but only on a slow dequantizing path: 8.6 tokens/s instead of
//!   ~100 on SmolLM2.)
//! - Q8_0 (the tied embedding of SmolLM2): MatMulNBits with bits 8 (codes + 128, zero point 128)
//!   for the LM head, and `GatherBlockQuantized` (bits 8) reading the same bytes for the
//!   embedding lookup.
//!
//! Other types (F32/F16 norms) are written as f32.
//!
//! Graph, per layer: SimplifiedLayerNormalization → one MatMulNBits for q, k and v stacked
//! (one each when their types differ) → GroupQueryAttention on the packed QKV (rotary inside,
//! interleaved pairs as GGUF's llama weights expect; cos/sin tables from the GGUF's
//! `rope.freq_base` for the trained context) → o MatMulNBits → residual Add →
//! SimplifiedLayerNormalization → one MatMulNBits for gate and up stacked, Split → SiLU
//! (x · sigmoid x) × up → down MatMulNBits → residual Add; then the final norm and the LM head. Positions come from the
//! attention mask, as in genai's graphs (no `position_ids`).

use std::io::Write;
use std::path::Path;

use crate::backend::cpu::model::{Arch, Config, ModelError, RopeStyle};
use crate::backend::ort::onnx::{
    self, attr_float, attr_int, dtype, node, value_info, NodeProto, TensorProto,
};
use crate::gguf::{Gguf, TensorInfo};
use crate::kernels::quant::{dequantize_row, GgmlType};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// What the export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub out: String,
    pub layers: usize,
    /// Matrices whose 4-bit codes were kept as they are, by GGUF type.
    pub int4_matrices: Vec<(String, usize)>,
    pub int8_matrices: usize,
    pub data_bytes: u64,
}

/// Initializer bytes go to `model.onnx.data`; the graph refers to them by offset.
pub(crate) struct Data {
    pub(crate) file: std::io::BufWriter<std::fs::File>,
    pub(crate) path: String,
    pub(crate) offset: u64,
    pub(crate) inits: Vec<TensorProto>,
}

impl Data {
    pub(crate) fn add(
        &mut self,
        name: &str,
        data_type: i32,
        dims: &[i64],
        bytes: &[u8],
    ) -> Result<(), ExportError> {
        // Small tensors (constants that shape inference reads) stay in the graph.
        if bytes.len() < 1024 {
            self.inits.push(TensorProto {
                name: name.into(),
                dims: dims.to_vec(),
                data_type,
                raw_data: bytes.to_vec(),
                ..Default::default()
            });
            return Ok(());
        }
        // 64-byte alignment, so that ORT may map the tensors in place.
        let pad = (64 - self.offset % 64) % 64;
        let io = |source| ExportError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        self.offset += pad;
        self.file
            .write_all(bytes)
            .map_err(|source| ExportError::Io {
                path: self.path.clone(),
                source,
            })?;
        let entry = |k: &str, v: String| onnx::StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type,
            data_location: 1,
            external_data: vec![
                entry("location", "model.onnx.data".into()),
                entry("offset", self.offset.to_string()),
                entry("length", bytes.len().to_string()),
            ],
            ..Default::default()
        });
        self.offset += bytes.len() as u64;
        Ok(())
    }

    pub(crate) fn add_f32(
        &mut self,
        name: &str,
        dims: &[i64],
        v: &[f32],
    ) -> Result<(), ExportError> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add(name, dtype::FLOAT, dims, &bytes)
    }
}

/// Whether the GGUF matrices `names` are all of one (exportable 4-bit or 8-bit) type and row
/// length, so that one MatMulNBits can hold them.
fn same_type(g: &Gguf, names: &[String]) -> bool {
    let ts: Vec<_> = names.iter().filter_map(|n| g.tensor(n)).collect();
    ts.len() == names.len()
        && ts.iter().all(|t| {
            t.ty == ts[0].ty
                && t.dims[0] == ts[0].dims[0]
                && matches!(t.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
        })
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// A GGUF 4- or 8-bit matrix in MatMulNBits' layout: codes [N, blocks, 16 or 32], scales
/// [N × blocks]; for Q4_1 also each block's offset m [N × blocks].
struct NBits {
    bits: i64,
    codes: Vec<u8>,
    scales: Vec<f32>,
    offsets: Option<Vec<f32>>,
}

fn nbits(g: &Gguf, t: &TensorInfo) -> Result<NBits, ExportError> {
    let data = g.tensor_data(t);
    let k = t.dims[0] as usize;
    if !k.is_multiple_of(32) {
        return Err(ExportError::Unsupported(format!(
            "{}: rows of {k} values are not whole blocks of 32",
            t.name
        )));
    }
    let blocks = data.len() / t.ty.type_size();
    let mut out = NBits {
        bits: 4,
        codes: Vec::with_capacity(blocks * 16),
        scales: Vec::with_capacity(blocks),
        offsets: None,
    };
    match t.ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let q41 = t.ty == GgmlType::Q4_1;
            let size = if q41 { 20 } else { 18 };
            let mut zeros = Vec::with_capacity(if q41 { blocks } else { 0 });
            for b in data.chunks_exact(size) {
                let d = f16(&b[0..2]);
                let qs = &b[size - 16..];
                let mut c = [0u8; 32];
                #[allow(clippy::needless_range_loop)]
                for j in 0..16 {
                    c[j] = qs[j] & 0x0f;
                    c[j + 16] = qs[j] >> 4;
                }
                if q41 {
                    zeros.push(f16(&b[2..4]));
                }
                out.scales.push(d);
                out.codes.extend((0..16).map(|j| c[2 * j] | (c[2 * j + 1] << 4)));
            }
            if q41 {
                out.offsets = Some(zeros);
            }
        }
        GgmlType::Q8_0 => {
            out.bits = 8;
            for b in data.chunks_exact(34) {
                out.scales.push(f16(&b[0..2]));
                out.codes.extend(b[2..34].iter().map(|&q| q ^ 0x80));
            }
        }
        other => {
            return Err(ExportError::Unsupported(format!(
                "{}: type {other:?} has no MatMulNBits form here (Q4_0, Q4_1, Q8_0 are exported; requantize first with `edgellm quantize --type q4_0`)",
                t.name
            )))
        }
    }
    Ok(out)
}

struct Builder<'a> {
    g: &'a Gguf,
    data: Data,
    nodes: Vec<NodeProto>,
    int4: std::collections::BTreeMap<String, usize>,
    int8: usize,
    /// Names of block-sum activations and constants already in the graph.
    sums: std::collections::HashSet<String>,
    accuracy_level: i64,
}

impl Builder<'_> {
    /// `y = x · Wᵀ` for GGUF matrix `name` (MatMulNBits).
    fn matmul(&mut self, name: &str, x: &str, y: &str) -> Result<(), ExportError> {
        self.matmul_fused(&[name], x, y)
    }

    /// `y = x · [W₁; W₂; …]ᵀ`: GGUF matrices of one type reading the same `x`, stacked along
    /// N into one MatMulNBits (q/k/v, gate/up: one pass over `x`, one node instead of several).
    /// The first matrix's name names the initializers.
    fn matmul_fused(&mut self, names: &[&str], x: &str, y: &str) -> Result<(), ExportError> {
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            let t = self
                .g
                .require_tensor(name)
                .map_err(ModelError::from)?
                .clone();
            let q = nbits(self.g, &t)?;
            parts.push((t, q));
        }
        let (t0, q0) = &parts[0];
        let k = t0.dims[0] as i64;
        for (t, q) in &parts[1..] {
            if t.ty != t0.ty || t.dims[0] as i64 != k || q.bits != q0.bits {
                return Err(ExportError::Unsupported(format!(
                    "{} and {} cannot share one MatMulNBits: types {:?}/{:?}, rows of {}/{}",
                    t0.name, t.name, t0.ty, t.ty, k, t.dims[0]
                )));
            }
        }
        let (ty, bits) = (t0.ty, q0.bits);
        let n: i64 = parts.iter().map(|(t, _)| t.dims[1] as i64).sum();
        let name = names[0];
        let mut q = NBits {
            bits,
            codes: Vec::new(),
            scales: Vec::new(),
            offsets: parts[0].1.offsets.as_ref().map(|_| Vec::new()),
        };
        for (_, p) in parts {
            q.codes.extend(p.codes);
            q.scales.extend(p.scales);
            if let (Some(all), Some(o)) = (q.offsets.as_mut(), p.offsets) {
                all.extend(o);
            }
        }
        let blocks = k / 32;
        let blob = 32 * q.bits / 8;
        self.data.add(
            &format!("{name}.q"),
            dtype::UINT8,
            &[n, blocks, blob],
            &q.codes,
        )?;
        self.data
            .add_f32(&format!("{name}.scales"), &[n * blocks], &q.scales)?;
        let mut inputs = vec![x.to_string(), format!("{name}.q"), format!("{name}.scales")];
        let blocks_u = blocks as usize;
        if q.bits == 8 {
            // The default zero point of MatMulNBits is 2^(bits−1); say it anyway (the embedding
            // lookup reads the same tensor).
            let zp = vec![128u8; (n * blocks) as usize];
            self.data
                .add(&format!("{name}.zeros"), dtype::UINT8, &[n * blocks], &zp)?;
            inputs.push(format!("{name}.zeros"));
        }
        let product = if q.offsets.is_some() {
            format!("{y}.dq")
        } else {
            y.to_string()
        };
        if let Some(m) = &q.offsets {
            // d·q + m = d·(q − 8) + (m + 8d): MatMulNBits with its default zero point 8 gives
            // x·(d·(q − 8))ᵀ, and Σ_blocks (m + 8d)·(Σ x in the block) — an f32 MatMul of x's
            // block sums [.., K/32] with the offsets [K/32, N] — adds the rest. Centred codes
            // matter at accuracy level 4: the int8 rounding error of x meets weights around 0,
            // as in the int4 engine, not codes 0..15 all of one sign.
            let mut mt = vec![0f32; m.len()];
            for (row, r) in m.chunks_exact(blocks_u).enumerate() {
                for (blk, v) in r.iter().enumerate() {
                    mt[blk * n as usize + row] = *v + 8.0 * q.scales[row * blocks_u + blk];
                }
            }
            self.data
                .add_f32(&format!("{name}.offsets"), &[blocks, n], &mt)?;
            let sums = self.block_sums(x, k)?;
            self.op(
                "MatMul",
                &format!("{name}.offset"),
                &[&sums, &format!("{name}.offsets")],
                &[&format!("{y}.off")],
                vec![],
            );
            self.nodes.push(node(
                "Add",
                "",
                &format!("{name}.add"),
                &[&product, &format!("{y}.off")],
                &[y],
                vec![],
            ));
        }
        if q.bits == 4 {
            *self.int4.entry(format!("{ty:?}")).or_default() += names.len();
        } else {
            self.int8 += names.len();
        }
        let ins: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.nodes.push(node(
            "MatMulNBits",
            "com.microsoft",
            &format!("{name}.matmul"),
            &ins,
            &[&product],
            vec![
                attr_int("K", k),
                attr_int("N", n),
                attr_int("bits", q.bits),
                attr_int("block_size", 32),
                attr_int("accuracy_level", self.accuracy_level),
            ],
        ));
        Ok(())
    }

    /// The sums of `x` over each block of 32 along its last axis, [.., K/32]: computed once
    /// per activation and shared by the matrices that read it.
    fn block_sums(&mut self, x: &str, k: i64) -> Result<String, ExportError> {
        let out = format!("{x}.blocksums");
        if self.sums.contains(&out) {
            return Ok(out);
        }
        let shape = format!("blocks{k}.shape");
        if !self.sums.contains(&shape) {
            let v: Vec<u8> = [0i64, 0, k / 32, 32]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            self.data.add(&shape, dtype::INT64, &[4], &v)?;
            self.sums.insert(shape.clone());
        }
        if !self.sums.contains("minus_one") {
            self.data
                .add("minus_one", dtype::INT64, &[1], &(-1i64).to_le_bytes())?;
            self.sums.insert("minus_one".into());
        }
        let blocked = format!("{x}.blocked");
        self.op("Reshape", &blocked, &[x, &shape], &[&blocked], vec![]);
        self.op(
            "ReduceSum",
            &out,
            &[&blocked, "minus_one"],
            &[&out],
            vec![attr_int("keepdims", 0)],
        );
        self.sums.insert(out.clone());
        Ok(out)
    }

    /// A norm weight (any float type) as f32.
    fn vector(&mut self, name: &str) -> Result<(), ExportError> {
        let t = self
            .g
            .require_tensor(name)
            .map_err(ModelError::from)?
            .clone();
        let n = t.n_elements() as usize;
        let mut v = vec![0f32; n];
        dequantize_row(t.ty, self.g.tensor_data(&t), &mut v);
        self.data.add_f32(name, &[n as i64], &v)
    }

    fn op(
        &mut self,
        op: &str,
        name: &str,
        ins: &[&str],
        outs: &[&str],
        attrs: Vec<onnx::AttributeProto>,
    ) {
        self.nodes.push(node(op, "", name, ins, outs, attrs));
    }
}

/// Writes the ONNX folder for the GGUF at `gguf` into `out` (created if missing).
/// `accuracy_level` is MatMulNBits': 4 quantizes activations to int8 per block (fast, as the
/// int4 engine does), 1 keeps them in f32 (exact, as the int4 engine's reference kernels).
pub fn export(gguf: &Path, out: &Path, accuracy_level: i64) -> Result<ExportReport, ExportError> {
    export_with_progress(gguf, out, accuracy_level, &mut |_, _| {})
}

/// As [`export`]; `progress(layers_written, n_layer)` is called as the layers are written.
pub fn export_with_progress(
    gguf: &Path,
    out: &Path,
    accuracy_level: i64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport, ExportError> {
    if !(0..=4).contains(&accuracy_level) {
        return Err(ExportError::Unsupported(format!(
            "accuracy level {accuracy_level}: allowed 0..=4"
        )));
    }
    let g = Gguf::open(gguf).map_err(ModelError::from)?;
    let c = Config::from_gguf(&g)?;
    if c.arch != Arch::Llama || c.rope_style != RopeStyle::Interleaved {
        return Err(ExportError::Unsupported(format!(
            "architecture {} (export-onnx writes llama models)",
            c.arch.name()
        )));
    }
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| ExportError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let data_path = out.join("model.onnx.data");
    let file = std::fs::File::create(&data_path).map_err(io(&data_path))?;
    let mut b = Builder {
        g: &g,
        data: Data {
            file: std::io::BufWriter::new(file),
            path: data_path.display().to_string(),
            offset: 0,
            inits: Vec::new(),
        },
        nodes: Vec::new(),
        int4: Default::default(),
        int8: 0,
        sums: Default::default(),
        accuracy_level,
    };
    let (hd, eps) = (c.head_dim as i64, c.eps);
    let max_pos = c.train_ctx.clamp(2, 1 << 17);

    // Positions from the mask, as genai's graphs do: seqlens_k = Σmask − 1, total = mask width.
    b.data.add("one", dtype::INT64, &[1], &1i64.to_le_bytes())?;
    b.op(
        "ReduceSum",
        "mask_sum",
        &["attention_mask", "one"],
        &["mask_sum"],
        vec![attr_int("keepdims", 0)],
    );
    b.op(
        "Sub",
        "mask_last",
        &["mask_sum", "one"],
        &["mask_last"],
        vec![],
    );
    b.op(
        "Cast",
        "seqlens_k",
        &["mask_last"],
        &["seqlens_k"],
        vec![attr_int("to", dtype::INT32 as i64)],
    );
    b.op(
        "Shape",
        "mask_shape",
        &["attention_mask"],
        &["mask_shape"],
        vec![],
    );
    b.data.add("idx1", dtype::INT64, &[], &1i64.to_le_bytes())?;
    b.op(
        "Gather",
        "total_len",
        &["mask_shape", "idx1"],
        &["total_len64"],
        vec![attr_int("axis", 0)],
    );
    b.op(
        "Cast",
        "total_len32",
        &["total_len64"],
        &["total_len"],
        vec![attr_int("to", dtype::INT32 as i64)],
    );

    // RoPE tables: cos/sin of p · θ^(−2i/d), for the trained context.
    let half = c.head_dim / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for i in 0..half {
            let freq = (c.rope_theta as f64).powf(-2.0 * i as f64 / c.head_dim as f64);
            let a = p as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    b.data
        .add_f32("cos_cache", &[max_pos as i64, half as i64], &cos)?;
    b.data
        .add_f32("sin_cache", &[max_pos as i64, half as i64], &sin)?;

    // Embedding: the token table's rows. Tied to the LM head and quantized (SmolLM2): read in
    // place from the head's MatMulNBits blocks by GatherBlockQuantized, as genai's graphs do.
    let embd = g
        .require_tensor("token_embd.weight")
        .map_err(ModelError::from)?
        .clone();
    let tied = g.tensor("output.weight").is_none();
    let bits = match embd.ty {
        GgmlType::Q8_0 => Some(8),
        GgmlType::Q4_0 | GgmlType::Q4_1 => Some(4),
        _ => None,
    };
    let (k, n) = (embd.dims[0] as i64, embd.dims[1] as i64);
    match bits {
        Some(bits) if tied && embd.ty != GgmlType::Q4_1 => {
            b.data.add(
                "embd.shape.q",
                dtype::INT64,
                &[2],
                &[n, k * bits / 8]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>(),
            )?;
            b.data.add(
                "embd.shape.s",
                dtype::INT64,
                &[2],
                &[n, k / 32]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>(),
            )?;
            b.op(
                "Reshape",
                "embd.q",
                &["token_embd.weight.q", "embd.shape.q"],
                &["embd.q"],
                vec![],
            );
            b.op(
                "Reshape",
                "embd.s",
                &["token_embd.weight.scales", "embd.shape.s"],
                &["embd.s"],
                vec![],
            );
            let mut ins = vec!["embd.q", "input_ids", "embd.s"];
            if bits == 8 {
                b.op(
                    "Reshape",
                    "embd.z",
                    &["token_embd.weight.zeros", "embd.shape.s"],
                    &["embd.z"],
                    vec![],
                );
                ins.push("embd.z");
            }
            b.nodes.push(node(
                "GatherBlockQuantized",
                "com.microsoft",
                "embed",
                &ins,
                &["h0"],
                vec![
                    attr_int("bits", bits),
                    attr_int("block_size", 32),
                    attr_int("gather_axis", 0),
                    attr_int("quantize_axis", 1),
                ],
            ));
        }
        _ => {
            // Anything else: the table in f32.
            let (k, n) = (k as usize, n as usize);
            let mut v = vec![0f32; k * n];
            let row = embd.n_bytes as usize / n;
            for (r, out_row) in v.chunks_exact_mut(k).enumerate() {
                dequantize_row(
                    embd.ty,
                    &g.tensor_data(&embd)[r * row..(r + 1) * row],
                    out_row,
                );
            }
            b.data.add_f32("embd.f32", &[n as i64, k as i64], &v)?;
            b.op(
                "Gather",
                "embed",
                &["embd.f32", "input_ids"],
                &["h0"],
                vec![attr_int("axis", 0)],
            );
        }
    }

    let mut h = "h0".to_string();
    for i in 0..c.n_layer {
        progress(i, c.n_layer);
        let p = |s: &str| format!("blk.{i}.{s}");
        let o = |s: &str| format!("l{i}.{s}");
        b.vector(&p("attn_norm.weight"))?;
        b.op(
            "SimplifiedLayerNormalization",
            &o("attn_norm"),
            &[&h, &p("attn_norm.weight")],
            &[&o("attn_in")],
            vec![attr_float("epsilon", eps), attr_int("axis", -1)],
        );
        // q, k and v in one MatMulNBits when they share a type (GroupQueryAttention takes
        // them packed, as the genai builder writes them); else one each.
        let qkv = [p("attn_q.weight"), p("attn_k.weight"), p("attn_v.weight")];
        let packed = same_type(&g, &qkv);
        if packed {
            let names: Vec<&str> = qkv.iter().map(String::as_str).collect();
            b.matmul_fused(&names, &o("attn_in"), &o("qkv"))?;
        } else {
            b.matmul(&qkv[0], &o("attn_in"), &o("q"))?;
            b.matmul(&qkv[1], &o("attn_in"), &o("k"))?;
            b.matmul(&qkv[2], &o("attn_in"), &o("v"))?;
        }
        let (q_in, k_in, v_in) = if packed {
            (o("qkv"), String::new(), String::new())
        } else {
            (o("q"), o("k"), o("v"))
        };
        let (pk, pv) = (
            format!("past_key_values.{i}.key"),
            format!("past_key_values.{i}.value"),
        );
        let (rk, rv) = (format!("present.{i}.key"), format!("present.{i}.value"));
        b.nodes.push(node(
            "GroupQueryAttention",
            "com.microsoft",
            &o("attn"),
            &[
                &q_in,
                &k_in,
                &v_in,
                &pk,
                &pv,
                "seqlens_k",
                "total_len",
                "cos_cache",
                "sin_cache",
            ],
            &[&o("attn_out"), &rk, &rv],
            vec![
                attr_int("num_heads", c.n_head as i64),
                attr_int("kv_num_heads", c.n_kv_head as i64),
                attr_float("scale", 1.0 / (hd as f32).sqrt()),
                attr_int("do_rotary", 1),
                attr_int("rotary_interleaved", 1),
                attr_int("local_window_size", -1),
            ],
        ));
        b.matmul(&p("attn_output.weight"), &o("attn_out"), &o("attn_proj"))?;
        b.op(
            "Add",
            &o("res1"),
            &[&h, &o("attn_proj")],
            &[&o("h_attn")],
            vec![],
        );
        b.vector(&p("ffn_norm.weight"))?;
        b.op(
            "SimplifiedLayerNormalization",
            &o("ffn_norm"),
            &[&o("h_attn"), &p("ffn_norm.weight")],
            &[&o("ffn_in")],
            vec![attr_float("epsilon", eps), attr_int("axis", -1)],
        );
        let gate_up = [p("ffn_gate.weight"), p("ffn_up.weight")];
        if same_type(&g, &gate_up) {
            // One MatMulNBits for both, split in halves after.
            let ffn = g
                .require_tensor(&gate_up[0])
                .map_err(ModelError::from)?
                .dims[1] as i64;
            let names: Vec<&str> = gate_up.iter().map(String::as_str).collect();
            b.matmul_fused(&names, &o("ffn_in"), &o("gate_up"))?;
            let halves = format!("ffn{ffn}.halves");
            if !b.sums.contains(&halves) {
                let v: Vec<u8> = [ffn, ffn].iter().flat_map(|v| v.to_le_bytes()).collect();
                b.data.add(&halves, dtype::INT64, &[2], &v)?;
                b.sums.insert(halves.clone());
            }
            b.op(
                "Split",
                &o("split"),
                &[&o("gate_up"), &halves],
                &[&o("gate"), &o("up")],
                vec![attr_int("axis", -1)],
            );
        } else {
            b.matmul(&gate_up[0], &o("ffn_in"), &o("gate"))?;
            b.matmul(&gate_up[1], &o("ffn_in"), &o("up"))?;
        }
        b.op(
            "Sigmoid",
            &o("sig"),
            &[&o("gate")],
            &[&o("gate_sig")],
            vec![],
        );
        b.op(
            "Mul",
            &o("silu"),
            &[&o("gate"), &o("gate_sig")],
            &[&o("act")],
            vec![],
        );
        b.op(
            "Mul",
            &o("glu"),
            &[&o("act"), &o("up")],
            &[&o("ffn_mid")],
            vec![],
        );
        b.matmul(&p("ffn_down.weight"), &o("ffn_mid"), &o("ffn_out"))?;
        let next = format!("h{}", i + 1);
        b.op(
            "Add",
            &o("res2"),
            &[&o("h_attn"), &o("ffn_out")],
            &[&next],
            vec![],
        );
        h = next;
    }
    b.vector("output_norm.weight")?;
    b.op(
        "SimplifiedLayerNormalization",
        "final_norm",
        &[&h, "output_norm.weight"],
        &["h_final"],
        vec![attr_float("epsilon", eps), attr_int("axis", -1)],
    );
    let head = if g.tensor("output.weight").is_some() {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    b.matmul(head, "h_final", "logits")?;

    let f = dtype::FLOAT;
    let kvh = c.n_kv_head as i64;
    let mut inputs = vec![
        value_info(
            "input_ids",
            dtype::INT64,
            &[Err("batch_size"), Err("sequence_length")],
        ),
        value_info(
            "attention_mask",
            dtype::INT64,
            &[Err("batch_size"), Err("total_sequence_length")],
        ),
    ];
    let mut outputs = vec![value_info(
        "logits",
        f,
        &[
            Err("batch_size"),
            Err("sequence_length"),
            Ok(c.vocab as i64),
        ],
    )];
    for i in 0..c.n_layer {
        for kv in ["key", "value"] {
            inputs.push(value_info(
                &format!("past_key_values.{i}.{kv}"),
                f,
                &[
                    Err("batch_size"),
                    Ok(kvh),
                    Err("past_sequence_length"),
                    Ok(hd),
                ],
            ));
            outputs.push(value_info(
                &format!("present.{i}.{kv}"),
                f,
                &[
                    Err("batch_size"),
                    Ok(kvh),
                    Err("total_sequence_length"),
                    Ok(hd),
                ],
            ));
        }
    }
    let Builder {
        data,
        nodes,
        int4,
        int8,
        ..
    } = b;
    let Data {
        mut file,
        offset,
        inits,
        ..
    } = data;
    file.flush().map_err(io(&data_path))?;
    drop(file);
    let model = onnx::ModelProto {
        ir_version: 10,
        opset_import: vec![
            onnx::OperatorSetIdProto {
                domain: String::new(),
                version: 21,
            },
            onnx::OperatorSetIdProto {
                domain: "com.microsoft".into(),
                version: 1,
            },
        ],
        producer_name: "edgellm export-onnx".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(onnx::GraphProto {
            name: "edgellm-decoder".into(),
            node: nodes,
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    let model_path = out.join("model.onnx");
    std::fs::write(&model_path, prost::Message::encode_to_vec(&model)).map_err(io(&model_path))?;

    write_side_files(&g, &c, out, gguf)?;
    Ok(ExportReport {
        out: out.display().to_string(),
        layers: c.n_layer,
        int4_matrices: int4.into_iter().collect(),
        int8_matrices: int8,
        data_bytes: offset,
    })
}

/// `genai_config.json`, `tokenizer.json` (the GGUF tokenizer as the engine builds it) and
/// `chat_template.jinja`.
fn write_side_files(g: &Gguf, c: &Config, out: &Path, gguf: &Path) -> Result<(), ExportError> {
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| ExportError::Io { path, source }
    };
    let tok = write_tokenizer_files(g, out, gguf)?;
    let eos: Vec<u32> = tok.eos.into_iter().collect();
    let cfg = serde_json::json!({
        "model": {
            "bos_token_id": tok.bos,
            "eos_token_id": if eos.len() == 1 { serde_json::json!(eos[0]) } else { serde_json::json!(eos) },
            "pad_token_id": tok.eos,
            "context_length": c.train_ctx,
            "type": "llama",
            "vocab_size": c.vocab,
            "decoder": {
                "filename": "model.onnx",
                "head_size": c.head_dim,
                "hidden_size": c.dim,
                "num_attention_heads": c.n_head,
                "num_hidden_layers": c.n_layer,
                "num_key_value_heads": c.n_kv_head,
                "session_options": {"log_id": "edgellm", "provider_options": []},
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value"
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"
                }
            }
        },
        "search": {"max_length": c.train_ctx, "past_present_share_buffer": true, "do_sample": false}
    });
    let p = out.join("genai_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap_or_default()).map_err(io(&p))?;
    Ok(())
}

/// `tokenizer.json` (the GGUF tokenizer as the engine builds it) and `chat_template.jinja`;
/// returns the tokenizer.
pub(crate) fn write_tokenizer_files(
    g: &Gguf,
    out: &Path,
    gguf: &Path,
) -> Result<crate::engine::tokenizer::Tokenizer, ExportError> {
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| ExportError::Io { path, source }
    };
    let tok = crate::engine::tokenizer::Tokenizer::from_gguf(g, gguf.parent())
        .map_err(|e| ExportError::Unsupported(format!("tokenizer: {e}")))?;
    let p = out.join("tokenizer.json");
    let json = tok
        .to_json()
        .map_err(|e| ExportError::Unsupported(format!("tokenizer: {e}")))?;
    std::fs::write(&p, json).map_err(io(&p))?;
    if let Ok(t) = g.get_str("tokenizer.chat_template") {
        let p = out.join("chat_template.jinja");
        std::fs::write(&p, t).map_err(io(&p))?;
    }
    Ok(tok)
}
