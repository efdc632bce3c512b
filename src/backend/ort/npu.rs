//! NPU graphs on ONNX Runtime: the folder `edgellm export-onnx --target qnn` writes
//! (`edgellm_npu.json`, `prefill.onnx` and `decode.onnx` over one `model.onnx.data`,
//! `embeddings.f16`), run on the first provider of the chain that takes them — Qualcomm's QNN
//! execution provider on the HTP (a plugin library, [`super::runtime::register_ep_libraries`]),
//! else ONNX Runtime's CPU provider.
//!
//! The graphs have static shapes: a chunk of `chunk` tokens (prefill) or one (decode), the
//! whole cache of `n_ctx` positions in, the new positions out. The host keeps the cache (f32,
//! `[kv_heads, n_ctx, head_dim]` per layer, keys after rotary in halves), builds the mask that
//! says which of its slots count, the rotary angles of the chunk's positions, and the
//! embeddings. Slot p always holds position p: sliding the window moves slots down and rotates
//! the moved keys back, as the other backends do.
//!
//! **Compiled contexts are cached** beside the graphs (`qnn-cache/`, ONNX Runtime's EPContext
//! models): the first start compiles each graph for the HTP (seconds on the simulator), later
//! starts load the compiled context. A cache is used only when its record
//! (`*_ctx.json`: the export's id, the ONNX Runtime version, the provider library and its size,
//! the provider options) matches; one that does not, or that fails to load, is removed and
//! compiled again, with the reason logged. A provider that takes none of a graph's nodes counts
//! as failed, and the next provider of the chain runs it.
//!
//! **Placement** ([`Placement`]): which provider runs which nodes of the exported graph, and the
//! bytes of the weights they read, read from the compiled context model (the nodes the provider
//! took are replaced there by `EPContext` nodes; the rest stay as they were).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::TensorRef;

use super::onnx;
use super::{ort_err, runtime, OrtError, OrtOptions};
use crate::backend::{Backend, BackendError, BackendInfo, MemoryPlan, Provider, Vocabulary};

/// The folder's description file.
pub const CONFIG_FILE: &str = "edgellm_npu.json";

/// Whether `dir` holds an NPU export.
pub fn is_npu_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

#[derive(Debug, Clone, serde::Deserialize)]
struct Graphs {
    prefill: String,
    decode: String,
    data: String,
}

/// `edgellm_npu.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct NpuConfig {
    pub format: String,
    pub version: u32,
    pub target: String,
    pub export_id: String,
    pub n_layer: usize,
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub n_ctx: usize,
    pub chunk: usize,
    pub rope_theta: f32,
    pub bos: Option<u32>,
    #[serde(default)]
    pub eos: Vec<u32>,
    graphs: Graphs,
    embeddings: String,
}

impl NpuConfig {
    pub fn open(dir: &Path) -> Result<NpuConfig, OrtError> {
        let p = dir.join(CONFIG_FILE);
        let bad = |m: String| OrtError::Config(format!("{}: {m}", p.display()));
        let text = std::fs::read_to_string(&p).map_err(|e| bad(e.to_string()))?;
        let c: NpuConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if c.format != "edgellm-npu" || c.version != 1 {
            return Err(bad(format!(
                "format {:?} version {}: this edgellm reads edgellm-npu version 1",
                c.format, c.version
            )));
        }
        let sane = c.n_layer > 0
            && c.n_kv_head > 0
            && c.n_head.is_multiple_of(c.n_kv_head)
            && c.head_dim.is_multiple_of(2)
            && c.head_dim > 0
            && c.chunk >= 2
            && c.n_ctx >= c.chunk
            && c.n_ctx <= 1 << 16
            && c.vocab > 0
            && c.dim > 0;
        if !sane {
            return Err(bad("inconsistent sizes".into()));
        }
        for f in [
            &c.graphs.prefill,
            &c.graphs.decode,
            &c.graphs.data,
            &c.embeddings,
        ] {
            if f.contains('/') || f.contains("..") {
                return Err(bad(format!("{f:?}: files must lie in the folder")));
            }
        }
        Ok(c)
    }

    fn kv_floats(&self) -> usize {
        self.n_kv_head * self.n_ctx * self.head_dim
    }
}

/// Nodes and weight bytes one provider runs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Share {
    pub nodes: usize,
    pub weight_bytes: u64,
}

