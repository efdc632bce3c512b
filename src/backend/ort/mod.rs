//! The ONNX Runtime backend: an ONNX decoder (onnxruntime-genai's layout) run by ORT through
//! the first execution provider of the configured chain that works.
//!
//! - [`runtime`]: loading the library (once per process), telemetry off, what it offers.
//! - [`model`]: the model folder: `genai_config.json`, the graph's I/O names and rotary layout.
//! - [`onnx`]: ONNX's protobuf messages (reading graphs, and `export-onnx` writing them).
//!
//! Memory is fixed at load, as on the CPU engine: each layer's keys and values live in one ORT
//! tensor of `[1, kv_heads, n_ctx, head_dim]` bound as both the `past_key_values` input and the
//! `present` output (GroupQueryAttention's shared buffer, which genai calls
//! `past_present_share_buffer`), so a step writes its new positions in place and nothing grows.
//! Sliding the window moves rows inside those tensors on the host and re-rotates the moved keys
//! (the graph caches keys after rotary), as [`crate::backend::cpu`] does.

pub mod graph;
pub mod model;
pub mod npu;
pub mod onnx;
pub mod runtime;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{Shape, Tensor, TensorRefMut};

use super::{Backend, BackendError, BackendInfo, MemoryPlan, Provider, Vocabulary};
use model::{IoNames, OrtModel, OrtModelError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrtError {
    #[error("ONNX Runtime is not available: {0}")]
    Runtime(String),
    #[error(transparent)]
    Model(#[from] OrtModelError),
    #[error("no execution provider could run the model: {0}")]
    NoProvider(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("{0}")]
    Config(String),
}

impl From<ort::Error> for OrtError {
    fn from(e: ort::Error) -> Self {
        OrtError::Ort(e.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct OrtOptions {
    /// `ort.library`; `None`: `ORT_DYLIB_PATH`, then the fetch script's cache.
    pub library: Option<PathBuf>,
    /// In order of preference; each that fails is logged and skipped.
    pub providers: Vec<Provider>,
    /// Options handed to each provider as they are (`device_id`, `backend_path`, ...).
    pub provider_options: BTreeMap<Provider, BTreeMap<String, String>>,
    /// Plugin execution provider libraries (`ort.ep_libraries`), registered before the first
    /// session; a provider without one here uses [`runtime::default_ep_library`], else the
    /// provider built into the library.
    pub ep_libraries: BTreeMap<Provider, PathBuf>,
    pub threads: usize,
    pub n_ctx: usize,
    /// Tokens per forward call: the logits of a chunk are `max_batch × n_vocab` floats.
    pub max_batch: usize,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            library: None,
            providers: vec![Provider::Cpu],
            provider_options: BTreeMap::new(),
            ep_libraries: BTreeMap::new(),
            threads: 0,
            n_ctx: 2048,
            max_batch: 64,
        }
    }
}

impl OrtOptions {
    /// The window and thread count for `model`: `n_ctx` 0 is the model's own window, at most
    /// 4096 (as on the CPU engine); `threads` 0 is one per core.
    fn resolve(&self, model: &OrtModel) -> (usize, usize) {
        let n_ctx = match self.n_ctx {
            0 => model.context_length.min(4096),
            n => n,
        };
        (n_ctx, self.threads())
    }

    /// Compute threads: `threads`, or one per core when 0.
    fn threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

pub struct OrtBackend {
    session: Session,
    binding: IoBinding,
    model: OrtModel,
    /// Keys and values of each layer, room for `[1, kv_heads, n_ctx, head_dim]`: K of layer i
    /// at 2i, V at 2i + 1. How they are laid out and bound depends on `concat`.
    kv: Vec<Tensor<f32>>,
    /// `None`: GroupQueryAttention's shared buffer, each `kv` tensor bound once as both past
    /// and present, positions at a stride of n_ctx. `Some`: the graph's `present` is `past`
    /// plus the new positions ([`OrtModel::share_buffer`] false); see [`Concat`].
    concat: Option<Concat>,
    /// Logits copied out of the last run: (max_batch, n_vocab).
    logits: Vec<f32>,
    n_ctx: usize,
    max_batch: usize,
    threads: usize,
    provider: String,
    /// Where ORT puts the logits: a fresh output each run, since its shape follows the batch.
    cpu: MemoryInfo<'static>,
    /// The graph was loaded with [`graph::LOGITS_FROM`]: its head computes only the positions
    /// asked for.
    last_logits: bool,
    /// The external data files the session reads from memory: declared after `session` and
    /// `binding`, so dropped after them.
    _external: Vec<memmap2::Mmap>,
}

/// The cache of a graph whose `present` outputs are `past` plus the new positions: `kv` holds
/// the `len` positions of the past packed as `[1, kv_heads, len, head_dim]`, `spare` as much
/// room again. A run reads views of `kv` and writes the present straight into views of
/// `spare`, then the two change places: nothing is copied and nothing grows past 2 × n_ctx
/// positions.
struct Concat {
    spare: Vec<Tensor<f32>>,
    len: usize,
    /// This run's past views, bound through ORT's C API (the `ort` crate's `bind_input` copies
    /// a borrowed tensor first, which is the copy this mode exists to avoid): kept here until
    /// the next run replaces them, as the binding refers to them.
    past: Vec<TensorRefMut<'static, f32>>,
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend")
            .field("model", &self.model.dir)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

pub(crate) fn ort_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Other(format!("ONNX Runtime: {e}"))
}

impl OrtBackend {
    /// What a session on the model in `dir` will hold, from its config and file sizes alone
    /// (ONNX Runtime is not loaded): weights, the KV tensors for `n_ctx`, and the logits of a
    /// chunk (ORT's output and the copy kept here). Weights count twice: ORT holds the graph's
    /// initializers as read and the copies its MatMulNBits kernels prepack at load. Measured
    /// on the genai SmolLM2 folder (82.5 MiB of files), n_ctx 2048, after three requests: RSS
    /// 323.3 MiB = 2 × 82.5 weights + 90 KV + 24 logits + 44 for the runtime.
    pub fn plan(dir: &Path, opts: &OrtOptions) -> Result<MemoryPlan, OrtError> {
        let model = OrtModel::open(dir)?;
        let (n_ctx, threads) = opts.resolve(&model);
        let per_position = (2 * model.n_layer * model.n_kv_head * model.head_dim * 4) as u64;
        let max_batch = opts.max_batch.clamp(1, n_ctx.max(1));
        // A graph whose present is past plus the new positions keeps two caches that take turns.
        let caches = if model.share_buffer { 1 } else { 2 };
        Ok(MemoryPlan {
            weights: 2 * model.file_bytes,
            kv_cache: caches * per_position * n_ctx as u64,
            scratch: (2 * max_batch * model.n_vocab * 4) as u64,
            n_ctx,
            threads,
            bytes_per_position: per_position,
        })
    }

    /// Loads ONNX Runtime (once per process), reads the model folder and creates a session on
    /// the first provider of `opts.providers` that takes it.
    pub fn open(dir: &Path, opts: &OrtOptions) -> Result<OrtBackend, OrtError> {
        let rt = runtime::init(opts.library.as_deref()).map_err(OrtError::Runtime)?;
        runtime::register_for_chain(&opts.providers, &opts.ep_libraries);
        tracing::debug!(
            "ONNX Runtime {} from {} (providers built in: {:?})",
            rt.version,
            rt.library.display(),
            rt.providers
        );
        let env = runtime::environment()
            .ok_or_else(|| OrtError::Runtime("environment missing after load".into()))?;
        let model = OrtModel::open(dir)?;
        let (n_ctx, threads) = opts.resolve(&model);
        if n_ctx < 2 || n_ctx > model.context_length {
            return Err(OrtError::Config(format!(
                "model.n_ctx = {n_ctx} is outside 2..={} (the model's context_length)",
                model.context_length
            )));
        }
        let edited = edited_graph(&model);
        // Each provider that fails says why, in the log and, if none works, in the error.
        let mut failures = Vec::new();
        let mut chosen = None;
        runtime::stdout_to_stderr(|| {
            for &p in &opts.providers {
                let name = p.name();
                let mut attempt = session_with(env, &model, p, opts, threads, edited.as_ref());
                if let (Err(SessionError::Load(e)), Some(_)) = (&attempt, &edited) {
                    tracing::warn!(
                    "ort: the graph with its head cut to the wanted positions did not load on {name} ({e}); loading {} as it is",
                    model.onnx.display()
                );
                    attempt = session_with(env, &model, p, opts, threads, None);
                }
                match attempt {
                    Ok((s, last_logits)) => {
                        tracing::info!("ort: execution provider {name} registered");
                        chosen = Some((name.to_string(), s, last_logits));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("ort: execution provider {name} failed: {e}");
                        failures.push(format!("{name}: {e}"));
                    }
                }
            }
        });
        let Some((provider, session, last_logits)) = chosen else {
            return Err(OrtError::NoProvider(if failures.is_empty() {
                "ort.providers is empty".into()
            } else {
                failures.join("; ")
            }));
        };
        let shape = [1, model.n_kv_head, n_ctx, model.head_dim];
        let allocator = Allocator::default();
        let tensors = || -> Result<Vec<Tensor<f32>>, OrtError> {
            let mut kv = Vec::with_capacity(2 * model.n_layer);
            for _ in 0..2 * model.n_layer {
                let mut t = Tensor::<f32>::new(&allocator, shape)?;
                t.extract_tensor_mut().1.fill(0.0);
                kv.push(t);
            }
            Ok(kv)
        };
        let mut kv = tensors()?;
        let mut binding = session.create_binding()?;
        let concat = if model.share_buffer {
            for (i, pair) in kv.chunks_exact_mut(2).enumerate() {
                let n = &model.names;
                binding.bind_input(IoNames::layer(&n.past_key, i), &pair[0])?;
                binding.bind_input(IoNames::layer(&n.past_value, i), &pair[1])?;
                binding.bind_output(IoNames::layer(&n.present_key, i), &mut pair[0])?;
                binding.bind_output(IoNames::layer(&n.present_value, i), &mut pair[1])?;
            }
            None
        } else {
            // Bound at each run, with the shapes of that run.
            tracing::info!(
                "ort: the graph's present is past plus the new positions: two caches of n_ctx, taking turns"
            );
            Some(Concat {
                spare: tensors()?,
                len: 0,
                past: Vec::with_capacity(2 * model.n_layer),
            })
        };
        let cpu = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )?;
        let max_batch = opts.max_batch.clamp(1, n_ctx);
        if last_logits {
            tracing::info!("ort: the LM head computes only the positions asked for");
        } else {
            tracing::info!(
                "ort: {} keeps its head as it is: every position's logits are computed",
                model.onnx.display()
            );
        }
        Ok(OrtBackend {
            _external: match (last_logits, edited) {
                (true, Some(g)) => g.files.into_iter().map(|(_, m)| release(m)).collect(),
                _ => Vec::new(),
            },
            last_logits,
            logits: vec![0.0; max_batch * model.n_vocab],
            session,
            binding,
            n_ctx,
            max_batch,
            threads,
            provider,
            cpu,
            kv,
            concat,
            model,
        })
    }

    pub fn model(&self) -> &OrtModel {
        &self.model
    }

    /// Whether the session runs the graph with its head cut to the positions asked for
    /// ([`graph::last_logits`]); `false` when the graph was loaded as it is.
    pub fn head_cut(&self) -> bool {
        self.last_logits
    }

    /// The execution provider the session runs on.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    fn kv_floats(&self) -> usize {
        self.model.n_kv_head * self.n_ctx * self.model.head_dim
    }

    /// Positions between one head's rows and the next in each `kv` tensor.
    fn stride(&self) -> usize {
        self.concat.as_ref().map_or(self.n_ctx, |c| c.len)
    }

    /// Concat graphs: packs the cache to its first `pos` positions (a request that reuses
    /// part of the last one's prompt), then binds views of this run's shapes: past
    /// `[1, heads, pos, hd]` over `kv`, present `[1, heads, pos + n, hd]` over `spare`.
    fn bind_concat(&mut self, pos: usize, n: usize) -> Result<(), BackendError> {
        let (heads, hd) = (self.model.n_kv_head, self.model.head_dim);
        let Some(c) = self.concat.as_mut() else {
            return Ok(());
        };
        if pos > c.len {
            return Err(BackendError::Other(format!(
                "ONNX Runtime: position {pos} asked of a cache holding {} (positions in between were never computed)",
                c.len
            )));
        }
        if pos < c.len {
            for t in &mut self.kv {
                let data = t.extract_tensor_mut().1;
                repack(data, heads, hd, c.len, pos, pos, c.len - pos, c.len, None);
            }
            c.len = pos;
        }
        let names = &self.model.names;
        let mut views = Vec::with_capacity(self.kv.len());
        for (j, (past, present)) in self.kv.iter_mut().zip(&mut c.spare).enumerate() {
            let (layer, key) = (j / 2, j % 2 == 0);
            let (pn, qn) = if key {
                (&names.past_key, &names.present_key)
            } else {
                (&names.past_value, &names.present_value)
            };
            // SAFETY: both views lie inside tensors of n_ctx positions (pos + n ≤ n_ctx was
            // checked) that this backend owns and keeps, unmoved, for as long as the binding
            // that holds the views; ORT reads the one and writes the other during `run`.
            let (p, q) = unsafe {
                (
                    TensorRefMut::<f32>::from_raw(
                        self.cpu.clone(),
                        past.data_ptr_mut(),
                        Shape::new([1, heads as i64, pos as i64, hd as i64]),
                    ),
                    TensorRefMut::<f32>::from_raw(
                        self.cpu.clone(),
                        present.data_ptr_mut(),
                        Shape::new([1, heads as i64, (pos + n) as i64, hd as i64]),
                    ),
                )
            };
            let (p, q) = (p.map_err(ort_err)?, q.map_err(ort_err)?);
            bind_input_raw(&mut self.binding, &IoNames::layer(pn, layer), &p)?;
            views.push(p);
            self.binding
                .bind_output(IoNames::layer(qn, layer), q)
                .map_err(ort_err)?;
        }
        // The views the binding now refers to replace the last run's.
        c.past = views;
        Ok(())
    }
}

/// The model's graph with its head cut to the positions asked for ([`graph::last_logits`]) and
/// its external data files mapped, ready to load from memory; `None` (and the file is loaded as
/// it is) when the edit does not apply or a file cannot be mapped.
struct EditedGraph {
    bytes: Vec<u8>,
    /// Each file by the name the graph gives it. Mapped read-only, as ORT maps them itself when
    /// it loads from a path: pages of the file, not a second copy of the weights.
    files: Vec<(std::ffi::CString, memmap2::Mmap)>,
}

fn edited_graph(model: &OrtModel) -> Option<EditedGraph> {
    let original = std::fs::read(&model.onnx).ok()?;
    let bytes = graph::last_logits(&original, &model.names.logits)?;
    let dir = model.onnx.parent()?;
    let mut files = Vec::new();
    for name in graph::external_files(&original)? {
        let path = dir.join(&name);
        let map = std::fs::File::open(&path).and_then(|f| {
            // SAFETY: read-only map of a model file; nothing in this process writes it, and a
            // model folder replaced under a running daemon is outside what it can defend.
            unsafe { memmap2::Mmap::map(&f) }
        });
        match (map, std::ffi::CString::new(name)) {
            (Ok(m), Ok(n)) => files.push((n, m)),
            (Err(e), _) => {
                tracing::warn!("ort: mapping {}: {e}", path.display());
                return None;
            }
            (_, Err(_)) => return None,
        }
    }
    Some(EditedGraph { bytes, files })
}

/// Gives back the resident pages of a mapped data file once the session is built: what ORT
/// prepacked it never reads again, and what it does read (norms, the embedding rows of each
/// step) comes back from the page cache on demand. Without this the whole file stays counted in
/// the process's memory beside ORT's prepacked copy of it.
fn release(m: memmap2::Mmap) -> memmap2::Mmap {
    // SAFETY: a read-only file mapping: dropping its pages loses nothing, later reads fault them
    // in again from the file.
    if let Err(e) = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) } {
        tracing::debug!("ort: madvise(DONTNEED) on a data file: {e}");
    }
    m
}

