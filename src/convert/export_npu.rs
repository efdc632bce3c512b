//! `edgellm export-onnx --target qnn MODEL.gguf OUT/ --calibrate FILE`: a GGUF as a pair of
//! static-shape QDQ graphs that an NPU backend compiles (Qualcomm's HTP through ONNX Runtime's
//! QNN execution provider), run by [`crate::backend::ort::npu`].
//!
//! What the HTP takes, and so what is written:
//! - **Static shapes.** `prefill.onnx` runs a chunk of `chunk` tokens, `decode.onnx` one token.
//!   Both read every layer's cache of `n_ctx` positions as inputs (`past_key.L`,
//!   `past_value.L`: `[1, kv_heads, n_ctx, head_dim]`, f32) and write only the new positions
//!   (`key.L`, `value.L`: `[1, kv_heads, T, head_dim]`, after rotary), which the host puts into
//!   its cache; which positions count is the additive mask `attn_mask` (`[1, 1, G·T, n_ctx + T]`
//!   for G query heads per key head). The two graphs share one weight file,
//!   `model.onnx.data`.
//! - **QDQ around every matrix product**: each weight is int8, symmetric, one scale per output
//!   channel (`DequantizeLinear` on axis 1), and each product's input and output pass through
//!   `QuantizeLinear`/`DequantizeLinear` at 16 bits (uint16, asymmetric) with ranges calibrated
//!   by running the int4 engine over `--calibrate FILE` and taking each activation's min and max
//!   ([`crate::backend::cpu::Site`]). The HTP runs these products in integers; the rest (norms,
//!   rotary, the attention over the cache, SiLU) is float and stays on ONNX Runtime's CPU
//!   provider. 16-bit activations: 8 bits lose too much on small models' outliers.
//! - Rotary as halves (`x₁ cos − x₂ sin`, `x₂ cos + x₁ sin` on the two halves of each head): a
//!   llama GGUF's interleaved pairs are turned into halves by permuting the rows of q and k,
//!   which leaves every attention score as it was. The host gives `cos` and `sin`
//!   (`[1, T, 1, head_dim/2]`) for the positions of the chunk.
//! - The embedding lookup is the host's (`embeddings.f16`, `[vocab, dim]`): the graphs start at
//!   `inputs_embeds`.
//!
//! `edgellm_npu.json` says all of this for the backend; `tokenizer.json` and
//! `chat_template.jinja` as in the genai folder.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::backend::cpu::model::{Arch, Config, ModelError, RopeStyle};
use crate::backend::cpu::Site;
use crate::backend::ort::onnx::{
    self, attr_float, attr_int, attr_ints, dtype, node, value_info, NodeProto, TensorProto,
};
use crate::gguf::Gguf;
use crate::kernels::quant::dequantize_row;

use super::export_onnx::{write_tokenizer_files, Data, ExportError};

pub use crate::backend::ort::npu::CONFIG_FILE;

/// What to export.
#[derive(Debug, Clone)]
pub struct NpuExport {
    /// Cache positions the graphs take.
    pub n_ctx: usize,
    /// Tokens of the prefill graph.
    pub chunk: usize,
    /// Calibration text.
    pub calibrate: std::path::PathBuf,
    /// Tokens of calibration text each run of the engine sees (its window).
    pub calib_window: usize,
    /// Most calibration tokens used.
    pub calib_tokens: usize,
}

impl Default for NpuExport {
    fn default() -> Self {
        NpuExport {
            n_ctx: 512,
            chunk: 32,
            calibrate: Default::default(),
            calib_window: 256,
            calib_tokens: 4096,
        }
    }
}

/// What the export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NpuReport {
    pub out: String,
    pub target: &'static str,
    pub layers: usize,
    pub matrices: usize,
    pub weight_bytes: u64,
    pub n_ctx: usize,
    pub chunk: usize,
    pub calibration_tokens: usize,
    pub calibration_sha256: String,
}

/// Min and max of each observed activation.
pub type Ranges = BTreeMap<(usize, Site), (f32, f32)>;