/// Per provider ("qnn", "cpu"), what it runs of the prefill graph.
pub type Placement = BTreeMap<String, Share>;

/// Bytes of an initializer, inline or external.
fn tensor_bytes(t: &onnx::TensorProto) -> u64 {
    if t.data_location == 1 {
        return t
            .external_data
            .iter()
            .find(|e| e.key == "length")
            .and_then(|e| e.value.parse().ok())
            .unwrap_or(0);
    }
    t.raw_data.len() as u64
}

/// The placement of `original`'s nodes when `compiled` is its EPContext model: nodes kept by
/// name ran on the CPU provider, the others on `provider`; an initializer counts for the
/// provider if any of its nodes reads it.
pub fn placement_from_context(
    original: &onnx::ModelProto,
    compiled: &onnx::ModelProto,
    provider: &str,
) -> Placement {
    let empty = onnx::GraphProto::default();
    let (og, cg) = (
        original.graph.as_ref().unwrap_or(&empty),
        compiled.graph.as_ref().unwrap_or(&empty),
    );
    let kept: HashSet<&str> = cg
        .node
        .iter()
        .filter(|n| n.op_type != "EPContext")
        .map(|n| n.name.as_str())
        .collect();
    let sizes: HashMap<&str, u64> = og
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), tensor_bytes(t)))
        .collect();
    let mut on_provider: HashSet<&str> = HashSet::new();
    let mut on_cpu: HashSet<&str> = HashSet::new();
    let mut out = Placement::new();
    for n in &og.node {
        let (who, set) = if kept.contains(n.name.as_str()) {
            ("cpu", &mut on_cpu)
        } else {
            (provider, &mut on_provider)
        };
        out.entry(who.to_string()).or_default().nodes += 1;
        for i in &n.input {
            if sizes.contains_key(i.as_str()) {
                set.insert(i.as_str());
            }
        }
    }
    for (name, bytes) in &sizes {
        let who = if on_provider.contains(name) {
            provider
        } else if on_cpu.contains(name) {
            "cpu"
        } else {
            continue;
        };
        out.entry(who.to_string()).or_default().weight_bytes += bytes;
    }
    out
}

/// Everything on the CPU provider.
fn placement_cpu(original: &onnx::ModelProto) -> Placement {
    placement_from_context(original, original, "cpu")
}

struct Graph {
    session: Session,
    /// Tokens a run takes.
    t: usize,
    placement: Option<Placement>,
}

/// The cache record of a compiled context: what it was made from.
fn cache_record(
    cfg: &NpuConfig,
    provider: Provider,
    options: &BTreeMap<String, String>,
) -> serde_json::Value {
    let lib = runtime::ep_library(provider.name());
    let rt = runtime::loaded().and_then(|r| r.ok());
    serde_json::json!({
        "export_id": cfg.export_id,
        "onnxruntime": rt.map(|r| r.version),
        "ep_library": lib.as_ref().map(|l| l.path.display().to_string()),
        "ep_library_bytes": lib.as_ref().and_then(|l| std::fs::metadata(&l.path).ok()).map(|m| m.len()),
        "options": options,
    })
}

/// Where compiled contexts of `dir` go: `dir/<provider>-cache/`, else (a folder that cannot
/// be written) the temporary directory.
fn cache_dir(dir: &Path, cfg: &NpuConfig, provider: Provider) -> PathBuf {
    let inside = dir.join(format!("{}-cache", provider.name()));
    let probe = inside.join(".writable");
    if std::fs::create_dir_all(&inside).is_ok() && std::fs::write(&probe, b"").is_ok() {
        let _ = std::fs::remove_file(&probe);
        return inside;
    }
    let short: String = cfg.export_id.chars().take(16).collect();
    let tmp = std::env::temp_dir().join(format!("edgellm-{}-cache-{short}", provider.name()));
    tracing::warn!(
        "ort: {} cannot be written; compiled contexts go to {}",
        inside.display(),
        tmp.display()
    );
    let _ = std::fs::create_dir_all(&tmp);
    tmp
}

/// A session on `file` of `dir` with `provider`: for a plugin provider through its compiled
/// context cache (made on first use), else the graph as it is.
/// What every graph of one folder is opened with.
struct Place<'a> {
    env: &'a ort::environment::Environment,
    dir: &'a Path,
    cfg: &'a NpuConfig,
    opts: &'a OrtOptions,
    threads: usize,
}