/// Hands the mapped external data files to the session options by name
/// (`AddExternalInitializersFromMemory`); the maps must outlive the session, which
/// [`OrtBackend`] sees to by dropping its session first.
fn add_external_files(
    b: &mut ort::session::builder::SessionBuilder,
    g: &EditedGraph,
) -> Result<(), String> {
    use ort::AsPointer;
    if g.files.is_empty() {
        return Ok(());
    }
    let names: Vec<*const std::ffi::c_char> = g.files.iter().map(|(n, _)| n.as_ptr()).collect();
    let data: Vec<*mut std::ffi::c_char> = g
        .files
        .iter()
        .map(|(_, m)| m.as_ptr().cast::<std::ffi::c_char>().cast_mut())
        .collect();
    let lens: Vec<usize> = g.files.iter().map(|(_, m)| m.len()).collect();
    let api = ort::api();
    // SAFETY: the arrays hold `files.len()` valid entries and live through the call; ORT reads
    // the buffers (never writes them) for as long as the session exists, and the maps outlive it.
    let status = unsafe {
        (api.AddExternalInitializersFromMemory)(
            b.ptr_mut(),
            names.as_ptr(),
            data.as_ptr(),
            lens.as_ptr(),
            names.len(),
        )
    };
    status_result(status)
}

