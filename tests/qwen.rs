//! The second real model, Qwen2.5-Coder-0.5B-Instruct Q4_K_M (`models/fetch.sh
//! qwen2.5-coder-0.5b`), against llama.cpp's reference data in
//! `../shared/reference/qwen2.5-coder-0.5b.json`. A missing model fails these tests.

use std::path::PathBuf;

use edgellm::api::{GenerateRequest, Message, Prompt, SamplingParams};
use edgellm::backend::cpu::CpuOptions;
use edgellm::engine::tokenizer::Tokenizer;
use edgellm::gguf::Gguf;
use edgellm::kernels::KernelKind;

use crate::smollm2::reference;

/// The Qwen file, fetched by `models/fetch.sh qwen2.5-coder-0.5b` (the test setup does).
pub fn qwen_model() -> PathBuf {
    let p = std::env::var_os("EDGELLM_QWEN_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("models/cache/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
        });
    assert!(
        p.is_file(),
        "the Qwen model is missing at {}: run models/fetch.sh qwen2.5-coder-0.5b",
        p.display()
    );
    p
}

/// The file is the one the reference data was made from.
#[test]
fn the_file_is_the_reference_one() {
    let r = reference("qwen2.5-coder-0.5b.json");
    let p = qwen_model();
    let len = std::fs::metadata(&p).expect("stat").len();
    assert_eq!(Some(len), r["model"]["bytes"].as_u64());
    let g = Gguf::open(&p).expect("parses");
    assert_eq!(
        g.get_str("general.architecture").expect("architecture"),
        "qwen2"
    );
}

/// Every tokenizer case of llama.cpp's, id for id (no BOS: the file says add_bos_token false).
#[test]
fn tokenizer_matches_llama_cpp() {
    let g = Gguf::open(&qwen_model()).expect("model parses");
    let tok = Tokenizer::from_gguf(&g, None).expect("tokenizer");
    let r = reference("qwen2.5-coder-0.5b.json");
    let cases = r["tokenize"].as_array().expect("cases");
    assert_eq!(cases.len(), 14);
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let want: Vec<u32> = c["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        assert_eq!(tok.encode(text).expect("encode"), want, "text {text:?}");
    }
}

/// The model's own chat template renders llama.cpp's prompt (with its default system prompt),
/// and the exact path (weights dequantized, f32 math) answers greedily what llama.cpp answers
/// on the F32 copy of the file.
#[test]
fn chat_template_and_greedy_exact_answers() {
    let r = reference("qwen2.5-coder-0.5b.json");
    let opts = CpuOptions {
        n_ctx: 512,
        kernels: Some(KernelKind::Reference),
        ..Default::default()
    };
    let mut engine = edgellm_testkit::cpu_engine(&qwen_model(), &opts).expect("model loads");
    for c in r["greedy"].as_array().expect("cases") {
        let messages: Vec<Message> =
            serde_json::from_value(c["messages"].clone()).expect("messages");
        let prompt = Prompt::Messages(messages);
        assert_eq!(
            engine.prompt_text(&prompt).expect("template"),
            c["prompt"].as_str().expect("prompt"),
        );
        let mut req = GenerateRequest::new(prompt);
        req.max_tokens = c["max_tokens"].as_u64().expect("max_tokens") as usize;
        req.sampling = SamplingParams::greedy();
        let mut streamed = String::new();
        let out = engine.generate(&req, &mut streamed).expect("generate");
        assert_eq!(out.text, c["exact_f32"].as_str().expect("exact_f32"));
    }
}

/// `models/fetch.sh NAME` finds a model by the start of its manifest's name; the six wheels
/// are assembled and the result checked: a file that does not match its sum is an error naming
/// both sums, and leaves nothing behind.
#[test]
fn fetch_by_name_checks_the_assembled_file() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = qwen_model();
    let fetch = |args: &[&str], env: &[(&str, &std::path::Path)]| {
        let mut c = std::process::Command::new("bash");
        c.arg(root.join("models/fetch.sh")).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run fetch.sh")
    };
    let out = fetch(&["qwen2.5-coder-0.5b"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model present"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        model.display().to_string()
    );
    let out = fetch(&["nonesuch"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("smollm2-135m-instruct") && err.contains("qwen2.5-coder-0.5b-instruct"),
        "{err}"
    );

    let dir = crate::common::temp_dir("fetch_qwen_bad_sum");
    let manifest = std::fs::read_to_string(root.join("models/qwen2.5-coder-0.5b-instruct.toml"))
        .expect("manifest");
    let good = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
    assert!(manifest.contains(good));
    std::fs::write(
        dir.join("manifest.toml"),
        manifest.replace(good, &"0".repeat(64)),
    )
    .expect("write manifest");
    let models = dir.join("models");
    let out = fetch(
        &[],
        &[
            ("EDGELLM_MANIFEST", &dir.join("manifest.toml")),
            ("EDGELLM_MODEL_DIR", &models),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad checksum must fail: {err}");
    assert!(
        err.contains("checksum mismatch") && err.contains(good),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&models)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "partial files left: {left:?}");
}

/// llama-perplexity's measure on gpl-3.txt with 512-token chunks: the exact path within 0.2% of
/// llama.cpp's on the F32 copy, the fast path within 1% of llama.cpp's on this file, and the
/// fast path's mean KL divergence against the exact path no worse than llama.cpp's own.
#[test]
fn perplexity_matches_llama_cpp() {
    let r = reference("qwen2.5-coder-0.5b.json");
    let p = &r["perplexity"];
    let fast_ref = p["fast"].as_f64().expect("fast");
    let exact_ref = p["exact"].as_f64().expect("exact");
    let kld_ref = p["llamacpp_fast_vs_exact"]["mean_kld"]
        .as_f64()
        .expect("mean_kld");
    let m = qwen_model();
    let text = crate::smollm2::reference_path("gpl-3.txt");
    let (out, err, code) = crate::common::edgellm_with_env(
        &[
            "perplexity",
            "--model",
            m.to_str().expect("utf-8"),
            text.to_str().expect("utf-8"),
            "--ctx",
            "512",
            "--compare-exact",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let last = out.lines().last().expect("output");
    let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(v["chunks"], p["chunks"]);
    let ppl = v["ppl"].as_f64().expect("ppl");
    let exact = v["ppl_exact"].as_f64().expect("ppl_exact");
    assert!(
        (exact / exact_ref - 1.0).abs() < 0.002,
        "exact ppl {exact} vs llama.cpp's {exact_ref}"
    );
    assert!(
        (ppl / fast_ref - 1.0).abs() < 0.01,
        "fast ppl {ppl} vs llama.cpp's {fast_ref}"
    );
    let kld = v["mean_kld"].as_f64().expect("kld");
    assert!(
        kld <= kld_ref,
        "mean KL divergence {kld} vs llama.cpp's {kld_ref}"
    );
}