/// Runs the int4 engine on `gguf` over the tokens of `text`, in windows of `window` tokens,
/// and records each activation's range. Returns the ranges and the tokens seen.
pub fn calibrate(
    gguf: &Path,
    text: &str,
    window: usize,
    max_tokens: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Ranges, usize), ExportError> {
    let ids = super::calibrate::tokens(gguf, text, max_tokens)?;
    let ranges = std::sync::Arc::new(std::sync::Mutex::new(Ranges::new()));
    let seen = ranges.clone();
    let observer = Box::new(move |layer, site, v: &[f32], _cols| {
        let (lo, hi) = v
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        if let Ok(mut r) = seen.lock() {
            let e = r.entry((layer, site)).or_insert((lo, hi));
            e.0 = e.0.min(lo);
            e.1 = e.1.max(hi);
        }
    });
    super::calibrate::run(gguf, &ids, window, true, observer, None, progress)?;
    let r = ranges.lock().map(|r| r.clone()).unwrap_or_default();
    Ok((r, ids.len()))
}

/// uint16 scale and zero point covering `[lo, hi]` (and 0).
fn act_qparams(lo: f32, hi: f32) -> (f32, u16) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = ((hi - lo) / 65535.0).max(1e-8);
    let zp = (-lo / scale).round().clamp(0.0, 65535.0) as u16;
    (scale, zp)
}

/// Output row `r` of a head of `hd` rows in interleaved-pair order, as halves: new row `j` is
/// old row `2j` for the first half, `2(j − hd/2) + 1` for the second.
fn halves_row(j: usize, hd: usize) -> usize {
    let half = hd / 2;
    if j < half {
        2 * j
    } else {
        2 * (j - half) + 1
    }
}

struct Graph<'a> {
    g: &'a Gguf,
    c: &'a Config,
    ranges: &'a Ranges,
    data: Data,
    /// Weight initializers written so far, by name (the second graph reuses them).
    weights: BTreeMap<String, TensorProto>,
    /// Small constants of the graph being built.
    consts: Vec<TensorProto>,
    nodes: Vec<NodeProto>,
    matrices: usize,
}

