//! An ONNX decoder folder as onnxruntime-genai's model builder (or `edgellm export-onnx`) writes
//! it: `genai_config.json` (sizes, I/O names, special tokens), `model.onnx` (+ `.onnx.data`),
//! `tokenizer.json`; or as Optimum exports it, with the Hugging Face `config.json` instead.
//! What the ORT backend needs to know beyond the config it reads from the graph itself: the
//! rotary layout and frequencies of the attention nodes, so that cached keys can be re-rotated
//! on the host when the window slides.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::onnx::{self, OnnxError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrtModelError {
    #[error("{path}: {msg}")]
    Config { path: String, msg: String },
    #[error(transparent)]
    Onnx(#[from] OnnxError),
}

/// Input and output names of the decoder graph.
#[derive(Debug, Clone)]
pub struct IoNames {
    pub input_ids: String,
    pub attention_mask: String,
    /// Optimum-style graphs take explicit positions; genai's GroupQueryAttention graphs derive
    /// them from the attention mask.
    pub position_ids: Option<String>,
    pub past_key: String,
    pub past_value: String,
    pub logits: String,
    pub present_key: String,
    pub present_value: String,
}

impl IoNames {
    pub fn layer(pattern: &str, i: usize) -> String {
        pattern.replace("%d", &i.to_string())
    }
}

/// Rotary embedding as the graph applies it to keys before caching them.
#[derive(Debug, Clone)]
pub struct Rotary {
    /// Angle per position of each rotated pair: (head_dim / 2).
    pub inv_freq: Vec<f32>,
    /// Pairs are (2i, 2i+1) when interleaved (GGUF/llama.cpp order), else (i, i + head_dim/2).
    pub interleaved: bool,
}

#[derive(Debug, Clone)]
pub struct OrtModel {
    pub dir: PathBuf,
    pub onnx: PathBuf,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub context_length: usize,
    pub bos: Option<u32>,
    /// Tokens that end a generation (genai's `eos_token_id`, a number or a list).
    pub eos: Vec<u32>,
    pub names: IoNames,
    /// `None` when the graph's attention is not a GroupQueryAttention with rotary inside: the
    /// window cannot slide then (generation stops when it is full).
    pub rotary: Option<Rotary>,
    /// genai's `search.past_present_share_buffer` (default true): `present` is `past` itself,
    /// written in place (GroupQueryAttention). False: `present` is `past` followed by the new
    /// positions, a tensor one step longer each run (Optimum's and plain-attention graphs).
    pub share_buffer: bool,
    /// Bytes of the graph file and the external data files its initializers name
    /// (`model.onnx.data` for genai's builder, `model.onnx_data` for Optimum's).
    pub file_bytes: u64,
}

impl OrtModel {
    /// Reads `dir/genai_config.json` — or, in a folder without one (Optimum's export), the
    /// Hugging Face `config.json` beside the graph — and the graph's attention nodes.
    pub fn open(dir: &Path) -> Result<OrtModel, OrtModelError> {
        let genai = dir.join("genai_config.json");
        let hf = dir.join("config.json");
        let from_hf = !genai.exists() && hf.exists();
        if !genai.exists() && !hf.exists() {
            return Err(OrtModelError::Config {
                path: dir.display().to_string(),
                msg: "neither genai_config.json (onnxruntime-genai's builder) nor config.json (Optimum's export) is in this folder".into(),
            });
        }
        let cfg_path = if from_hf { hf } else { genai };
        let bad = |msg: String| OrtModelError::Config {
            path: cfg_path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad(e.to_string()))?;
        let cfg: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let cfg = if from_hf {
            from_hf_config(&cfg).map_err(bad)?
        } else {
            cfg
        };
        let m = &cfg["model"];
        let d = &m["decoder"];
        let num = |v: &Value, key: &str| -> Result<usize, OrtModelError> {
            v[key]
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("{key}: a positive number is required")))
        };
        let name = |v: &Value, key: &str, default: &str| -> String {
            v[key].as_str().unwrap_or(default).to_string()
        };
        let ids = |v: &Value| -> Vec<u32> {
            match v {
                Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|n| n as u32)
                    .collect(),
                _ => vec![],
            }
        };
        let inputs = &d["inputs"];
        let outputs = &d["outputs"];
        let file = name(d, "filename", "model.onnx");
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!(
                "decoder.filename {file:?} must name a file in the folder"
            )));
        }
        let onnx_path = dir.join(&file);
        let graph = onnx::read_model(&onnx_path)?;
        let graph = graph.graph.unwrap_or_default();
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut data_files: Vec<&str> = Vec::new();
        for t in &graph.initializer {
            for e in t.external_data.iter().filter(|e| e.key == "location") {
                if !data_files.contains(&e.value.as_str()) {
                    data_files.push(&e.value);
                }
            }
        }
        let file_bytes =
            size(&onnx_path) + data_files.iter().map(|f| size(&dir.join(f))).sum::<u64>();
        let position_ids = inputs["position_ids"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                graph
                    .input
                    .iter()
                    .any(|i| i.name == "position_ids")
                    .then(|| "position_ids".to_string())
            })
            .filter(|n| graph.input.iter().any(|i| &i.name == n));
        let names = IoNames {
            input_ids: name(inputs, "input_ids", "input_ids"),
            attention_mask: name(inputs, "attention_mask", "attention_mask"),
            position_ids,
            past_key: name(inputs, "past_key_names", "past_key_values.%d.key"),
            past_value: name(inputs, "past_value_names", "past_key_values.%d.value"),
            logits: name(outputs, "logits", "logits"),
            present_key: name(outputs, "present_key_names", "present.%d.key"),
            present_value: name(outputs, "present_value_names", "present.%d.value"),
        };
        let head_dim = num(d, "head_size")?;
        let model = OrtModel {
            dir: dir.to_path_buf(),
            onnx: onnx_path,
            n_layer: num(d, "num_hidden_layers")?,
            n_head: num(d, "num_attention_heads")?,
            n_kv_head: num(d, "num_key_value_heads")?,
            head_dim,
            n_vocab: num(m, "vocab_size")?,
            context_length: num(m, "context_length")?,
            bos: m["bos_token_id"].as_u64().map(|n| n as u32),
            eos: ids(&m["eos_token_id"]),
            rotary: rotary(&graph, dir, head_dim)?,
            file_bytes,
            share_buffer: match &cfg["search"]["past_present_share_buffer"] {
                Value::Null => true,
                Value::Bool(b) => *b,
                other => {
                    return Err(bad(format!(
                        "search.past_present_share_buffer: true or false, not {other}"
                    )))
                }
            },
            names,
        };
        for i in [0, model.n_layer - 1] {
            for n in [&model.names.past_key, &model.names.past_value] {
                let want = IoNames::layer(n, i);
                if !graph.input.iter().any(|x| x.name == want) {
                    return Err(bad(format!(
                        "the graph has no input {want:?} (from decoder.inputs and num_hidden_layers)"
                    )));
                }
            }
        }
        Ok(model)
    }
}