fn open_graph(at: &Place<'_>, file: &str, t: usize, provider: Provider) -> Result<Graph, String> {
    let Place {
        env,
        dir,
        cfg,
        opts,
        threads,
    } = *at;
    let path = dir.join(file);
    let original = onnx::read_model(&path).map_err(|e| e.to_string())?;
    if provider == Provider::Cpu {
        let mut b =
            super::with_provider(env, super::session_builder(env, threads)?, provider, None)
                .map_err(|e| e.to_string())?;
        let s = b.commit_from_file(&path).map_err(|e| e.to_string())?;
        return Ok(Graph {
            session: s,
            t,
            placement: Some(placement_cpu(&original)),
        });
    }
    let configured = opts.provider_options.get(&provider);
    // What a plugin gets (the record of a compiled context names it).
    let options = super::plugin_options(provider, configured);
    let with = |b| -> Result<ort::session::builder::SessionBuilder, String> {
        super::with_provider(env, b, provider, configured).map_err(|e| e.to_string())
    };
    let plugin = matches!(runtime::plugin_eps(provider), Some(Ok(_)));
    if !plugin {
        // A provider built into the library: no context cache, no placement to read.
        let s = with(super::session_builder(env, threads)?)?
            .commit_from_file(&path)
            .map_err(|e| e.to_string())?;
        return Ok(Graph {
            session: s,
            t,
            placement: None,
        });
    }
    let cache = cache_dir(dir, cfg, provider);
    let stem = file.trim_end_matches(".onnx");
    let ctx = cache.join(format!("{stem}_ctx.onnx"));
    let record_path = cache.join(format!("{stem}_ctx.json"));
    let record = cache_record(cfg, provider, &options);
    let remove = || {
        let _ = std::fs::remove_file(&ctx);
        let _ = std::fs::remove_file(cache.join(format!("{stem}_ctx_{}.bin", provider.name())));
        let _ = std::fs::remove_file(&record_path);
        // ONNX Runtime names the context binary after the model and the provider.
        if let Ok(rd) = std::fs::read_dir(&cache) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&format!("{stem}_ctx")) && n.ends_with(".bin") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    };
    if ctx.is_file() {
        let recorded: Option<serde_json::Value> = std::fs::read_to_string(&record_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok());
        if recorded.as_ref() == Some(&record) {
            let loaded = with(super::session_builder(env, threads)?)
                .and_then(|mut b| b.commit_from_file(&ctx).map_err(|e| e.to_string()));
            match (loaded, onnx::read_model(&ctx)) {
                (Ok(s), Ok(compiled)) => {
                    tracing::info!("ort: {file} on {provider} from its compiled context {}", ctx.display());
                    return Ok(Graph {
                        session: s,
                        t,
                        placement: Some(placement_from_context(&original, &compiled, provider.name())),
                    });
                }
                (Err(e), _) => tracing::warn!(
                    "ort: the compiled context {} could not be loaded ({e}); compiling {file} again",
                    ctx.display()
                ),
                (_, Err(e)) => tracing::warn!(
                    "ort: the compiled context {} could not be read ({e}); compiling {file} again",
                    ctx.display()
                ),
            }
        } else {
            tracing::warn!(
                "ort: the compiled context {} was made for another export, runtime or provider options (record {}); compiling {file} again",
                ctx.display(),
                recorded.map_or_else(|| "missing".to_string(), |r| r.to_string())
            );
        }
    }
    remove();
    let started = std::time::Instant::now();
    let ctx_s = ctx.display().to_string();
    let mut b = with(super::session_builder(env, threads)?)?;
    for (k, v) in [
        ("ep.context_enable", "1"),
        ("ep.context_file_path", ctx_s.as_str()),
        ("ep.context_embed_mode", "0"),
    ] {
        b = b.with_config_entry(k, v).map_err(|e| e.to_string())?;
    }
    let s = b.commit_from_file(&path).map_err(|e| {
        remove();
        e.to_string()
    })?;
    let compiled = onnx::read_model(&ctx).map_err(|e| {
        remove();
        format!("no compiled context was written ({e})")
    })?;
    let placement = placement_from_context(&original, &compiled, provider.name());
    let took = placement.get(provider.name()).map_or(0, |s| s.nodes);
    if took == 0 {
        remove();
        return Err(format!(
            "{provider} took none of the {} nodes of {file}",
            original.graph.as_ref().map_or(0, |g| g.node.len())
        ));
    }
    if let Err(e) = std::fs::write(&record_path, record.to_string()) {
        tracing::warn!(
            "ort: {}: {e}; the context will be compiled again next start",
            record_path.display()
        );
    }
    tracing::info!(
        "ort: {file} compiled for {provider} in {:.1} s; context cached in {}",
        started.elapsed().as_secs_f64(),
        ctx.display()
    );
    Ok(Graph {
        session: s,
        t,
        placement: Some(placement),
    })
}