impl Graph<'_> {
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

    fn const_i64(&mut self, name: &str, v: &[i64]) -> String {
        if !self.consts.iter().any(|t| t.name == name) {
            self.consts.push(TensorProto {
                name: name.into(),
                dims: vec![v.len() as i64],
                data_type: dtype::INT64,
                raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ..Default::default()
            });
        }
        name.to_string()
    }

    fn const_f32(&mut self, name: &str, v: f32) -> String {
        if !self.consts.iter().any(|t| t.name == name) {
            self.consts.push(TensorProto {
                name: name.into(),
                dims: vec![],
                data_type: dtype::FLOAT,
                raw_data: v.to_le_bytes().to_vec(),
                ..Default::default()
            });
        }
        name.to_string()
    }

    /// `x` through uint16 QuantizeLinear/DequantizeLinear with the range of `(layer, site)`.
    fn qdq(&mut self, x: &str, layer: usize, site: Site) -> Result<String, ExportError> {
        let &(lo, hi) = self.ranges.get(&(layer, site)).ok_or_else(|| {
            ExportError::Unsupported(format!(
                "calibration saw no {site:?} activation in layer {layer}"
            ))
        })?;
        let (scale, zp) = act_qparams(lo, hi);
        let (s, z) = (format!("{x}.qscale"), format!("{x}.qzero"));
        self.consts.push(TensorProto {
            name: s.clone(),
            dims: vec![],
            data_type: dtype::FLOAT,
            raw_data: scale.to_le_bytes().to_vec(),
            ..Default::default()
        });
        self.consts.push(TensorProto {
            name: z.clone(),
            dims: vec![],
            data_type: dtype::UINT16,
            raw_data: zp.to_le_bytes().to_vec(),
            ..Default::default()
        });
        let (q, dq) = (format!("{x}.q"), format!("{x}.dq"));
        self.op("QuantizeLinear", &q, &[x, &s, &z], &[&q], vec![]);
        self.op("DequantizeLinear", &dq, &[&q, &s, &z], &[&dq], vec![]);
        Ok(dq)
    }

    /// The int8 per-channel form of GGUF matrix `name` as `[K, N]` initializers (written to
    /// the data file once), rows permuted to halves when `rope_heads` is given.
    fn weight(&mut self, name: &str, rope_heads: Option<usize>) -> Result<String, ExportError> {
        let wname = format!("{name}.int8");
        if self.weights.contains_key(&wname) {
            return Ok(wname);
        }
        let t = self
            .g
            .require_tensor(name)
            .map_err(ModelError::from)?
            .clone();
        let (k, n) = (t.dims[0] as usize, t.dims[1] as usize);
        let data = self.g.tensor_data(&t);
        let row_bytes = data.len() / n;
        let hd = self.c.head_dim;
        let mut codes = vec![0i8; k * n];
        let mut scales = vec![0f32; n];
        let mut row = vec![0f32; k];
        for (r, scale) in scales.iter_mut().enumerate() {
            let src = match rope_heads {
                Some(_) => (r / hd) * hd + halves_row(r % hd, hd),
                None => r,
            };
            dequantize_row(
                t.ty,
                &data[src * row_bytes..(src + 1) * row_bytes],
                &mut row,
            );
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            *scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            for (kk, v) in row.iter().enumerate() {
                codes[kk * n + r] = (v / *scale).round().clamp(-127.0, 127.0) as i8;
            }
        }
        let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
        self.data
            .add(&wname, dtype::INT8, &[k as i64, n as i64], &bytes)?;
        self.data
            .add_f32(&format!("{name}.scale"), &[n as i64], &scales)?;
        self.data.add(
            &format!("{name}.zero"),
            dtype::INT8,
            &[n as i64],
            &vec![0u8; n],
        )?;
        self.keep_written();
        self.matrices += 1;
        Ok(wname)
    }

    /// Moves the initializers just written to the data file into `weights`.
    fn keep_written(&mut self) {
        for init in self.data.inits.drain(..) {
            self.weights.insert(init.name.clone(), init);
        }
    }

    /// A float vector of the GGUF (norm weights, biases), permuted to halves when asked.
    fn vector(&mut self, name: &str, rope: bool) -> Result<String, ExportError> {
        if self.weights.contains_key(name) {
            return Ok(name.to_string());
        }
        let t = self
            .g
            .require_tensor(name)
            .map_err(ModelError::from)?
            .clone();
        let n = t.n_elements() as usize;
        let mut v = vec![0f32; n];
        dequantize_row(t.ty, self.g.tensor_data(&t), &mut v);
        if rope {
            let hd = self.c.head_dim;
            let old = v.clone();
            for (r, x) in v.iter_mut().enumerate() {
                *x = old[(r / hd) * hd + halves_row(r % hd, hd)];
            }
        }
        self.data.add_f32(name, &[n as i64], &v)?;
        self.keep_written();
        Ok(name.to_string())
    }

    /// `y = DQ(x) · DQ(W)`, quantized on the way out: the node group the QNN provider takes
    /// whole. `x_dq` is the already quantized-dequantized input.
    fn matmul(
        &mut self,
        w: &str,
        rope: Option<usize>,
        x_dq: &str,
        y: &str,
        layer: usize,
        site: Site,
    ) -> Result<String, ExportError> {
        let wq = self.weight(w, rope)?;
        let wdq = format!("{w}.dq");
        if !self.nodes.iter().any(|n| n.name == wdq) {
            self.op(
                "DequantizeLinear",
                &wdq,
                &[&wq, &format!("{w}.scale"), &format!("{w}.zero")],
                &[&wdq],
                vec![attr_int("axis", 1)],
            );
        }
        self.op(
            "MatMul",
            &format!("{y}.matmul"),
            &[x_dq, &wdq],
            &[y],
            vec![],
        );
        self.qdq(y, layer, site)
    }

    /// Rotary on `x` (`[1, T, heads, hd]`) in halves, with the graph's `cos`/`sin`.
    fn rope(&mut self, x: &str, out: &str) {
        let half = (self.c.head_dim / 2) as i64;
        let split = self.const_i64("rope.split", &[half, half]);
        let (a, b) = (format!("{x}.a"), format!("{x}.b"));
        self.op(
            "Split",
            &format!("{x}.split"),
            &[x, &split],
            &[&a, &b],
            vec![attr_int("axis", -1)],
        );
        let n = |s: &str| format!("{x}.{s}");
        self.op("Mul", &n("acos"), &[&a, "cos"], &[&n("acos")], vec![]);
        self.op("Mul", &n("bsin"), &[&b, "sin"], &[&n("bsin")], vec![]);
        self.op(
            "Sub",
            &n("r1"),
            &[&n("acos"), &n("bsin")],
            &[&n("r1")],
            vec![],
        );
        self.op("Mul", &n("bcos"), &[&b, "cos"], &[&n("bcos")], vec![]);
        self.op("Mul", &n("asin"), &[&a, "sin"], &[&n("asin")], vec![]);
        self.op(
            "Add",
            &n("r2"),
            &[&n("bcos"), &n("asin")],
            &[&n("r2")],
            vec![],
        );
        self.op(
            "Concat",
            out,
            &[&n("r1"), &n("r2")],
            &[out],
            vec![attr_int("axis", -1)],
        );
    }

    /// The decoder for chunks of `t` tokens.
    fn build(&mut self, t: usize) -> Result<(), ExportError> {
        let c = self.c;
        let (hd, nh, nkv, eps) = (
            c.head_dim as i64,
            c.n_head as i64,
            c.n_kv_head as i64,
            c.eps,
        );
        let groups = nh / nkv;
        let t = t as i64;
        let rope_rows = (c.rope_style == RopeStyle::Interleaved).then_some(c.head_dim);
        let scale = self.const_f32("attn.scale", 1.0 / (c.head_dim as f32).sqrt());
        let mut h = "inputs_embeds".to_string();
        for l in 0..c.n_layer {
            let p = |s: &str| format!("blk.{l}.{s}");
            let o = |s: &str| format!("l{l}.{s}");
            let norm = self.vector(&p("attn_norm.weight"), false)?;
            self.op(
                "SimplifiedLayerNormalization",
                &o("attn_norm"),
                &[&h, &norm],
                &[&o("attn_in")],
                vec![attr_float("epsilon", eps), attr_int("axis", -1)],
            );
            let x = self.qdq(&o("attn_in"), l, Site::AttnIn)?;
            let proj = |g: &mut Self,
                        w: &str,
                        b: &str,
                        y: &str,
                        site,
                        rope: bool|
             -> Result<String, ExportError> {
                let r = g.matmul(
                    &p(w),
                    if rope { rope_rows } else { None },
                    &x,
                    &o(y),
                    l,
                    site,
                )?;
                if g.g.tensor(&p(b)).is_some() {
                    let bias = g.vector(&p(b), rope && rope_rows.is_some())?;
                    let out = o(&format!("{y}.biased"));
                    g.op("Add", &out, &[&r, &bias], &[&out], vec![]);
                    return Ok(out);
                }
                Ok(r)
            };
            let q = proj(self, "attn_q.weight", "attn_q.bias", "q", Site::Q, true)?;
            let k = proj(self, "attn_k.weight", "attn_k.bias", "k", Site::K, true)?;
            let v = proj(self, "attn_v.weight", "attn_v.bias", "v", Site::V, false)?;
            let qs = self.const_i64(&format!("shape.q{t}"), &[1, t, nh, hd]);
            let ks = self.const_i64(&format!("shape.kv{t}"), &[1, t, nkv, hd]);
            self.op("Reshape", &o("q4"), &[&q, &qs], &[&o("q4")], vec![]);
            self.op("Reshape", &o("k4"), &[&k, &ks], &[&o("k4")], vec![]);
            self.op("Reshape", &o("v4"), &[&v, &ks], &[&o("v4")], vec![]);
            self.rope(&o("q4"), &o("q_rot"));
            self.rope(&o("k4"), &o("k_rot"));
            let (key, value) = (format!("key.{l}"), format!("value.{l}"));
            self.op(
                "Transpose",
                &o("k_t"),
                &[&o("k_rot")],
                &[&key],
                vec![attr_ints("perm", &[0, 2, 1, 3])],
            );
            self.op(
                "Transpose",
                &o("v_t"),
                &[&o("v4")],
                &[&value],
                vec![attr_ints("perm", &[0, 2, 1, 3])],
            );
            self.op(
                "Concat",
                &o("k_all"),
                &[&format!("past_key.{l}"), &key],
                &[&o("k_all")],
                vec![attr_int("axis", 2)],
            );
            self.op(
                "Concat",
                &o("v_all"),
                &[&format!("past_value.{l}"), &value],
                &[&o("v_all")],
                vec![attr_int("axis", 2)],
            );
            // Queries grouped by the key head they share: [1, kv, G·T, hd].
            let q5 = self.const_i64(&format!("shape.q5_{t}"), &[1, t, nkv, groups, hd]);
            let qg = self.const_i64(&format!("shape.qg{t}"), &[1, nkv, groups * t, hd]);
            self.op(
                "Reshape",
                &o("q5"),
                &[&o("q_rot"), &q5],
                &[&o("q5")],
                vec![],
            );
            self.op(
                "Transpose",
                &o("q5t"),
                &[&o("q5")],
                &[&o("q5t")],
                vec![attr_ints("perm", &[0, 2, 3, 1, 4])],
            );
            self.op("Reshape", &o("qg"), &[&o("q5t"), &qg], &[&o("qg")], vec![]);
            self.op(
                "Transpose",
                &o("k_allt"),
                &[&o("k_all")],
                &[&o("k_allt")],
                vec![attr_ints("perm", &[0, 1, 3, 2])],
            );
            self.op(
                "MatMul",
                &o("scores"),
                &[&o("qg"), &o("k_allt")],
                &[&o("scores")],
                vec![],
            );
            self.op(
                "Mul",
                &o("scaled"),
                &[&o("scores"), &scale],
                &[&o("scaled")],
                vec![],
            );
            self.op(
                "Add",
                &o("masked"),
                &[&o("scaled"), "attn_mask"],
                &[&o("masked")],
                vec![],
            );
            self.op(
                "Softmax",
                &o("probs"),
                &[&o("masked")],
                &[&o("probs")],
                vec![attr_int("axis", -1)],
            );
            self.op(
                "MatMul",
                &o("ctx"),
                &[&o("probs"), &o("v_all")],
                &[&o("ctx")],
                vec![],
            );
            let c5 = self.const_i64(&format!("shape.c5_{t}"), &[1, nkv, groups, t, hd]);
            let cs = self.const_i64(&format!("shape.ctx{t}"), &[1, t, nh * hd]);
            self.op(
                "Reshape",
                &o("ctx5"),
                &[&o("ctx"), &c5],
                &[&o("ctx5")],
                vec![],
            );
            self.op(
                "Transpose",
                &o("ctx5t"),
                &[&o("ctx5")],
                &[&o("ctx5t")],
                vec![attr_ints("perm", &[0, 3, 1, 2, 4])],
            );
            self.op(
                "Reshape",
                &o("attn_out"),
                &[&o("ctx5t"), &cs],
                &[&o("attn_out")],
                vec![],
            );
            let a = self.qdq(&o("attn_out"), l, Site::AttnOut)?;
            let attn = self.matmul(&p("attn_output.weight"), None, &a, &o("o"), l, Site::O)?;
            self.op("Add", &o("res1"), &[&h, &attn], &[&o("h_attn")], vec![]);

            let norm = self.vector(&p("ffn_norm.weight"), false)?;
            self.op(
                "SimplifiedLayerNormalization",
                &o("ffn_norm"),
                &[&o("h_attn"), &norm],
                &[&o("ffn_in")],
                vec![attr_float("epsilon", eps), attr_int("axis", -1)],
            );
            let x = self.qdq(&o("ffn_in"), l, Site::FfnIn)?;
            let gate = self.matmul(&p("ffn_gate.weight"), None, &x, &o("gate"), l, Site::Gate)?;
            let up = self.matmul(&p("ffn_up.weight"), None, &x, &o("up"), l, Site::Up)?;
            self.op("Sigmoid", &o("sig"), &[&gate], &[&o("sig")], vec![]);
            self.op(
                "Mul",
                &o("silu"),
                &[&gate, &o("sig")],
                &[&o("silu")],
                vec![],
            );
            self.op("Mul", &o("glu"), &[&o("silu"), &up], &[&o("mid")], vec![]);
            let m = self.qdq(&o("mid"), l, Site::FfnMid)?;
            let down = self.matmul(&p("ffn_down.weight"), None, &m, &o("down"), l, Site::Down)?;
            let next = format!("h{}", l + 1);
            self.op("Add", &o("res2"), &[&o("h_attn"), &down], &[&next], vec![]);
            h = next;
        }
        let nl = c.n_layer;
        let norm = self.vector("output_norm.weight", false)?;
        self.op(
            "SimplifiedLayerNormalization",
            "final_norm",
            &[&h, &norm],
            &["head_in"],
            vec![attr_float("epsilon", eps), attr_int("axis", -1)],
        );
        let x = self.qdq("head_in", nl, Site::HeadIn)?;
        let head = if self.g.tensor("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let logits = self.matmul(head, None, &x, "logits_q", nl, Site::Logits)?;
        self.op("Identity", "logits", &[&logits], &["logits"], vec![]);
        Ok(())
    }

    /// The model for chunks of `t` tokens: the nodes built, the weights written so far.
    fn model(&mut self, t: usize, n_ctx: usize) -> onnx::ModelProto {
        let c = self.c;
        let f = dtype::FLOAT;
        let (t, n_ctx) = (t as i64, n_ctx as i64);
        let (hd, nkv, groups) = (
            c.head_dim as i64,
            c.n_kv_head as i64,
            (c.n_head / c.n_kv_head) as i64,
        );
        let mut inputs = vec![
            value_info("inputs_embeds", f, &[Ok(1), Ok(t), Ok(c.dim as i64)]),
            value_info("cos", f, &[Ok(1), Ok(t), Ok(1), Ok(hd / 2)]),
            value_info("sin", f, &[Ok(1), Ok(t), Ok(1), Ok(hd / 2)]),
            value_info(
                "attn_mask",
                f,
                &[Ok(1), Ok(1), Ok(groups * t), Ok(n_ctx + t)],
            ),
        ];
        let mut outputs = vec![value_info("logits", f, &[Ok(1), Ok(t), Ok(c.vocab as i64)])];
        for l in 0..c.n_layer {
            for kv in ["key", "value"] {
                inputs.push(value_info(
                    &format!("past_{kv}.{l}"),
                    f,
                    &[Ok(1), Ok(nkv), Ok(n_ctx), Ok(hd)],
                ));
                outputs.push(value_info(
                    &format!("{kv}.{l}"),
                    f,
                    &[Ok(1), Ok(nkv), Ok(t), Ok(hd)],
                ));
            }
        }
        let mut initializer: Vec<TensorProto> = self.weights.values().cloned().collect();
        initializer.append(&mut self.consts);
        onnx::ModelProto {
            ir_version: 10,
            opset_import: vec![onnx::OperatorSetIdProto {
                domain: String::new(),
                version: 21,
            }],
            producer_name: "edgellm export-onnx --target qnn".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(onnx::GraphProto {
                name: format!("edgellm-npu-t{t}"),
                node: std::mem::take(&mut self.nodes),
                initializer,
                input: inputs,
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Writes the NPU folder for `gguf` into `out`. `progress(stage, done, total)`: "calibrating"
/// windows, then "writing" graphs.
pub fn export_npu(
    gguf: &Path,
    out: &Path,
    opts: &NpuExport,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<NpuReport, ExportError> {
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| ExportError::Io { path, source }
    };
    if opts.chunk < 2 || opts.chunk > 256 || opts.n_ctx < opts.chunk || opts.n_ctx > 8192 {
        return Err(ExportError::Unsupported(format!(
            "--chunk {} / --n-ctx {}: allowed chunk 2..=256 and n_ctx chunk..=8192",
            opts.chunk, opts.n_ctx
        )));
    }
    let text = std::fs::read_to_string(&opts.calibrate).map_err(io(&opts.calibrate))?;
    let calib_sha = crate::models::sha256_bytes(text.as_bytes());
    let g = Gguf::open(gguf).map_err(ModelError::from)?;
    let c = Config::from_gguf(&g)?;
    if c.arch != Arch::Llama && c.arch != Arch::Qwen2 {
        return Err(ExportError::Unsupported(format!(
            "architecture {}",
            c.arch.name()
        )));
    }
    if c.head_dim % 2 != 0 || c.n_head % c.n_kv_head != 0 {
        return Err(ExportError::Unsupported(
            "odd head size or uneven head groups".into(),
        ));
    }
    let (ranges, tokens) = calibrate(
        gguf,
        &text,
        opts.calib_window,
        opts.calib_tokens,
        &mut |d, t| progress("calibrating", d, t),
    )?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let data_path = out.join("model.onnx.data");
    let file = std::fs::File::create(&data_path).map_err(io(&data_path))?;
    let mut b = Graph {
        g: &g,
        c: &c,
        ranges: &ranges,
        data: Data {
            file: std::io::BufWriter::new(file),
            path: data_path.display().to_string(),
            offset: 0,
            inits: Vec::new(),
        },
        weights: BTreeMap::new(),
        consts: Vec::new(),
        nodes: Vec::new(),
        matrices: 0,
    };
    let graphs = [("prefill.onnx", opts.chunk), ("decode.onnx", 1)];
    for (i, (name, t)) in graphs.iter().enumerate() {
        b.build(*t)?;
        let model = b.model(*t, opts.n_ctx);
        let p = out.join(name);
        std::fs::write(&p, prost::Message::encode_to_vec(&model)).map_err(io(&p))?;
        progress("writing", i + 1, graphs.len());
    }
    let (matrices, weight_bytes) = (b.matrices, b.data.offset);
    b.data.file.flush().map_err(io(&data_path))?;
    drop(b);

    // The host's embedding table, f16.
    let embd = g
        .require_tensor("token_embd.weight")
        .map_err(ModelError::from)?;
    let (k, n) = (embd.dims[0] as usize, embd.dims[1] as usize);
    let data = g.tensor_data(embd);
    let row_bytes = data.len() / n;
    let p = out.join("embeddings.f16");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&p).map_err(io(&p))?);
    let mut row = vec![0f32; k];
    for r in 0..n {
        dequantize_row(embd.ty, &data[r * row_bytes..(r + 1) * row_bytes], &mut row);
        let bytes: Vec<u8> = row
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        w.write_all(&bytes).map_err(io(&p))?;
    }
    w.flush().map_err(io(&p))?;

    let tok = write_tokenizer_files(&g, out, gguf)?;
    let source_sha = crate::models::sha256_file(gguf, |_| {}).map_err(io(gguf))?;
    // What the compiled contexts depend on: a cache made for another export is not used.
    let export_id = {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [source_sha.as_str(), calib_sha.as_str()] {
            h.update(part.as_bytes());
        }
        h.update(
            format!(
                "{}/{}/{tokens}/{}",
                opts.n_ctx,
                opts.chunk,
                env!("CARGO_PKG_VERSION")
            )
            .as_bytes(),
        );
        crate::models::hex(h.finish().as_ref())
    };
    let eos: Vec<u32> = tok.eos.into_iter().collect();
    let cfg = serde_json::json!({
        "format": "edgellm-npu",
        "version": 1,
        "target": "qnn",
        "export_id": export_id,
        "architecture": c.arch.name(),
        "n_layer": c.n_layer,
        "dim": c.dim,
        "n_head": c.n_head,
        "n_kv_head": c.n_kv_head,
        "head_dim": c.head_dim,
        "vocab": c.vocab,
        "n_ctx": opts.n_ctx,
        "chunk": opts.chunk,
        "rope_theta": c.rope_theta,
        "context_length": c.train_ctx,
        "bos": tok.bos,
        "eos": eos,
        "graphs": {"prefill": "prefill.onnx", "decode": "decode.onnx", "data": "model.onnx.data"},
        "embeddings": "embeddings.f16",
        "weights": "int8, symmetric, per output channel",
        "activations": "uint16, per tensor, min/max calibrated",
        "calibration": {
            "file": opts.calibrate.file_name().map(|f| f.to_string_lossy().into_owned()),
            "sha256": calib_sha,
            "tokens": tokens,
        },
        "source": {
            "file": gguf.file_name().map(|f| f.to_string_lossy().into_owned()),
            "sha256": source_sha,
        },
    });
    let p = out.join(CONFIG_FILE);
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap_or_default()).map_err(io(&p))?;
    Ok(NpuReport {
        out: out.display().to_string(),
        target: "qnn",
        layers: c.n_layer,
        matrices,
        weight_bytes,
        n_ctx: opts.n_ctx,
        chunk: opts.chunk,
        calibration_tokens: tokens,
        calibration_sha256: calib_sha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 16-bit grid covers the range and zero, and zero is exact.
    #[test]
    fn activation_ranges_take_zero_and_map_it_exactly() {
        for (lo, hi) in [(-3.0f32, 5.0f32), (0.5, 7.0), (-9.0, -1.0), (0.0, 0.0)] {
            let (scale, zp) = act_qparams(lo, hi);
            assert!(scale > 0.0);
            let q = |x: f32| ((x / scale).round() + zp as f32).clamp(0.0, 65535.0);
            assert_eq!((q(0.0) - zp as f32) * scale, 0.0);
            for x in [lo.min(0.0), hi.max(0.0)] {
                let back = (q(x) - zp as f32) * scale;
                assert!((back - x).abs() <= scale, "{x} -> {back} ({lo}..{hi})");
            }
        }
    }

    /// Rotating interleaved pairs then permuting rows to halves equals permuting then rotating
    /// the halves: the export's row permutation keeps the llama rotary.
    #[test]
    fn interleaved_rotary_becomes_halves_by_permuting_rows() {
        let hd = 8;
        let x: Vec<f32> = (0..hd)
            .map(|i| (i as f32 * 0.7).sin() + 0.1 * i as f32)
            .collect();
        let angles: Vec<(f32, f32)> = (0..hd / 2)
            .map(|i| (0.3 * (i + 1) as f32).sin_cos())
            .collect();
        let mut inter = x.clone();
        for (i, &(s, c)) in angles.iter().enumerate() {
            let (a, b) = (inter[2 * i], inter[2 * i + 1]);
            inter[2 * i] = a * c - b * s;
            inter[2 * i + 1] = a * s + b * c;
        }
        let permuted_after: Vec<f32> = (0..hd).map(|j| inter[halves_row(j, hd)]).collect();
        let mut halves: Vec<f32> = (0..hd).map(|j| x[halves_row(j, hd)]).collect();
        for (i, &(s, c)) in angles.iter().enumerate() {
            let (a, b) = (halves[i], halves[i + hd / 2]);
            halves[i] = a * c - b * s;
            halves[i + hd / 2] = a * s + b * c;
        }
        for (p, h) in permuted_after.iter().zip(&halves) {
            assert!((p - h).abs() < 1e-6, "{permuted_after:?} vs {halves:?}");
        }
    }
}