/// A Hugging Face `config.json` (as Optimum's ONNX exports carry it) in genai's terms: the
/// sizes and special tokens, the graph in `model.onnx` with Optimum's I/O names (genai's
/// defaults), and a present that is past plus the new positions (Optimum's attention concatenates).
fn from_hf_config(hf: &Value) -> Result<Value, String> {
    let num = |key: &str| -> Result<u64, String> {
        hf[key]
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{key}: a positive number is required"))
    };
    let heads = num("num_attention_heads")?;
    let hidden = num("hidden_size")?;
    let head_dim = match hf["head_dim"].as_u64() {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => return Err(format!("hidden_size {hidden} is not a multiple of num_attention_heads {heads}, and head_dim is not given")),
    };
    Ok(serde_json::json!({
        "model": {
            "bos_token_id": hf["bos_token_id"],
            "eos_token_id": hf["eos_token_id"],
            "context_length": num("max_position_embeddings")?,
            "vocab_size": num("vocab_size")?,
            "decoder": {
                "filename": "model.onnx",
                "head_size": head_dim,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_hidden_layers": num("num_hidden_layers")?,
                "num_key_value_heads": hf["num_key_value_heads"].as_u64().unwrap_or(heads),
            }
        },
        "search": {"past_present_share_buffer": false}
    }))
}

/// The rotary layout of the first GroupQueryAttention node with `do_rotary`, with its
/// frequencies read back from the cos/sin tables (row 1 holds cos/sin of each frequency).
fn rotary(
    graph: &onnx::GraphProto,
    dir: &Path,
    head_dim: usize,
) -> Result<Option<Rotary>, OrtModelError> {
    let Some(gqa) = graph
        .node
        .iter()
        .find(|n| n.op_type == "GroupQueryAttention" && n.attr_i("do_rotary") == Some(1))
    else {
        return Ok(None);
    };
    let (Some(cos), Some(sin)) = (gqa.input.get(7), gqa.input.get(8)) else {
        return Ok(None);
    };
    let find = |name: &str| graph.initializer.iter().find(|t| t.name == name);
    let (Some(cos), Some(sin)) = (find(cos), find(sin)) else {
        return Ok(None);
    };
    let half = head_dim / 2;
    if cos.dims.len() != 2 || cos.dims[1] as usize != half || cos.dims[0] < 2 {
        return Err(OnnxError::Bad(format!(
            "cos cache {} has shape {:?}, expected [positions, {half}]",
            cos.name, cos.dims
        ))
        .into());
    }
    let (c, s) = (cos.floats(dir)?, sin.floats(dir)?);
    if c.len() < 2 * half || s.len() < 2 * half {
        return Err(OnnxError::Bad("cos/sin caches are too short".into()).into());
    }
    let inv_freq = (0..half).map(|i| s[half + i].atan2(c[half + i])).collect();
    Ok(Some(Rotary {
        inv_freq,
        interleaved: gqa.attr_i("rotary_interleaved") == Some(1),
    }))
}