#[derive(Debug)]
pub(crate) enum SessionError {
    /// The provider could not be set up (before any graph was read).
    Provider(String),
    /// The session did not build on the graph.
    Load(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Provider(e) => write!(f, "registration: {e}"),
            SessionError::Load(e) => write!(f, "session: {e}"),
        }
    }
}

/// A session on one provider (plus ORT's CPU provider for what it does not take), on the edited
/// graph when one is given; also says whether it was.
fn session_with(
    env: &ort::environment::Environment,
    model: &OrtModel,
    provider: Provider,
    opts: &OrtOptions,
    threads: usize,
    edited: Option<&EditedGraph>,
) -> Result<(Session, bool), SessionError> {
    let options = opts.provider_options.get(&provider);
    let setup = |e: ort::Error| SessionError::Provider(e.to_string());
    let mut b = session_builder(env, threads).map_err(SessionError::Provider)?;
    b = with_provider(env, b, provider, options)?;
    // A plugin provider that takes none of the graph's nodes leaves it all to ORT's CPU
    // provider: that counts as failing, so that the chain goes on (and says why). The nodes
    // each provider was given are in ORT's verbose log of the session's creation.
    let placed = match runtime::plugin_eps(provider) {
        Some(Ok(eps)) => {
            let counts = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
            let seen = counts.clone();
            b = b
                .with_log_level(ort::logging::LogLevel::Verbose)
                .map_err(|e| setup(e.into()))?
                .with_logger(std::sync::Arc::new(
                    move |level: ort::logging::LogLevel, _: &str, _: &str, _: &str, m: &str| {
                        if let Some((ep, n)) = placed_nodes(m) {
                            if let Ok(mut c) = seen.lock() {
                                c.insert(ep, n);
                            }
                        } else if level >= ort::logging::LogLevel::Error {
                            tracing::error!("ort: {m}");
                        }
                    },
                ))
                .map_err(|e| setup(e.into()))?;
            Some((eps, counts))
        }
        _ => None,
    };
    let load = |e: ort::Error| SessionError::Load(e.to_string());
    let out = match edited {
        Some(g) => {
            add_external_files(&mut b, g).map_err(SessionError::Load)?;
            (b.commit_from_memory(&g.bytes).map_err(load)?, true)
        }
        None => (b.commit_from_file(&model.onnx).map_err(load)?, false),
    };
    if let Some((eps, counts)) = placed {
        let counts = counts.lock().map(|c| c.clone()).unwrap_or_default();
        let took: usize = eps.iter().filter_map(|e| counts.get(e)).sum();
        tracing::info!("ort: nodes placed per provider: {counts:?}");
        if took == 0 {
            return Err(SessionError::Load(format!(
                "{provider} took none of the graph's nodes (placed: {counts:?}); a graph made for it is needed (for qnn: `edgellm export-onnx --target qnn`)"
            )));
        }
    }
    Ok(out)
}