pub struct NpuBackend {
    cfg: NpuConfig,
    dir: PathBuf,
    prefill: Graph,
    decode: Graph,
    provider: String,
    threads: usize,
    embeddings: memmap2::Mmap,
    /// K of layer i at 2i, V at 2i + 1: `[kv_heads, n_ctx, head_dim]`.
    kv: Vec<Vec<f32>>,
    logits: Vec<f32>,
    weight_bytes: u64,
}

impl std::fmt::Debug for NpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NpuBackend")
            .field("dir", &self.dir)
            .field("provider", &self.provider)
            .finish()
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

impl NpuBackend {
    /// What it will hold: the weights (mapped by ONNX Runtime, and the provider's compiled copy
    /// beside them), the embeddings (mapped), the cache, a chunk's logits.
    pub fn plan(dir: &Path, opts: &OrtOptions) -> Result<MemoryPlan, OrtError> {
        let c = NpuConfig::open(dir)?;
        let per_position = (2 * c.n_layer * c.n_kv_head * c.head_dim * 4) as u64;
        let data = file_len(&dir.join(&c.graphs.data));
        Ok(MemoryPlan {
            weights: 2 * data + file_len(&dir.join(&c.embeddings)),
            kv_cache: per_position * c.n_ctx as u64,
            scratch: (2 * c.chunk * c.vocab * 4) as u64,
            n_ctx: c.n_ctx,
            threads: opts.threads(),
            bytes_per_position: per_position,
        })
    }

