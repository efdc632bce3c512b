//! `edgellm quantize --calibrate`: GPTQ against the int4 engine's activations, on a synthetic
//! model (every type, the error it minimises, determinism, the written file) and on the real
//! default model.

use std::path::Path;

use serde_json::Value as Json;

use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::backend::Backend;
use edgellm::convert::gptq::{input_site, Hessians};
use edgellm::convert::quantize::{
    collect, requantize, Calibration, KEY_METHOD, KEY_SHA256, KEY_TOKENS,
};
use edgellm::gguf::{Bytes, Gguf, Value};
use edgellm::kernels::quant::{dequantize_row, GgmlType};
use edgellm_testkit::{synth_model, SynthSpec};

use crate::common::{default_model, edgellm_with_env, temp_dir};

const WORDS: &str = "the quick brown fox jumps over the lazy dog while seven wise owls watch \
                     from an old oak, counting stars and naming rivers after forgotten kings. ";

/// Each calibrated matrix's activation-weighted error `Σ_rows eᵀ H e` in `file`, by name.
fn errors(original: &Gguf, file: &Gguf, hs: &Hessians, n_layer: usize) -> Vec<(String, f64)> {
    let tied = original.tensor("output.weight").is_none();
    let mut out = Vec::new();
    for t in &file.tensors {
        let Some(site) = input_site(&t.name, n_layer, tied) else {
            continue;
        };
        let Some(h) = hs.get(&site) else { continue };
        let o = original.tensor(&t.name).expect("same tensors");
        let n = t.dims[0] as usize;
        let (a, b) = (original.tensor_data(o), file.tensor_data(t));
        let (ra, rb) = (o.ty.row_bytes(n), t.ty.row_bytes(n));
        let mut e = Vec::new();
        let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
        for (pa, pb) in a.chunks_exact(ra).zip(b.chunks_exact(rb)) {
            dequantize_row(o.ty, pa, &mut x);
            dequantize_row(t.ty, pb, &mut y);
            e.extend(x.iter().zip(&y).map(|(p, q)| p - q));
        }
        out.push((t.name.clone(), h.errors(&e).iter().sum()));
    }
    out
}

#[test]
fn calibrated_quantization_never_loses_to_rounding_on_a_synthetic_model() {
    let dir = temp_dir("quantize-synth");
    // 256 columns so that the K-quants apply; a separate head, so that it is calibrated too.
    let spec = SynthSpec {
        dim: 256,
        ffn: 512,
        n_head: 4,
        n_kv_head: 2,
        separate_output: true,
        // f16 weights: every target type is a conversion.
        wtype: GgmlType::F16,
        seed: 3,
        ..Default::default()
    };
    let path = dir.join("m.gguf");
    std::fs::write(&path, synth_model(&spec)).expect("write model");
    let original = Gguf::open(&path).expect("open");
    let text = WORDS.repeat(12);
    let (hs, tokens) = collect(&path, &text, 64, 4096, true, &mut |_, _| {}).expect("calibrate");
    assert!(tokens > 300, "{tokens}");
    // Every matrix input of every layer, and the head's.
    assert_eq!(hs.len(), 4 * spec.n_layer + 1, "{:?}", hs.keys());
    let calibration = Calibration {
        file: "words.txt".into(),
        sha256: "ab".repeat(32),
        tokens,
        window: 64,
    };
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ] {
        let (bytes, report) = requantize(&original, ty, Some((&hs, &calibration)), &mut |_, _| {});
        let (plain, _) = requantize(&original, ty, None, &mut |_, _| {});
        // 7 matrices a layer and the head, all calibrated.
        assert_eq!(report.calibrated, 7 * spec.n_layer + 1, "{}", ty.name());
        assert!(
            report.error < report.plain_error,
            "{}: {report:?}",
            ty.name()
        );
        // Deterministic.
        let (again, _) = requantize(&original, ty, Some((&hs, &calibration)), &mut |_, _| {});
        assert!(again == bytes, "{}: two runs differ", ty.name());
        // Through the writer and back: the types, the record of the calibration.
        let cal = Gguf::parse(Bytes::from_vec(bytes)).expect("calibrated file parses");
        let rtn = Gguf::parse(Bytes::from_vec(plain)).expect("plain file parses");
        for t in &cal.tensors {
            let o = original.tensor(&t.name).expect("same tensors");
            assert_eq!(t.dims, o.dims);
            let want = if t.dims.len() == 2 && o.ty != GgmlType::F32 {
                ty
            } else {
                o.ty
            };
            assert_eq!(t.ty, want, "{}: {}", ty.name(), t.name);
        }
        assert_eq!(
            cal.metadata.get(KEY_METHOD),
            Some(&Value::String("gptq".into()))
        );
        assert_eq!(
            cal.metadata.get(KEY_SHA256),
            Some(&Value::String("ab".repeat(32)))
        );
        assert_eq!(
            cal.metadata.get(KEY_TOKENS),
            Some(&Value::U32(tokens as u32))
        );
        assert!(!rtn.metadata.contains_key(KEY_METHOD));
        // Matrix by matrix, the activation-weighted error on the calibration data is never
        // larger than rounding's, and smaller over the model.
        let (ec, ep) = (
            errors(&original, &cal, &hs, spec.n_layer),
            errors(&original, &rtn, &hs, spec.n_layer),
        );
        assert_eq!(ec.len(), 7 * spec.n_layer + 1);
        for ((name, c), (_, p)) in ec.iter().zip(&ep) {
            assert!(c <= p, "{}: {name}: {c} > {p}", ty.name());
        }
        let (sc, sp): (f64, f64) = (ec.iter().map(|e| e.1).sum(), ep.iter().map(|e| e.1).sum());
        assert!(sc < 0.9 * sp, "{}: {sc} vs {sp}", ty.name());
        assert!((sc - report.error).abs() <= 1e-3 * sc, "{}", ty.name());
        // The engine runs it.
        let mut cpu = CpuBackend::load(
            cal,
            &CpuOptions {
                n_ctx: 64,
                max_batch: 16,
                ..Default::default()
            },
        )
        .expect("the calibrated file loads");
        let logits = cpu.forward(&[1, 70, 80, 90], 0, false).expect("forward");
        assert!(logits.iter().all(|v| v.is_finite()), "{}", ty.name());
    }
}