/// A session builder as every session here starts: `threads` compute threads, errors only in
/// ORT's own log, and ONNX Runtime's device policy CPU-first (`ort` sets "most efficient first"
/// in every builder); [`with_provider`] names the devices a session gets.
pub(crate) fn session_builder(
    env: &ort::environment::Environment,
    threads: usize,
) -> Result<ort::session::builder::SessionBuilder, String> {
    let e = |e: ort::Error| e.to_string();
    Session::builder(env)
        .map_err(e)?
        .with_auto_device(ort::session::builder::AutoDevicePolicy::PreferCPU)
        .map_err(|x| e(x.into()))?
        .with_intra_threads(threads)
        .map_err(|x| e(x.into()))?
        .with_inter_threads(1)
        .map_err(|x| e(x.into()))?
        .with_log_level(ort::logging::LogLevel::Error)
        .map_err(|x| e(x.into()))
}

/// `provider` as the library builds it in, with `options` handed over as they are.
fn builtin(
    provider: Provider,
    options: Option<&BTreeMap<String, String>>,
) -> ort::ep::ExecutionProviderDispatch {
    use ort::ep::{self, ArbitrarilyConfigurableExecutionProvider};
    fn with<E: ArbitrarilyConfigurableExecutionProvider>(
        mut e: E,
        o: Option<&BTreeMap<String, String>>,
    ) -> E {
        for (k, v) in o.into_iter().flatten() {
            e = e.with_arbitrary_config(k, v);
        }
        e
    }
    match provider {
        Provider::Qnn => with(ep::QNN::default(), options).build(),
        Provider::Cuda => with(ep::CUDA::default(), options).build(),
        Provider::Tensorrt => with(ep::TensorRT::default(), options).build(),
        Provider::Xnnpack => with(ep::XNNPACK::default(), options).build(),
        Provider::Cpu => ep::CPU::default().build(),
    }
    .error_on_failure()
}

