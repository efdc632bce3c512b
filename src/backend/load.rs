//! Which backend runs the model, opened, and the fallback to the int4 CPU engine.
//!
//! `cpu` runs a GGUF on this crate's engine. `ort` runs an ONNX folder on ONNX Runtime; when
//! that cannot start (library missing or of the wrong version, every provider failing, a model
//! that will not load) and a GGUF is configured, the int4 engine takes over and the reason is
//! kept for status and logs. `auto` is `ort` when an ONNX folder is configured, else `cpu`.
//! The same decision gives the memory plan ([`plan`]) before anything is loaded.

use std::path::{Path, PathBuf};

use super::cpu::model::ModelError;
use super::cpu::{CpuBackend, CpuOptions};
use super::ort::npu::{self, NpuBackend};
use super::ort::{OrtBackend, OrtError, OrtOptions};
use super::{Backend, BackendChoice, MemoryPlan};
use crate::gguf::Gguf;

/// Why no backend could be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Ort(#[from] OrtError),
    /// The spec names no model the chosen backend can run.
    #[error("{0}")]
    Spec(String),
}

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub choice: BackendChoice,
    /// The int4 engine's model, and the fallback of `ort`.
    pub gguf: Option<PathBuf>,
    /// An ONNX decoder folder for `ort`.
    pub onnx: Option<PathBuf>,
    pub cpu: CpuOptions,
    pub ort: OrtOptions,
}

/// An opened backend, and why the int4 engine runs instead of ONNX Runtime when it does.
pub struct Opened {
    pub backend: Box<dyn Backend>,
    pub fallback: Option<String>,
    /// The model file or folder it runs.
    pub path: PathBuf,
}

/// A path given as "the model": a folder is an ONNX model, a file a GGUF.
pub fn is_onnx_dir(p: &Path) -> bool {
    p.is_dir()
}

impl LoadSpec {
    /// Whether this spec asks for ONNX Runtime.
    pub fn wants_ort(&self) -> bool {
        match self.choice {
            BackendChoice::Cpu => false,
            BackendChoice::Ort => true,
            BackendChoice::Auto => self.onnx.is_some(),
        }
    }

    /// The model the spec will run first: the ONNX folder when ONNX Runtime is wanted, else
    /// the GGUF.
    pub fn model_path(&self) -> Option<&Path> {
        self.onnx
            .as_deref()
            .filter(|_| self.wants_ort())
            .or(self.gguf.as_deref())
    }

    fn gguf(&self) -> Result<&Path, OpenError> {
        self.gguf.as_deref().ok_or_else(|| {
            OpenError::Spec(
                "the cpu backend needs a GGUF model (model.path or --model FILE)".into(),
            )
        })
    }
}

/// Opens the backend `spec` asks for; ONNX Runtime failing with a GGUF at hand falls back to
/// the int4 engine, and says why.
pub fn open(spec: &LoadSpec) -> Result<Opened, OpenError> {
    if !spec.wants_ort() {
        return open_cpu(spec);
    }
    let Some(dir) = &spec.onnx else {
        return Err(OpenError::Spec(
            "the ort backend needs an ONNX model folder (model.onnx or --model DIR; `edgellm export-onnx` writes one from a GGUF)".into(),
        ));
    };
    let opened: Result<Box<dyn Backend>, OrtError> = if npu::is_npu_dir(dir) {
        NpuBackend::open(dir, &spec.ort).map(|b| Box::new(b) as Box<dyn Backend>)
    } else {
        OrtBackend::open(dir, &spec.ort).map(|b| Box::new(b) as Box<dyn Backend>)
    };
    match opened {
        Ok(backend) => Ok(Opened {
            backend,
            fallback: None,
            path: dir.clone(),
        }),
        Err(e) if spec.gguf.is_some() => {
            let reason = e.to_string();
            tracing::warn!(
                "ort backend unavailable ({reason}); falling back to the int4 CPU engine"
            );
            let mut opened = open_cpu(spec)?;
            opened.fallback = Some(reason);
            Ok(opened)
        }
        Err(e) => Err(e.into()),
    }
}

/// The int4 engine on the spec's GGUF.
pub fn open_cpu(spec: &LoadSpec) -> Result<Opened, OpenError> {
    let path = spec.gguf()?;
    Ok(Opened {
        backend: Box::new(CpuBackend::open(path, &spec.cpu)?),
        fallback: None,
        path: path.to_path_buf(),
    })
}

/// The memory plan of the backend `spec` will start: ONNX Runtime's when wanted and its model
/// is readable, else the int4 engine's (which a failing ONNX setup falls back to).
pub fn plan(spec: &LoadSpec) -> Result<MemoryPlan, OpenError> {
    let ort_plan = match (&spec.onnx, spec.wants_ort()) {
        (Some(dir), true) if npu::is_npu_dir(dir) => Some(NpuBackend::plan(dir, &spec.ort)),
        (Some(dir), true) => Some(OrtBackend::plan(dir, &spec.ort)),
        _ => None,
    };
    match ort_plan {
        Some(Ok(p)) => Ok(p),
        Some(Err(e)) if spec.gguf.is_none() => Err(e.into()),
        _ => cpu_plan(spec),
    }
}

/// The int4 engine's memory plan on the spec's GGUF, from its header alone.
pub fn cpu_plan(spec: &LoadSpec) -> Result<MemoryPlan, OpenError> {
    let g = Gguf::open(spec.gguf()?).map_err(ModelError::from)?;
    Ok(CpuBackend::plan(&g, &spec.cpu)?)
}