    pub fn open(dir: &Path, opts: &OrtOptions) -> Result<NpuBackend, OrtError> {
        let cfg = NpuConfig::open(dir)?;
        runtime::init(opts.library.as_deref()).map_err(OrtError::Runtime)?;
        runtime::register_for_chain(&opts.providers, &opts.ep_libraries);
        let env = runtime::environment()
            .ok_or_else(|| OrtError::Runtime("environment missing after load".into()))?;
        if opts.n_ctx != 0 && opts.n_ctx != cfg.n_ctx {
            tracing::info!(
                "ort: {} was exported for a window of {} positions; model.n_ctx = {} does not apply",
                dir.display(),
                cfg.n_ctx,
                opts.n_ctx
            );
        }
        let threads = opts.threads();
        let mut failures = Vec::new();
        let mut chosen = None;
        let at = Place {
            env,
            dir,
            cfg: &cfg,
            opts,
            threads,
        };
        runtime::stdout_to_stderr(|| {
            for &p in &opts.providers {
                let both = open_graph(&at, &cfg.graphs.prefill, cfg.chunk, p).and_then(|pre| {
                    open_graph(&at, &cfg.graphs.decode, 1, p).map(|dec| (pre, dec))
                });
                match both {
                    Ok(g) => {
                        tracing::info!("ort: execution provider {p} runs {}", dir.display());
                        chosen = Some((p, g));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("ort: execution provider {p} failed: {e}");
                        failures.push(format!("{p}: {e}"));
                    }
                }
            }
        });
        let Some((provider, (prefill, decode))) = chosen else {
            return Err(OrtError::NoProvider(if failures.is_empty() {
                "ort.providers is empty".into()
            } else {
                failures.join("; ")
            }));
        };
        let emb_path = dir.join(&cfg.embeddings);
        let file = std::fs::File::open(&emb_path)
            .map_err(|e| OrtError::Config(format!("{}: {e}", emb_path.display())))?;
        // SAFETY: a read-only mapping of a model file; the model folder is not written while
        // the daemon runs (as for the GGUF the CPU engine maps).
        let embeddings = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| OrtError::Config(format!("{}: {e}", emb_path.display())))?;
        if embeddings.len() != cfg.vocab * cfg.dim * 2 {
            return Err(OrtError::Config(format!(
                "{}: {} bytes, expected vocab × dim × 2 = {}",
                emb_path.display(),
                embeddings.len(),
                cfg.vocab * cfg.dim * 2
            )));
        }
        let kv = (0..2 * cfg.n_layer)
            .map(|_| vec![0f32; cfg.kv_floats()])
            .collect();
        Ok(NpuBackend {
            logits: vec![0.0; cfg.chunk * cfg.vocab],
            weight_bytes: file_len(&dir.join(&cfg.graphs.data)) + embeddings.len() as u64,
            provider: provider.name().to_string(),
            dir: dir.to_path_buf(),
            threads,
            embeddings,
            kv,
            prefill,
            decode,
            cfg,
        })
    }

    /// The execution provider running the graphs.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Placement of the prefill graph's nodes.
    pub fn placement(&self) -> Option<&Placement> {
        self.prefill.placement.as_ref()
    }

    fn run(&mut self, tokens: &[u32], pos: usize) -> Result<usize, BackendError> {
        let c = &self.cfg;
        let n = tokens.len();
        let graph = if n == 1 {
            &mut self.decode
        } else {
            &mut self.prefill
        };
        let t = graph.t;
        let (dim, hd, nkv) = (c.dim, c.head_dim, c.n_kv_head);
        let groups = c.n_head / nkv;
        let half = hd / 2;
        let mut embeds = vec![0f32; t * dim];
        for (i, &tok) in tokens.iter().enumerate() {
            let row = &self.embeddings[tok as usize * dim * 2..(tok as usize + 1) * dim * 2];
            for (o, b) in embeds[i * dim..(i + 1) * dim]
                .iter_mut()
                .zip(row.chunks_exact(2))
            {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        let mut cos = vec![0f32; t * half];
        let mut sin = vec![0f32; t * half];
        let mut angles = vec![0f32; hd];
        for i in 0..t {
            crate::backend::cpu::rope_angles(
                c.rope_theta,
                hd,
                (pos + i.min(n - 1)) as f32,
                &mut angles,
            );
            for j in 0..half {
                cos[i * half + j] = angles[2 * j];
                sin[i * half + j] = angles[2 * j + 1];
            }
        }
        // Additive mask: slots before `pos`, and the chunk's own positions up to each query.
        // −30000 stays finite in fp16, where the HTP computes it.
        let width = c.n_ctx + t;
        let mut mask = vec![-30000f32; groups * t * width];
        for g in 0..groups {
            for i in 0..t {
                let row = &mut mask[(g * t + i) * width..(g * t + i + 1) * width];
                row[..pos].fill(0.0);
                row[c.n_ctx..c.n_ctx + i + 1].fill(0.0);
            }
        }
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = vec![
            (
                "inputs_embeds".into(),
                view(vec![1, t, dim], &embeds)?.into(),
            ),
            ("cos".into(), view(vec![1, t, 1, half], &cos)?.into()),
            ("sin".into(), view(vec![1, t, 1, half], &sin)?.into()),
            (
                "attn_mask".into(),
                view(vec![1, 1, groups * t, width], &mask)?.into(),
            ),
        ];
        for (j, buf) in self.kv.iter().enumerate() {
            let name = format!(
                "past_{}.{}",
                if j % 2 == 0 { "key" } else { "value" },
                j / 2
            );
            inputs.push((name, view(vec![1, nkv, c.n_ctx, hd], buf)?.into()));
        }
        let outputs = graph.session.run(inputs).map_err(ort_err)?;
        let vocab = c.vocab;
        let logits = outputs
            .get("logits")
            .ok_or_else(|| BackendError::Other("ONNX Runtime: no logits output".into()))?;
        let (_, data) = logits.try_extract_tensor::<f32>().map_err(ort_err)?;
        if data.len() != t * vocab {
            return Err(BackendError::Other(format!(
                "ONNX Runtime: {} logits, expected {t} × {vocab}",
                data.len()
            )));
        }
        self.logits[..n * vocab].copy_from_slice(&data[..n * vocab]);
        for (j, buf) in self.kv.iter_mut().enumerate() {
            let name = format!("{}.{}", if j % 2 == 0 { "key" } else { "value" }, j / 2);
            let out = outputs
                .get(&name)
                .ok_or_else(|| BackendError::Other(format!("ONNX Runtime: no {name} output")))?;
            let (_, new) = out.try_extract_tensor::<f32>().map_err(ort_err)?;
            if new.len() != nkv * t * hd {
                return Err(BackendError::Other(format!(
                    "ONNX Runtime: {name} of {} values",
                    new.len()
                )));
            }
            for h in 0..nkv {
                let dst = &mut buf[(h * c.n_ctx + pos) * hd..(h * c.n_ctx + pos + n) * hd];
                dst.copy_from_slice(&new[h * t * hd..(h * t + n) * hd]);
            }
        }
        Ok(n)
    }
}

/// A tensor over `data` without a copy.
fn view<'a>(shape: Vec<usize>, data: &'a [f32]) -> Result<TensorRef<'a, f32>, BackendError> {
    let a = ndarray::ArrayView::from_shape(ndarray::IxDyn(&shape), data).map_err(ort_err)?;
    TensorRef::from_array_view(a).map_err(ort_err)
}