/// Options a plugin provider gets unless `ort.provider_options` says otherwise. QNN: the HTP
/// (its NPU backend), float parts in fp16 there, which needs a SoC to prepare for (60: the
/// Snapdragon 8 Gen 3, HTP v75; a board names its own).
pub(crate) fn plugin_defaults(provider: Provider) -> &'static [(&'static str, &'static str)] {
    match provider {
        Provider::Qnn => &[
            ("backend_type", "htp"),
            ("enable_htp_fp16_precision", "1"),
            ("soc_model", "60"),
            ("htp_arch", "75"),
        ],
        _ => &[],
    }
}

/// The options a plugin provider is given: `configured` over [`plugin_defaults`] (no
/// `backend_type` where a `backend_path` is configured).
pub(crate) fn plugin_options(
    provider: Provider,
    configured: Option<&BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut options = configured.cloned().unwrap_or_default();
    for &(k, v) in plugin_defaults(provider) {
        let path_given = k == "backend_type" && options.contains_key("backend_path");
        if !options.contains_key(k) && !path_given {
            options.insert(k.to_string(), v.to_string());
        }
    }
    options
}

/// `("qnn", 5)` from ORT's verbose line `Node(s) placed on [qnn]. Number of nodes: 5`.
fn placed_nodes(message: &str) -> Option<(String, usize)> {
    let rest = message.trim().strip_prefix("Node(s) placed on [")?;
    let (ep, rest) = rest.split_once(']')?;
    let n = rest
        .trim()
        .strip_prefix(". Number of nodes:")?
        .trim()
        .parse()
        .ok()?;
    Some((ep.to_string(), n))
}

