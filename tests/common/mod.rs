//! Helpers shared by the test modules.

use std::path::PathBuf;

use edgellm::backend::cpu::model::ModelError;
use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::backend::KvType;
use edgellm::gguf::{Bytes, Gguf};
use edgellm::kernels::KernelKind;
use edgellm_testkit::{synth_model, SynthSpec};

/// A synthetic model loaded on the CPU backend, with an f32 KV cache: the tests that compare two ways of computing the same
/// thing (batched and stepwise, slid and recomputed) compare the arithmetic, not f16 rounding.
pub fn synth_backend(spec: &SynthSpec, kernels: Option<KernelKind>, threads: usize) -> CpuBackend {
    let opts = CpuOptions {
        n_ctx: 128,
        threads,
        kernels,
        max_batch: 16,
        kv_type: KvType::F32,
        logit_rows: 0,
        repack: true,
    };
    synth_backend_with(spec, &opts).expect("synthetic model loads")
}

/// A synthetic model loaded with `opts`.
pub fn synth_backend_with(spec: &SynthSpec, opts: &CpuOptions) -> Result<CpuBackend, ModelError> {
    let g = Gguf::parse(Bytes::from_vec(synth_model(spec))).expect("synthetic model parses");
    CpuBackend::load(g, opts)
}

/// A fresh directory under the target dir (removed first if it exists).
pub fn temp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Largest |a - b| relative to the largest |b|.
pub fn rel_max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Kernel sets this CPU can run, other than the exact reference.
pub fn fast_kernels() -> Vec<KernelKind> {
    KernelKind::ALL
        .into_iter()
        .filter(|k| *k != KernelKind::Reference && k.available())
        .collect()
}

/// The default model (SmolLM2-135M-Instruct Q4_1), fetched by `models/fetch.sh`.
pub fn default_model() -> PathBuf {
    cached_model(
        "EDGELLM_MODEL",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "models/fetch.sh",
    )
}

/// A real model: the file `env` names, else `file` in `models/cache/`, put there by `fetch`.
pub fn cached_model(env: &str, file: &str, fetch: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models/cache")
            .join(file)
    });
    assert!(
        p.is_file(),
        "the model is missing at {}: run {fetch}",
        p.display()
    );
    p
}

/// Runs the `edgellm` binary with `args` and extra environment: stdout, stderr, exit code.
pub fn edgellm_with_env(args: &[&str], env: &[(&str, &str)]) -> (String, String, i32) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgellm"));
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run edgellm");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}