impl Backend for NpuBackend {
    fn vocabulary(&self) -> Vocabulary<'_> {
        Vocabulary::Folder {
            tokenizer_json: self.dir.join("tokenizer.json"),
            bos: self.cfg.bos,
            eos: self.cfg.eos.clone(),
            chat_template: std::fs::read_to_string(self.dir.join("chat_template.jinja")).ok(),
        }
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "ort".into(),
            compute: self.provider.clone(),
            threads: self.threads,
            n_ctx: self.cfg.n_ctx,
            n_vocab: self.cfg.vocab,
            max_batch: self.cfg.chunk,
            tensor_types: vec![],
            kv_type: "f32".into(),
            weight_bytes: self.weight_bytes,
            state_bytes: (2 * self.cfg.n_layer * self.cfg.kv_floats() * 4 + self.logits.len() * 4)
                as u64,
            token_read_bytes: None,
            repacked_matrices: 0,
            placement: self.prefill.placement.clone(),
        }
    }

    fn n_vocab(&self) -> usize {
        self.cfg.vocab
    }

    fn n_ctx(&self) -> usize {
        self.cfg.n_ctx
    }

    fn max_batch(&self) -> usize {
        self.cfg.chunk
    }

    fn reset(&mut self) {}

    fn shift(&mut self, keep: usize, discard: usize, len: usize) -> Result<(), BackendError> {
        let n_ctx = self.cfg.n_ctx;
        if len > n_ctx || keep + discard > len {
            return Err(BackendError::BadShift {
                keep,
                discard,
                len,
                n_ctx,
            });
        }
        let hd = self.cfg.head_dim;
        let rot_by: Vec<(f32, f32)> = (0..hd / 2)
            .map(|i| {
                let f = (self.cfg.rope_theta as f64).powf(-2.0 * i as f64 / hd as f64);
                let a = -(discard as f64) * f;
                (a.cos() as f32, a.sin() as f32)
            })
            .collect();
        for (i, data) in self.kv.iter_mut().enumerate() {
            let rot = (i % 2 == 0).then_some((rot_by.as_slice(), false));
            super::repack(
                data,
                self.cfg.n_kv_head,
                hd,
                n_ctx,
                n_ctx,
                keep,
                discard,
                len,
                rot,
            );
        }
        Ok(())
    }

    fn saved_bytes(&self, len: usize) -> usize {
        2 * self.cfg.n_layer * self.cfg.n_kv_head * len * self.cfg.head_dim * 4
    }

    fn save(&self, len: usize, out: &mut Vec<u8>) -> Result<(), BackendError> {
        let (hd, n_ctx) = (self.cfg.head_dim, self.cfg.n_ctx);
        if len > n_ctx {
            return Err(BackendError::ContextFull {
                pos: 0,
                end: len,
                n_ctx,
            });
        }
        out.reserve(self.saved_bytes(len));
        for data in &self.kv {
            super::save_heads(data, self.cfg.n_kv_head, n_ctx, hd, len, out);
        }
        Ok(())
    }

    fn load(&mut self, len: usize, data: &[u8]) -> Result<(), BackendError> {
        let want = self.saved_bytes(len);
        if data.len() != want || len > self.cfg.n_ctx {
            return Err(BackendError::BadState {
                len,
                got: data.len(),
                want,
            });
        }
        let (hd, n_ctx) = (self.cfg.head_dim, self.cfg.n_ctx);
        let mut src = data.chunks_exact(4);
        for dst in &mut self.kv {
            super::load_heads(dst, self.cfg.n_kv_head, n_ctx, hd, len, &mut src);
        }
        Ok(())
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        all_logits: bool,
    ) -> Result<&[f32], BackendError> {
        let vocab = self.cfg.vocab;
        crate::backend::check_forward(tokens, pos, self.cfg.chunk, self.cfg.n_ctx, vocab)?;
        let n = self.run(tokens, pos)?;
        if all_logits {
            Ok(&self.logits[..n * vocab])
        } else {
            Ok(&self.logits[(n - 1) * vocab..n * vocab])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ort::onnx::{node, GraphProto, ModelProto, TensorProto};

    fn model(nodes: Vec<onnx::NodeProto>, inits: Vec<TensorProto>) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                initializer: inits,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn init(name: &str, bytes: usize, external: bool) -> TensorProto {
        let mut t = TensorProto {
            name: name.into(),
            ..Default::default()
        };
        if external {
            t.data_location = 1;
            t.external_data = vec![onnx::StringStringEntryProto {
                key: "length".into(),
                value: bytes.to_string(),
            }];
        } else {
            t.raw_data = vec![0; bytes];
        }
        t
    }

    /// Nodes the compiled model still has ran on the CPU provider; the rest, and the weights
    /// they read, on the provider; a weight both read counts for the provider.
    #[test]
    fn placement_is_read_from_the_compiled_context() {
        let original = model(
            vec![
                node("MatMul", "", "mm", &["x", "w"], &["y"], vec![]),
                node("Add", "", "add", &["y", "b"], &["z"], vec![]),
                node("Mul", "", "mul", &["z", "s"], &["out"], vec![]),
                node("Mul", "", "mul2", &["z", "w"], &["out2"], vec![]),
            ],
            vec![
                init("w", 4000, true),
                init("b", 16, false),
                init("s", 4, false),
            ],
        );
        let compiled = model(
            vec![
                node("EPContext", "com.microsoft", "ctx", &["x"], &["z"], vec![]),
                node("Mul", "", "mul", &["z", "s"], &["out"], vec![]),
                node("Mul", "", "mul2", &["z", "w"], &["out2"], vec![]),
            ],
            vec![],
        );
        let p = placement_from_context(&original, &compiled, "qnn");
        assert_eq!(
            p["qnn"],
            Share {
                nodes: 2,
                weight_bytes: 4016
            }
        );
        assert_eq!(
            p["cpu"],
            Share {
                nodes: 2,
                weight_bytes: 4
            }
        );
        // Nothing compiled away: all on the CPU provider.
        let all = placement_from_context(&original, &original, "qnn");
        assert!(!all.contains_key("qnn"));
        assert_eq!(all["cpu"].nodes, 4);
        assert_eq!(all["cpu"].weight_bytes, 4020);
    }

    #[test]
    fn a_config_with_files_outside_the_folder_is_refused() {
        let dir = std::env::temp_dir().join(format!("edgellm-npu-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = serde_json::json!({
            "format": "edgellm-npu", "version": 1, "target": "qnn", "export_id": "x",
            "n_layer": 2, "dim": 64, "n_head": 4, "n_kv_head": 2, "head_dim": 16, "vocab": 300,
            "n_ctx": 64, "chunk": 8, "rope_theta": 10000.0, "bos": 1, "eos": [2],
            "graphs": {"prefill": "../prefill.onnx", "decode": "decode.onnx", "data": "d"},
            "embeddings": "e"
        });
        std::fs::write(dir.join(CONFIG_FILE), cfg.to_string()).expect("write");
        let e = NpuConfig::open(&dir).expect_err("outside").to_string();
        assert!(
            e.contains("../prefill.onnx") && e.contains("in the folder"),
            "{e}"
        );
        let mut cfg = cfg;
        cfg["graphs"]["prefill"] = "prefill.onnx".into();
        cfg["n_kv_head"] = 3.into();
        std::fs::write(dir.join(CONFIG_FILE), cfg.to_string()).expect("write");
        let e = NpuConfig::open(&dir).expect_err("uneven heads").to_string();
        assert!(e.contains("inconsistent sizes"), "{e}");
        cfg["n_kv_head"] = 2.into();
        std::fs::write(dir.join(CONFIG_FILE), cfg.to_string()).expect("write");
        assert!(NpuConfig::open(&dir).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