/// Adds `provider` to a session builder: through the devices of its plugin library when one is
/// registered for it ([`runtime::plugin_eps`]; its options over [`plugin_defaults`]), else the
/// provider built into the library ([`builtin`], its options as they are).
pub(crate) fn with_provider(
    env: &ort::environment::Environment,
    b: ort::session::builder::SessionBuilder,
    provider: Provider,
    options: Option<&BTreeMap<String, String>>,
) -> Result<ort::session::builder::SessionBuilder, SessionError> {
    match runtime::plugin_eps(provider) {
        Some(Ok(eps)) => {
            let options = plugin_options(provider, options);
            let options = Some(&options);
            let devices: Vec<_> = env
                .devices()
                .filter(|d| d.ep().is_ok_and(|e| eps.iter().any(|x| x == e)))
                .collect();
            if devices.is_empty() {
                return Err(SessionError::Provider(format!(
                    "the plugin library for {provider} offers no device"
                )));
            }
            // `with_devices` hands each device's EP the options prefixed with its name.
            let opts: Vec<(String, String)> = eps
                .iter()
                .flat_map(|ep| {
                    options
                        .into_iter()
                        .flatten()
                        .map(move |(k, v)| (format!("{ep}.{k}"), v.clone()))
                })
                .collect();
            b.with_devices(devices, Some(&opts))
                .map_err(|e| SessionError::Provider(e.to_string()))
        }
        Some(Err(reason)) => Err(SessionError::Provider(reason)),
        None => {
            // ONNX Runtime's own CPU device, named: a session given no device picks one by
            // policy, and a plugin's device can present itself as a CPU (QNN's HTP simulator
            // does).
            if provider == Provider::Cpu {
                let cpu: Vec<_> = env
                    .devices()
                    .filter(|d| d.ep().is_ok_and(|e| e == "CPUExecutionProvider"))
                    .collect();
                if !cpu.is_empty() {
                    return b
                        .with_devices(cpu, None)
                        .map_err(|e| SessionError::Provider(e.to_string()));
                }
            }
            let mut b = b;
            builtin(provider, options)
                .register(&mut b)
                .map_err(|e| SessionError::Provider(e.to_string()))?;
            Ok(b)
        }
    }
}

