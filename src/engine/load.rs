//! Which backend runs the model, and the fallback to the int4 CPU engine.
//!
//! `cpu` runs a GGUF on this crate's engine. `ort` runs an ONNX folder on ONNX Runtime; when
//! that cannot start (library missing or of the wrong version, every provider failing, a model
//! that will not load) and a GGUF is configured, the int4 engine takes over and the reason is
//! kept for status and logs. `auto` is `ort` when an ONNX folder is configured, else `cpu`.

use std::path::{Path, PathBuf};

use super::{Engine, EngineError};
use crate::backend::cpu::CpuOptions;
use crate::backend::ort::OrtOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Cpu,
    Ort,
    Auto,
}

impl BackendChoice {
    pub fn parse(s: &str) -> Result<BackendChoice, String> {
        match s {
            "cpu" => Ok(BackendChoice::Cpu),
            "ort" => Ok(BackendChoice::Ort),
            "auto" => Ok(BackendChoice::Auto),
            other => Err(format!(
                "{other:?} is not a backend (allowed: cpu, ort, auto)"
            )),
        }
    }
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

/// A path given as "the model": a folder is an ONNX model, a file a GGUF.
pub fn is_onnx_dir(p: &Path) -> bool {
    p.is_dir()
}

impl LoadSpec {
    /// Loads the engine; `Ok((engine, Some(reason)))` when the int4 engine took over from ORT.
    pub fn load(&self) -> Result<(Engine, Option<String>), EngineError> {
        let want_ort = match self.choice {
            BackendChoice::Cpu => false,
            BackendChoice::Ort => true,
            BackendChoice::Auto => self.onnx.is_some(),
        };
        if !want_ort {
            return Ok((self.load_cpu()?, None));
        }
        let Some(dir) = &self.onnx else {
            return Err(EngineError::BadRequest(
                "the ort backend needs an ONNX model folder (model.onnx or --model DIR; `edgellm export-onnx` writes one from a GGUF)".into(),
            ));
        };
        match Engine::load_ort(dir, &self.ort) {
            Ok(e) => Ok((e, None)),
            Err(e) if self.gguf.is_some() => {
                let reason = e.to_string();
                tracing::warn!(
                    "ort backend unavailable ({reason}); falling back to the int4 CPU engine"
                );
                Ok((self.load_cpu()?, Some(reason)))
            }
            Err(e) => Err(e),
        }
    }

    /// The int4 engine on the configured GGUF.
    pub fn load_cpu(&self) -> Result<Engine, EngineError> {
        let Some(path) = &self.gguf else {
            return Err(EngineError::BadRequest(
                "the cpu backend needs a GGUF model (model.path or --model FILE)".into(),
            ));
        };
        Engine::load_cpu(path, &self.cpu)
    }
}
