//! Loading ONNX Runtime: the library is opened once per process (`ort`'s `load-dynamic`), from
//! `ort.library`, else `ORT_DYLIB_PATH`, else the fetch script's cache. Telemetry is switched off
//! in the environment before the library is opened: ORT 1.30–1.32 Linux builds start it unless
//! `ORT_DISABLE_TELEMETRY=1` is set, and `with_telemetry(false)` alone is not enough.
//!
//! A failure is remembered: `ort` cannot load a second library into the same process, so after
//! the first failure every later attempt answers the same reason (and the engine falls back).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The version of ONNX Runtime the project fetches and tests with.
pub const TESTED_VERSION: &str = "1.32.0";

/// What the loaded library is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeInfo {
    pub library: PathBuf,
    /// "1.32.0", from the library's build string.
    pub version: String,
    /// Execution providers the library was built with (of those edgellm knows).
    pub providers: Vec<&'static str>,
}

static RUNTIME: OnceLock<Result<RuntimeInfo, String>> = OnceLock::new();
static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();

/// The process's ORT environment, once [`init`] succeeded.
pub fn environment() -> Option<&'static ort::environment::Environment> {
    ENV.get()
}

/// The library to load: `configured` (from `ort.library`), else `$ORT_DYLIB_PATH`, else the
/// library `scripts/fetch-ort.sh` extracts into the download cache.
pub fn library_path(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let cache = std::env::var_os("EDGELLM_DOWNLOAD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".cache/edgellm/downloads"));
    cache
        .join(format!(
            "onnxruntime-{TESTED_VERSION}-{}",
            std::env::consts::ARCH
        ))
        .join(format!("libonnxruntime.so.{TESTED_VERSION}"))
}

/// Switches ORT's telemetry off for this process. Called first thing in `main` (before any
/// thread starts, so that changing the environment is sound) and again before loading.
pub fn disable_telemetry() {
    if std::env::var_os("ORT_DISABLE_TELEMETRY").as_deref() != Some("1".as_ref()) {
        std::env::set_var("ORT_DISABLE_TELEMETRY", "1");
    }
}

/// Loads ONNX Runtime once; later calls return the first outcome.
pub fn init(configured: Option<&Path>) -> Result<RuntimeInfo, String> {
    RUNTIME
        .get_or_init(|| {
            let path = library_path(configured);
            std::panic::catch_unwind(|| load(&path))
                .unwrap_or_else(|_| Err(format!("{}: loading panicked", path.display())))
        })
        .clone()
}

/// The outcome of [`init`] if it ran.
pub fn loaded() -> Option<Result<RuntimeInfo, String>> {
    RUNTIME.get().cloned()
}

fn load(path: &Path) -> Result<RuntimeInfo, String> {
    disable_telemetry();
    if !path.exists() {
        return Err(format!(
            "ONNX Runtime library {} not found (set ort.library or ORT_DYLIB_PATH; scripts/fetch-ort.sh fetches one)",
            path.display()
        ));
    }
    let builder = ort::init_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let env = builder
        .with_name("edgellm")
        .with_telemetry(false)
        .build()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = ENV.set(env);
    let version = version_string(path).unwrap_or_else(|| "unknown".into());
    Ok(RuntimeInfo {
        library: path.to_path_buf(),
        version,
        providers: available_providers(),
    })
}

/// The library's own version (`OrtGetApiBase()->GetVersionString()`); the library is already
/// loaded by `ort`, so this only takes another reference to it.
fn version_string(path: &Path) -> Option<String> {
    /// The head of ORT's `OrtApiBase`: two function pointers, in this order, in every version.
    #[repr(C)]
    struct ApiBase {
        get_api: unsafe extern "C" fn(u32) -> *const std::ffi::c_void,
        get_version_string: unsafe extern "C" fn() -> *const std::ffi::c_char,
    }
    // SAFETY: the path was loaded as ONNX Runtime by `ort` a moment ago (its initialisers have
    // run); `OrtGetApiBase` has this signature in every ONNX Runtime release, returns a pointer
    // to a static struct, and the version string is a static NUL-terminated string.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ApiBase> =
            lib.get(b"OrtGetApiBase").ok()?;
        let base = get();
        if base.is_null() {
            return None;
        }
        let v = ((*base).get_version_string)();
        if v.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}

fn available_providers() -> Vec<&'static str> {
    use ort::ep::{self, ExecutionProvider};
    let mut out = Vec::new();
    type Probe = fn() -> ort::Result<bool>;
    let known: [(&'static str, Probe); 5] = [
        ("qnn", ep::QNN::is_available),
        ("cuda", ep::CUDA::is_available),
        ("tensorrt", ep::TensorRT::is_available),
        ("xnnpack", ep::XNNPACK::is_available),
        ("cpu", ep::CPU::is_available),
    ];
    for (name, available) in known {
        if available().unwrap_or(false) {
            out.push(name);
        }
    }
    out
}