impl Backend for OrtBackend {
    /// The folder's `tokenizer.json`; its chat template is `chat_template.jinja`, else
    /// `chat_template` in its `tokenizer_config.json`, else ChatML.
    fn vocabulary(&self) -> Vocabulary<'_> {
        let dir = &self.model.dir;
        let chat_template = std::fs::read_to_string(dir.join("chat_template.jinja"))
            .ok()
            .or_else(|| {
                let cfg = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
                let v: serde_json::Value = serde_json::from_str(&cfg).ok()?;
                v.get("chat_template")?.as_str().map(str::to_string)
            });
        Vocabulary::Folder {
            tokenizer_json: dir.join("tokenizer.json"),
            bos: self.model.bos,
            eos: self.model.eos.clone(),
            chat_template,
        }
    }

    fn info(&self) -> BackendInfo {
        let caches = if self.concat.is_some() { 2 } else { 1 };
        let kv = (caches * 2 * self.model.n_layer * self.kv_floats() * 4) as u64;
        let weights = self.model.file_bytes;
        BackendInfo {
            backend: "ort".into(),
            compute: self.provider.clone(),
            threads: self.threads,
            n_ctx: self.n_ctx,
            n_vocab: self.model.n_vocab,
            max_batch: self.max_batch,
            tensor_types: vec![],
            kv_type: "f32".into(),
            weight_bytes: weights,
            state_bytes: kv + (self.logits.len() * 4) as u64,
            token_read_bytes: None,
            repacked_matrices: 0,
            placement: None,
        }
    }

    fn n_vocab(&self) -> usize {
        self.model.n_vocab
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn reset(&mut self) {}

    fn can_shift(&self) -> bool {
        self.model.rotary.is_some()
    }

    fn shift(&mut self, keep: usize, discard: usize, len: usize) -> Result<(), BackendError> {
        let n_ctx = self.n_ctx;
        if len > n_ctx || keep + discard > len {
            return Err(BackendError::BadShift {
                keep,
                discard,
                len,
                n_ctx,
            });
        }
        let Some(rot) = self.model.rotary.clone() else {
            return Err(BackendError::Other(
                "this ONNX model's attention has no rotary tables edgellm can read; its window cannot slide".into(),
            ));
        };
        let hd = self.model.head_dim;
        let heads = self.model.n_kv_head;
        // cos/sin of −discard for each rotated pair.
        let rot_by: Vec<(f32, f32)> = rot
            .inv_freq
            .iter()
            .map(|f| {
                let a = -(discard as f64) * *f as f64;
                (a.cos() as f32, a.sin() as f32)
            })
            .collect();
        // Concat graphs hold `c.len` positions packed at that stride; the engine's `len` is
        // never more (it counts what was computed), and what lies past it goes as well.
        // `from`: the stride now; `past`: positions beyond `len` to drop first (concat only).
        let (from, to, past) = match &self.concat {
            None => (n_ctx, n_ctx, false),
            Some(c) if c.len >= len => (c.len, len - discard, c.len > len),
            Some(c) => {
                return Err(BackendError::Other(format!(
                    "ONNX Runtime: window slide over {len} positions of a cache holding {}",
                    c.len
                )))
            }
        };
        for (i, t) in self.kv.iter_mut().enumerate() {
            let data = t.extract_tensor_mut().1;
            let rot = (i % 2 == 0).then_some((rot_by.as_slice(), rot.interleaved));
            if past {
                // Positions past `len` first (packed to a stride of `len`), then the slide.
                repack(data, heads, hd, from, len, len, from - len, from, None);
                repack(data, heads, hd, len, to, keep, discard, len, rot);
            } else {
                repack(data, heads, hd, from, to, keep, discard, len, rot);
            }
        }
        if let Some(c) = self.concat.as_mut() {
            c.len = len - discard;
        }
        Ok(())
    }

    fn saved_bytes(&self, len: usize) -> usize {
        2 * self.model.n_layer * self.model.n_kv_head * len * self.model.head_dim * 4
    }

    fn save(&self, len: usize, out: &mut Vec<u8>) -> Result<(), BackendError> {
        let hd = self.model.head_dim;
        if len > self.n_ctx {
            return Err(BackendError::ContextFull {
                pos: 0,
                end: len,
                n_ctx: self.n_ctx,
            });
        }
        let stride = self.stride();
        if len > stride {
            return Err(BackendError::Other(format!(
                "ONNX Runtime: saving {len} positions of a cache holding {stride}"
            )));
        }
        out.reserve(self.saved_bytes(len));
        for t in &self.kv {
            save_heads(
                t.extract_tensor().1,
                self.model.n_kv_head,
                stride,
                hd,
                len,
                out,
            );
        }
        Ok(())
    }

    fn load(&mut self, len: usize, data: &[u8]) -> Result<(), BackendError> {
        let want = self.saved_bytes(len);
        if data.len() != want || len > self.n_ctx {
            return Err(BackendError::BadState {
                len,
                got: data.len(),
                want,
            });
        }
        let hd = self.model.head_dim;
        let heads = self.model.n_kv_head;
        // Concat graphs: the loaded positions are the cache, packed at their own stride.
        if let Some(c) = self.concat.as_mut() {
            c.len = len;
        }
        let stride = self.stride();
        let mut src = data.chunks_exact(4);
        for t in &mut self.kv {
            load_heads(t.extract_tensor_mut().1, heads, stride, hd, len, &mut src);
        }
        Ok(())
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        all_logits: bool,
    ) -> Result<&[f32], BackendError> {
        let n_vocab = self.model.n_vocab;
        super::check_forward(tokens, pos, self.max_batch, self.n_ctx, n_vocab)?;
        let n = tokens.len();
        self.bind_concat(pos, n)?;
        // ORT takes these two small tensors over (a few bytes a position); the KV tensors and
        // the logits buffer are the ones kept.
        let names = &self.model.names;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::from_array(([1usize, n], ids)).map_err(ort_err)?;
        let mask = Tensor::from_array(([1usize, pos + n], vec![1i64; pos + n])).map_err(ort_err)?;
        self.binding
            .bind_input(&names.input_ids, &ids)
            .map_err(ort_err)?;
        self.binding
            .bind_input(&names.attention_mask, &mask)
            .map_err(ort_err)?;
        if let Some(p) = &names.position_ids {
            let positions: Vec<i64> = (pos..pos + n).map(|p| p as i64).collect();
            let t = Tensor::from_array(([1usize, n], positions)).map_err(ort_err)?;
            self.binding.bind_input(p, &t).map_err(ort_err)?;
        }
        // Logits of the last position only, unless all are asked for (and the graph can say).
        let from = if self.last_logits && !all_logits {
            n - 1
        } else {
            0
        };
        if self.last_logits {
            let t = Tensor::from_array(([1usize], vec![from as i64])).map_err(ort_err)?;
            self.binding
                .bind_input(graph::LOGITS_FROM, &t)
                .map_err(ort_err)?;
        }
        self.binding
            .bind_output_to_device(&names.logits, &self.cpu)
            .map_err(ort_err)?;
        let outputs = self.session.run_binding(&self.binding).map_err(ort_err)?;
        if let Some(c) = self.concat.as_mut() {
            // The present just written is the next run's past.
            std::mem::swap(&mut self.kv, &mut c.spare);
            c.len = pos + n;
        }
        let logits = outputs
            .get(&names.logits)
            .ok_or_else(|| BackendError::Other("ONNX Runtime: no logits output".into()))?;
        let (shape, data) = logits.try_extract_tensor::<f32>().map_err(ort_err)?;
        let rows = n - from;
        if data.len() != rows * n_vocab {
            return Err(BackendError::Other(format!(
                "ONNX Runtime: logits of shape {shape:?}, expected [1, {rows}, {n_vocab}]"
            )));
        }
        if all_logits {
            self.logits[..n * n_vocab].copy_from_slice(data);
            Ok(&self.logits[..n * n_vocab])
        } else {
            self.logits[..n_vocab].copy_from_slice(&data[(rows - 1) * n_vocab..]);
            Ok(&self.logits[..n_vocab])
        }
    }
}