fn quantize(input: &Path, out: &Path, extra: &[&str]) -> Json {
    let mut args = vec![
        "quantize",
        input.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
        "--type",
        "q4_0",
    ];
    args.extend_from_slice(extra);
    let (stdout, stderr, code) = edgellm_with_env(&args, &[]);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.trim()).expect("one JSON report")
}

fn perplexity(model: &Path, text: &Path) -> f64 {
    let (stdout, stderr, code) = edgellm_with_env(
        &[
            "perplexity",
            "--model",
            model.to_str().expect("utf-8 path"),
            "--ctx",
            "256",
            "--chunks",
            "6",
            text.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let j: Json = serde_json::from_str(stdout.trim()).expect("JSON");
    j["ppl"].as_f64().expect("ppl")
}

#[test]
fn calibrated_q4_0_of_the_default_model_beats_rounding_on_other_text() {
    let model = default_model();
    let dir = temp_dir("quantize-real");
    let reference = crate::smollm2::reference_path("calib-licences.txt");
    // Calibrate on the start of the licences, measure on the GPL (a different text).
    let calib = dir.join("calib.txt");
    let text = std::fs::read_to_string(&reference).expect("calibration text");
    std::fs::write(&calib, &text[..12_000]).expect("write");
    let (gptq, rtn) = (dir.join("gptq.gguf"), dir.join("rtn.gguf"));
    let j = quantize(
        &model,
        &gptq,
        &[
            "--calibrate",
            calib.to_str().expect("utf-8"),
            "--calib-tokens",
            "2048",
        ],
    );
    assert_eq!(j["method"], "gptq");
    let tokens = j["calibration"]["tokens"].as_u64().expect("tokens");
    assert!((1000..=2048).contains(&tokens), "{j}");
    let r = &j["report"];
    assert_eq!(r["calibrated"], 210, "{j}");
    assert!(
        r["error"].as_f64().expect("error") < 0.5 * r["plain_error"].as_f64().expect("plain"),
        "{j}"
    );
    let plain = quantize(&model, &rtn, &[]);
    assert_eq!(plain["method"], "round-to-nearest");
    let g = Gguf::open(&gptq).expect("open");
    assert_eq!(
        g.metadata.get(KEY_SHA256),
        Some(&Value::String(
            edgellm::models::sha256_file(&calib, |_| {}).expect("hash")
        ))
    );
    let gpl = crate::smollm2::reference_path("gpl-3.txt");
    let (p_gptq, p_rtn, p_orig) = (
        perplexity(&gptq, &gpl),
        perplexity(&rtn, &gpl),
        perplexity(&model, &gpl),
    );
    // Rounding loses about a quarter (23.1 against 18.4 on the whole file at ctx 512); GPTQ
    // must win back at least half of that.
    assert!(p_rtn > p_orig * 1.08, "rtn {p_rtn} vs {p_orig}");
    assert!(
        p_gptq - p_orig < 0.5 * (p_rtn - p_orig),
        "gptq {p_gptq}, rtn {p_rtn}, original {p_orig}"
    );
}

#[test]
fn a_bad_calibration_text_is_refused_and_writes_nothing() {
    let dir = temp_dir("quantize-bad-text");
    let model = dir.join("m.gguf");
    std::fs::write(&model, synth_model(&SynthSpec::default())).expect("write model");
    let out = dir.join("out.gguf");
    let run = |text: &Path| {
        edgellm_with_env(
            &[
                "quantize",
                model.to_str().expect("utf-8"),
                out.to_str().expect("utf-8"),
                "--type",
                "q4_0",
                "--calibrate",
                text.to_str().expect("utf-8"),
            ],
            &[],
        )
    };
    let missing = dir.join("missing.txt");
    let (_, stderr, code) = run(&missing);
    assert_ne!(code, 0);
    assert!(stderr.contains("missing.txt"), "{stderr}");
    let short = dir.join("short.txt");
    std::fs::write(&short, "hi").expect("write");
    let (_, stderr, code) = run(&short);
    assert_ne!(code, 0);
    assert!(stderr.contains("at least 16"), "{stderr}");
    let binary = dir.join("binary.txt");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80]).expect("write");
    let (_, stderr, code) = run(&binary);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not UTF-8"), "{stderr}");
    assert!(!out.exists() && !out.with_extension("part").exists());
}
