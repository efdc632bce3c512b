//! `edgellm info`: what this machine and config give the daemon, as JSON: the backend and
//! provider in use, ONNX Runtime's version and providers, the CPU's features and the int4
//! kernels chosen, and the memory budget; the model file loaded, with its sha256. Loads the
//! model as `serve` would.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use edgellm::backend::ort::runtime;
use edgellm::backend::Provider;
use edgellm::config::Config;
use edgellm::daemon::budget::Budget;
use edgellm::models;

use super::serve::{budget_for, set_model, spec_from_config};
use super::{open_engine, progress, UsageError};

#[derive(Args)]
pub struct InfoArgs {
    /// Config file (TOML); default: the embedded defaults
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// GGUF model file or ONNX model folder (overrides model.path / model.onnx)
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Execution providers in order of preference, comma-separated (overrides ort.providers)
    #[arg(long, value_enum, value_delimiter = ',')]
    providers: Option<Vec<Provider>>,
    /// Print JSON (what info always prints; accepted for scripts that say so)
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Info {
    version: &'static str,
    model: ModelInfo,
    backend: String,
    compute: String,
    threads: usize,
    n_ctx: usize,
    ort: OrtInfo,
    ort_providers_configured: Vec<Provider>,
    cpu: CpuInfo,
    memory: Budget,
}

/// The model file loaded: its path and name, size, and (a GGUF) its sha256 and type.
#[derive(Serialize)]
struct ModelInfo {
    path: PathBuf,
    file: String,
    bytes: u64,
    sha256: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    architecture: Option<String>,
}

impl ModelInfo {
    fn of(path: &std::path::Path) -> Result<ModelInfo> {
        let file = super::file_name(path);
        let d = models::describe(path, &models::manifests());
        if let Some(e) = d.error {
            anyhow::bail!("reading {}: {e}", path.display());
        }
        // An ONNX folder has no one file to hash.
        let sha256 = if d.kind == "onnx" {
            None
        } else {
            let bar = progress::hashing(&format!("sha256 of {file}"), d.bytes);
            let h = models::sha256_file(path, |done| bar.set_position(done))
                .with_context(|| format!("reading {}", path.display()))?;
            bar.finish_and_clear();
            Some(h)
        };
        Ok(ModelInfo {
            path: path.to_path_buf(),
            file,
            bytes: d.bytes,
            sha256,
            kind: Some(d.kind),
            architecture: Some(d.architecture),
        })
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum OrtInfo {
    Loaded {
        library: PathBuf,
        version: String,
        providers_available: Vec<&'static str>,
        /// Plugin provider libraries registered (`ort.ep_libraries`) and their devices.
        ep_libraries: Vec<runtime::EpLibrary>,
        /// Which provider runs which nodes of the model's graph, and the weight bytes they
        /// read (NPU exports).
        #[serde(skip_serializing_if = "Option::is_none")]
        placement: Option<edgellm::backend::ort::npu::Placement>,
    },
    Missing {
        error: String,
    },
}

#[derive(Serialize)]
struct CpuInfo {
    arch: &'static str,
    features: Vec<&'static str>,
    kernels: &'static str,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    set_model(&mut cfg, a.model)?;
    if let Some(p) = a.providers {
        cfg.ort.providers = p;
    }
    let _ = a.json;
    cfg.validate().map_err(UsageError)?;
    let spec = spec_from_config(&cfg)?;
    let budget = budget_for(&spec, &cfg)?;
    let loaded = open_engine(&spec, "loading")?;
    let b = loaded.engine.backend.info();
    // Loaded by the model above, or (a config without ONNX) loaded now to say what is there.
    let rt = runtime::loaded().unwrap_or_else(|| runtime::init(cfg.ort.library.as_deref()));
    let ort = match rt {
        Ok(rt) => OrtInfo::Loaded {
            library: rt.library,
            version: rt.version,
            providers_available: rt.providers,
            ep_libraries: runtime::ep_libraries(),
            placement: b.placement.clone(),
        },
        Err(e) => OrtInfo::Missing { error: e },
    };
    let out = Info {
        version: env!("CARGO_PKG_VERSION"),
        model: ModelInfo::of(&loaded.path)?,
        backend: match &loaded.fallback {
            Some(why) => format!("{} (fallback: {why})", b.backend),
            None => b.backend.clone(),
        },
        compute: b.compute.clone(),
        threads: b.threads,
        n_ctx: b.n_ctx,
        ort,
        ort_providers_configured: cfg.ort.providers.clone(),
        cpu: CpuInfo {
            arch: std::env::consts::ARCH,
            features: cpu_features(),
            kernels: cfg.model.kernels.resolve().name(),
        },
        memory: budget,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The CPU features the int4 kernels look for.
fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("sse4.2", is_x86_feature_detected!("sse4.2")),
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("f16c", is_x86_feature_detected!("f16c")),
            ("avxvnni", is_x86_feature_detected!("avxvnni")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        for (name, on) in [
            ("neon", std::arch::is_aarch64_feature_detected!("neon")),
            (
                "dotprod",
                std::arch::is_aarch64_feature_detected!("dotprod"),
            ),
            ("i8mm", std::arch::is_aarch64_feature_detected!("i8mm")),
            ("fp16", std::arch::is_aarch64_feature_detected!("fp16")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    f
}