/// Appends positions `0..len` of each of `heads` heads of a cache tensor (head `h` from
/// position `h × stride`, `hd` values a position) to `out`, little-endian f32: the layout
/// [`Backend::save`] writes.
pub(crate) fn save_heads(
    data: &[f32],
    heads: usize,
    stride: usize,
    hd: usize,
    len: usize,
    out: &mut Vec<u8>,
) {
    for h in 0..heads {
        let base = h * stride * hd;
        for v in &data[base..base + len * hd] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Reads back what [`save_heads`] wrote for one tensor from `src` (4-byte chunks).
pub(crate) fn load_heads(
    dst: &mut [f32],
    heads: usize,
    stride: usize,
    hd: usize,
    len: usize,
    src: &mut std::slice::ChunksExact<'_, u8>,
) {
    for h in 0..heads {
        let base = h * stride * hd;
        for (d, s) in dst[base..base + len * hd].iter_mut().zip(&mut *src) {
            *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        }
    }
}

/// Binds `value` to input `name` as it is (ORT's `BindInput` keeps a reference to the value,
/// no copy of the data); the caller keeps `value` alive while the binding refers to it.
fn bind_input_raw(
    binding: &mut IoBinding,
    name: &str,
    value: &TensorRefMut<'static, f32>,
) -> Result<(), BackendError> {
    use ort::AsPointer;
    let name = std::ffi::CString::new(name)
        .map_err(|_| BackendError::Other(format!("input name {name:?} holds a NUL")))?;
    // SAFETY: pointers of live objects: the binding, a NUL-terminated name, and a value the
    // caller keeps alive for as long as the binding uses it.
    let status = unsafe { (ort::api().BindInput)(binding.ptr_mut(), name.as_ptr(), value.ptr()) };
    status_result(status).map_err(|e| BackendError::Other(format!("ONNX Runtime: {e}")))
}

/// An `OrtStatus` from a C API call as a result, its message read and the status released.
fn status_result(status: ort::sys::OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from ORT, read then released once.
    unsafe {
        let m = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        Err(m)
    }
}

/// Moves each head's rows of `data`, laid out `[heads, from, hd]`, to a `[heads, to, hd]`
/// layout, leaving out rows `keep..keep + discard` of the `len` in use (`len − discard ≤ to ≤
/// from`), and rotates the rows moved down when `rot` is given (cached keys, by the slide).
/// Every row moves to a lower or equal place and heads are taken in order, so nothing is
/// overwritten before it is read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn repack(
    data: &mut [f32],
    heads: usize,
    hd: usize,
    from: usize,
    to: usize,
    keep: usize,
    discard: usize,
    len: usize,
    rot: Option<(&[(f32, f32)], bool)>,
) {
    debug_assert!(len - discard <= to && to <= from && keep + discard <= len);
    for h in 0..heads {
        let (src, dst) = (h * from * hd, h * to * hd);
        if src != dst {
            data.copy_within(src..src + keep * hd, dst);
        }
        data.copy_within(src + (keep + discard) * hd..src + len * hd, dst + keep * hd);
        if let Some((by, interleaved)) = rot {
            for p in keep..len - discard {
                let row = dst + p * hd;
                rotate(&mut data[row..row + hd], by, interleaved);
            }
        }
    }
}

/// Rotates one cached key by the angles in `by` (cos, sin per pair).
pub(crate) fn rotate(key: &mut [f32], by: &[(f32, f32)], interleaved: bool) {
    let half = key.len() / 2;
    for (i, &(c, s)) in by.iter().enumerate() {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x, y) = (key[a], key[b]);
        key[a] = x * c - y * s;
        key[b] = x * s + y * c;
    }
}

#[cfg(test)]
mod placement_tests {
    use super::placed_nodes;

    #[test]
    fn placement_lines_of_the_verbose_log_are_read() {
        assert_eq!(
            placed_nodes(" Node(s) placed on [qnn]. Number of nodes: 5"),
            Some(("qnn".to_string(), 5))
        );
        assert_eq!(
            placed_nodes("Node(s) placed on [CPUExecutionProvider]. Number of nodes: 308"),
            Some(("CPUExecutionProvider".to_string(), 308))
        );
        assert_eq!(
            placed_nodes("All nodes placed on [CPUExecutionProvider]. Number of nodes: 3"),
            None
        );
        assert_eq!(
            placed_nodes("Node(s) placed on [qnn]. Number of nodes: many"),
            None
        );
    }
}
