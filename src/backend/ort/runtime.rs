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
    download_cache()
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

/// A plugin execution provider library (`ort.ep_libraries`): registered into the process's
/// environment (`RegisterExecutionProviderLibrary`) before any session is made, once per name.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpLibrary {
    /// The provider name it serves (`qnn`, ...), the key in `ort.ep_libraries`.
    pub name: String,
    pub path: PathBuf,
    /// Why it could not be registered; `None` when it was.
    pub error: Option<String>,
    /// The devices it brought (ONNX Runtime's `GetEpDevices`, those that appeared with it).
    pub devices: Vec<EpDevice>,
}

/// One device a provider offers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpDevice {
    /// The provider's own name for itself ("QNN", "CPUExecutionProvider").
    pub ep: String,
    pub ep_vendor: String,
    /// "cpu", "gpu" or "npu": what ONNX Runtime calls the hardware.
    pub device_type: String,
    pub vendor: String,
    pub device_id: u32,
}

static EP_LIBRARIES: std::sync::Mutex<Vec<EpLibrary>> = std::sync::Mutex::new(Vec::new());

fn devices(env: &ort::environment::Environment) -> Vec<EpDevice> {
    env.devices()
        .map(|d| {
            let hw = d.hardware_device();
            EpDevice {
                ep: d.ep().unwrap_or("?").to_string(),
                ep_vendor: d.ep_vendor().unwrap_or("?").to_string(),
                device_type: format!("{:?}", hw.ty()).to_lowercase(),
                vendor: hw.vendor().unwrap_or("?").to_string(),
                device_id: hw.id(),
            }
        })
        .collect()
}

/// Registers each plugin library of `libs` (provider name → path) not registered yet; a
/// library that fails is remembered with its reason (and not tried again in this process).
/// Needs [`init`] first. Returns every library registered or tried so far.
pub fn register_ep_libraries(libs: &std::collections::BTreeMap<String, PathBuf>) -> Vec<EpLibrary> {
    let Ok(mut known) = EP_LIBRARIES.lock() else {
        return Vec::new();
    };
    let Some(env) = environment() else {
        return known.clone();
    };
    for (name, path) in libs {
        if known.iter().any(|l| &l.name == name) {
            continue;
        }
        let before = devices(env);
        let mut lib = EpLibrary {
            name: name.clone(),
            path: path.clone(),
            error: None,
            devices: Vec::new(),
        };
        if !path.is_file() {
            lib.error = Some(format!(
                "ort.ep_libraries.{name} = {}: no such file (scripts/fetch-ort.sh --qnn fetches the QNN provider)",
                path.display()
            ));
        } else {
            match env.register_ep_library(name.clone(), path) {
                Ok(()) => {
                    lib.devices = devices(env)
                        .into_iter()
                        .filter(|d| !before.contains(d))
                        .collect();
                    if lib.devices.is_empty() {
                        lib.error = Some(format!(
                            "ort.ep_libraries.{name} = {}: registered, but it offers no device on this machine",
                            path.display()
                        ));
                    }
                }
                Err(e) => {
                    lib.error = Some(format!("ort.ep_libraries.{name} = {}: {e}", path.display()))
                }
            }
        }
        match &lib.error {
            None => tracing::info!(
                "ort: plugin execution provider {name} registered from {}: {}",
                path.display(),
                lib.devices
                    .iter()
                    .map(|d| format!("{} ({} {}, {})", d.ep, d.vendor, d.device_type, d.ep_vendor))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(e) => tracing::warn!("ort: {e}"),
        }
        known.push(lib);
    }
    known.clone()
}

/// The plugin libraries registered or tried in this process.
pub fn ep_libraries() -> Vec<EpLibrary> {
    EP_LIBRARIES.lock().map(|l| l.clone()).unwrap_or_default()
}

/// The plugin library serving provider `name`, if one was configured.
pub fn ep_library(name: &str) -> Option<EpLibrary> {
    ep_libraries().into_iter().find(|l| l.name == name)
}

/// The version of the QNN execution provider (`onnxruntime-qnn` on PyPI) that
/// `scripts/fetch-ort.sh --qnn` fetches and the tests run.
pub const QNN_VERSION: &str = "2.7.0";

/// `$EDGELLM_DOWNLOAD_CACHE`, else `~/.cache/edgellm/downloads`: where the fetch script
/// extracts ONNX Runtime and the QNN provider.
fn download_cache() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::env::var_os("EDGELLM_DOWNLOAD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".cache/edgellm/downloads"))
}

/// Where `scripts/fetch-ort.sh --qnn` puts the plugin library of `provider`, when it is there:
/// used for a provider of the chain that `ort.ep_libraries` does not name.
pub fn default_ep_library(provider: crate::backend::Provider) -> Option<PathBuf> {
    let path = match provider {
        crate::backend::Provider::Qnn => download_cache()
            .join(format!(
                "onnxruntime-qnn-{QNN_VERSION}-{}",
                std::env::consts::ARCH
            ))
            .join("onnxruntime_qnn/libonnxruntime_providers_qnn.so"),
        _ => return None,
    };
    path.is_file().then_some(path)
}

/// Registers the plugin libraries the providers of a chain use: `configured` first, else
/// [`default_ep_library`]. Needs [`init`] first.
pub fn register_for_chain(
    chain: &[crate::backend::Provider],
    configured: &std::collections::BTreeMap<crate::backend::Provider, PathBuf>,
) {
    let libs: std::collections::BTreeMap<String, PathBuf> = chain
        .iter()
        .filter_map(|p| {
            configured
                .get(p)
                .cloned()
                .or_else(|| default_ep_library(*p))
                .map(|path| (p.name().to_string(), path))
        })
        .collect();
    if !libs.is_empty() {
        register_ep_libraries(&libs);
    }
}

/// For a provider served by a plugin library: the names its devices go by, or why the library
/// could not be registered. `None`: no plugin serves it (the library's built-in one is used).
pub fn plugin_eps(provider: crate::backend::Provider) -> Option<Result<Vec<String>, String>> {
    let lib = ep_library(provider.name())?;
    if let Some(e) = lib.error {
        return Some(Err(e));
    }
    let mut eps: Vec<String> = lib.devices.into_iter().map(|d| d.ep).collect();
    eps.dedup();
    Some(Ok(eps))
}

/// Runs `f` with the process's standard output sent to standard error. QNN's HTP simulator
/// prints a line to standard output as it loads, which would otherwise land in `info`'s JSON
/// or before an answer; C's buffer is flushed before output goes back.
pub fn stdout_to_stderr<T>(f: impl FnOnce() -> T) -> T {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: dup, dup2, fflush and close on this process's own descriptors 1 and 2.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(2, 1) } < 0 {
        if saved >= 0 {
            unsafe { libc::close(saved) };
        }
        return f();
    }
    let out = f();
    // SAFETY: as above; `saved` is the descriptor dup returned.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    out
}
