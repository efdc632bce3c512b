//! Malformed GGUF files: each is a typed error that names what is wrong, never a panic.

use edgellm::backend::cpu::model::ModelError;
use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::convert::writer::GgufWriter;
use edgellm::engine::sampler::Rng;
use edgellm::gguf::{Bytes, Gguf, GgufError, Value};
use edgellm::kernels::quant::GgmlType;
use edgellm_testkit::{synth_model, SynthSpec};

fn parse(b: Vec<u8>) -> Result<Gguf, GgufError> {
    Gguf::parse(Bytes::from_vec(b))
}

/// A hand-built file: header counts as given, then raw metadata, tensor infos and data.
fn raw(version: u32, n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&n_tensors.to_le_bytes());
    v.extend_from_slice(&n_kv.to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn s(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// One tensor info: name, dims, type, offset.
fn tinfo(out: &mut Vec<u8>, name: &str, dims: &[u64], ty: u32, offset: u64) {
    s(out, name);
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
}

/// A file with one F32 tensor of `n` elements at `offset`, followed by `data_len` bytes.
fn one_tensor(dims: &[u64], ty: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut body = Vec::new();
    tinfo(&mut body, "t", dims, ty, offset);
    let mut v = raw(3, 1, 0, &body);
    let start = v.len().div_ceil(32) * 32;
    v.resize(start + data_len, 0);
    v
}

#[test]
fn valid_file_parses_and_tensors_stay_in_the_mapping() {
    let dir = crate::common::temp_dir("gguf_valid");
    let path = dir.join("m.gguf");
    std::fs::write(&path, synth_model(&SynthSpec::default())).expect("write");
    let g = Gguf::open(&path).expect("parses");
    assert!(
        g.is_mapped(),
        "weights must be memory-mapped, not read into memory"
    );
    let t = g.tensor("blk.0.attn_q.weight").expect("tensor");
    let data = g.tensor_data(t);
    let base = g.bytes().as_ptr() as usize;
    let p = data.as_ptr() as usize;
    assert!(p >= base && p + data.len() <= base + g.bytes().len());
    assert_eq!(t.offset % 32, 0);
}

#[test]
fn wrong_magic() {
    let mut b = synth_model(&SynthSpec::default());
    b[..4].copy_from_slice(b"GGML");
    let e = parse(b).unwrap_err();
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("GGUF"));
}

#[test]
fn unsupported_versions() {
    for v in [0u32, 1, 4, u32::MAX] {
        let e = parse(raw(v, 0, 0, &[])).unwrap_err();
        assert!(matches!(e, GgufError::BadVersion(x) if x == v), "{e}");
    }
    assert!(parse(raw(2, 0, 0, &[])).is_ok());
}

#[test]
fn truncated_anywhere_is_an_error() {
    let full = synth_model(&SynthSpec::default());
    assert!(parse(full.clone()).is_ok());
    let mut lens: Vec<usize> = (0..300).collect();
    lens.extend((300..full.len()).step_by(97));
    lens.push(full.len() - 1);
    for n in lens {
        let r = parse(full[..n].to_vec());
        assert!(
            r.is_err(),
            "a file cut at {n} of {} bytes parsed",
            full.len()
        );
    }
    // Cut inside the tensor data: the header is whole, the last tensor is not.
    let e = parse(full[..full.len() - 1].to_vec()).unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
}

#[test]
fn absurd_counts_and_lengths() {
    let e = parse(raw(3, u64::MAX, 0, &[])).unwrap_err();
    assert!(
        matches!(e, GgufError::Absurd { ref what, .. } if what == "tensor count"),
        "{e}"
    );
    let e = parse(raw(3, 0, 1 << 50, &[])).unwrap_err();
    assert!(
        matches!(e, GgufError::Absurd { ref what, .. } if what == "metadata count"),
        "{e}"
    );

    // A key whose length is 2^60.
    let mut body = Vec::new();
    body.extend_from_slice(&(1u64 << 60).to_le_bytes());
    body.extend_from_slice(&[0u8; 64]);
    let e = parse(raw(3, 0, 1, &body)).unwrap_err();
    assert!(matches!(e, GgufError::Absurd { .. }), "{e}");

    // An array of 2^40 u32 in a small file.
    let mut body = Vec::new();
    s(&mut body, "a");
    body.extend_from_slice(&9u32.to_le_bytes());
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    body.extend_from_slice(&[0u8; 64]);
    let e = parse(raw(3, 0, 1, &body)).unwrap_err();
    assert!(matches!(e, GgufError::Absurd { .. }), "{e}");
    assert!(e.to_string().contains("array length"), "{e}");

    // Arrays nested deeper than the format allows.
    let mut body = Vec::new();
    s(&mut body, "deep");
    body.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..3 {
        body.extend_from_slice(&9u32.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
    }
    body.extend_from_slice(&[0u8; 32]);
    assert!(parse(raw(3, 0, 1, &body)).is_err());
}

#[test]
fn unknown_value_type_and_bad_bool() {
    let mut body = Vec::new();
    s(&mut body, "k");
    body.extend_from_slice(&99u32.to_le_bytes());
    body.extend_from_slice(&[0u8; 8]);
    let e = parse(raw(3, 0, 1, &body)).unwrap_err();
    assert!(matches!(e, GgufError::BadValueType { ty: 99, .. }), "{e}");

    let mut body = Vec::new();
    s(&mut body, "flag");
    body.extend_from_slice(&7u32.to_le_bytes());
    body.push(2);
    assert!(parse(raw(3, 0, 1, &body)).is_err());
}

#[test]
fn invalid_utf8_key() {
    let mut body = Vec::new();
    body.extend_from_slice(&2u64.to_le_bytes());
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    let e = parse(raw(3, 0, 1, &body)).unwrap_err();
    assert!(matches!(e, GgufError::BadUtf8 { .. }), "{e}");
}

#[test]
fn tensor_info_errors() {
    // Unknown type.
    let e = parse(one_tensor(&[8], 99, 0, 64)).unwrap_err();
    assert!(
        matches!(e, GgufError::UnknownTensorType { ty: 99, .. }),
        "{e}"
    );
    // Data past the end.
    let e = parse(one_tensor(&[64], 0, 0, 100)).unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    // Offset past the end, and an offset that overflows.
    let e = parse(one_tensor(&[8], 0, 1 << 20, 64)).unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    let e = parse(one_tensor(&[8], 0, u64::MAX - 31, 64)).unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    // Offset not aligned.
    let e = parse(one_tensor(&[8], 0, 4, 64)).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::Misaligned {
                offset: 4,
                align: 32,
                ..
            }
        ),
        "{e}"
    );
    // Dimensions: none, too many, zero, overflowing.
    for dims in [
        &[][..],
        &[1, 1, 1, 1, 1][..],
        &[0, 4][..],
        &[1 << 40, 1 << 40][..],
    ] {
        let e = parse(one_tensor(dims, 0, 0, 64)).unwrap_err();
        assert!(matches!(e, GgufError::BadTensor { .. }), "{dims:?}: {e}");
    }
    // Row length not a multiple of the block size (Q4_0 blocks hold 32).
    let e = parse(one_tensor(&[31], 2, 0, 64)).unwrap_err();
    assert!(e.to_string().contains("block size"), "{e}");
    assert!(parse(one_tensor(&[32], 2, 0, 64)).is_ok());
}

#[test]
fn duplicate_names_and_bad_alignment() {
    let mut body = Vec::new();
    tinfo(&mut body, "t", &[8], 0, 0);
    tinfo(&mut body, "t", &[8], 0, 32);
    let mut v = raw(3, 2, 0, &body);
    v.resize(v.len().div_ceil(32) * 32 + 64, 0);
    let e = parse(v).unwrap_err();
    assert!(
        matches!(e, GgufError::Duplicate { what: "tensor", .. }),
        "{e}"
    );

    let mut w = GgufWriter::new();
    w.kv_u32("general.alignment", 3);
    let e = parse(w.to_bytes()).unwrap_err();
    assert!(matches!(e, GgufError::BadAlignment(3)), "{e}");

    let mut w = GgufWriter::new();
    w.kv_u32("x", 1).kv_u32("x", 2);
    let e = parse(w.to_bytes()).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::Duplicate {
                what: "metadata key",
                ..
            }
        ),
        "{e}"
    );
}

/// Random corruption of the header never panics the reader or the model loader.
#[test]
fn random_corruption_never_panics() {
    let full = synth_model(&SynthSpec::default());
    let header_end = 6000.min(full.len());
    let mut rng = Rng::new(99);
    let mut errors = 0;
    for _ in 0..1500 {
        let mut b = full.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = (rng.next_u64() as usize) % header_end;
            b[i] = rng.next_u64() as u8;
        }
        match parse(b) {
            Err(_) => errors += 1,
            Ok(g) => {
                let _ = CpuBackend::load(
                    g,
                    &CpuOptions {
                        n_ctx: 16,
                        threads: 1,
                        ..Default::default()
                    },
                );
            }
        }
    }
    assert!(errors > 0, "corruption was never detected");
}

fn load(bytes: Vec<u8>) -> Result<CpuBackend, ModelError> {
    CpuBackend::load(
        parse(bytes).expect("parses"),
        &CpuOptions {
            n_ctx: 16,
            threads: 1,
            ..Default::default()
        },
    )
}

/// Rewrites a synthetic model with one metadata value or tensor changed.
fn synth_with(f: impl Fn(&mut Gguf) -> GgufWriter) -> Vec<u8> {
    let mut g = parse(synth_model(&SynthSpec::default())).expect("parses");
    f(&mut g).to_bytes()
}

fn rewrite(
    g: &Gguf,
    kv: &[(&str, Option<Value>)],
    skip_tensor: Option<&str>,
    retype: Option<(&str, GgmlType)>,
) -> GgufWriter {
    let mut w = GgufWriter::new();
    for k in &g.keys {
        match kv.iter().find(|(name, _)| name == k) {
            Some((_, Some(v))) => {
                w.kv(k, v.clone());
            }
            Some((_, None)) => {}
            None => {
                w.kv(k, g.metadata[k].clone());
            }
        }
    }
    for (name, v) in kv {
        if !g.keys.iter().any(|k| k == name) {
            if let Some(v) = v {
                w.kv(name, v.clone());
            }
        }
    }
    for t in &g.tensors {
        if Some(t.name.as_str()) == skip_tensor {
            continue;
        }
        match retype {
            Some((name, ty)) if name == t.name => {
                let n = ty.row_bytes(t.dims[0] as usize) * (t.n_elements() / t.dims[0]) as usize;
                w.tensor(&t.name, &t.dims, ty, vec![0u8; n]);
            }
            _ => {
                w.tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
            }
        }
    }
    w
}

#[test]
fn model_level_errors_name_the_problem() {
    let b = synth_with(|g| {
        rewrite(
            g,
            &[("general.architecture", Some(Value::String("gptj".into())))],
            None,
            None,
        )
    });
    let e = load(b).unwrap_err();
    assert!(
        matches!(e, ModelError::UnsupportedArch(ref a) if a == "gptj"),
        "{e}"
    );

    let b = synth_with(|g| rewrite(g, &[], Some("blk.1.ffn_up.weight"), None));
    let e = load(b).unwrap_err();
    assert!(e.to_string().contains("blk.1.ffn_up.weight"), "{e}");

    let b = synth_with(|g| {
        rewrite(
            g,
            &[("llama.attention.head_count_kv", Some(Value::U32(3)))],
            None,
            None,
        )
    });
    let e = load(b).unwrap_err();
    assert!(matches!(e, ModelError::BadHyper { .. }), "{e}");
    assert!(e.to_string().contains("head_count_kv"), "{e}");

    let b = synth_with(|g| {
        rewrite(
            g,
            &[("llama.embedding_length", Some(Value::U32(96)))],
            None,
            None,
        )
    });
    let e = load(b).unwrap_err();
    assert!(matches!(e, ModelError::BadShape { .. }), "{e}");

    let b = synth_with(|g| rewrite(g, &[("llama.block_count", None)], None, None));
    let e = load(b).unwrap_err();
    assert!(e.to_string().contains("llama.block_count"), "{e}");

    let b = synth_with(|g| {
        rewrite(
            g,
            &[],
            None,
            // A type no model file stores its weights in, which the engine does not compute.
            Some(("blk.0.ffn_gate.weight", GgmlType::Q8_1)),
        )
    });
    let e = load(b).unwrap_err();
    assert!(
        matches!(e, ModelError::UnsupportedType { ty: "Q8_1", .. }),
        "{e}"
    );

    let b = synth_with(|g| {
        rewrite(
            g,
            &[],
            None,
            Some(("blk.0.attn_norm.weight", GgmlType::F16)),
        )
    });
    let e = load(b).unwrap_err();
    assert!(matches!(e, ModelError::NotF32 { .. }), "{e}");
}

/// Peak resident memory (KiB) of `edgellm args…`, from the rusage of that one child, and its
/// stderr and exit code.
fn peak_rss_kib(args: &[&str]) -> (u64, String, i32) {
    let script = r#"
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
sys.stderr.buffer.write(p.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, env!("CARGO_BIN_EXE_edgellm")])
        .args(args)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut it = stdout.split_whitespace();
    let rss = it.next().and_then(|v| v.parse().ok()).expect("maxrss");
    let code = it.next().and_then(|v| v.parse().ok()).expect("exit code");
    (rss, String::from_utf8_lossy(&out.stderr).into_owned(), code)
}

/// An array of one-byte values whose count is the rest of the file (64 MiB) would take 2 GiB
/// as values: it is refused after a few MiB, under `info`, `tokenize` and `serve --check`, with
/// peak memory within a few MiB of loading a good model, naming the file.
#[test]
fn a_crafted_array_fails_fast_within_a_few_mib() {
    let dir = crate::common::temp_dir("gguf_crafted");
    let good = dir.join("good.gguf");
    std::fs::write(&good, synth_model(&SynthSpec::default())).expect("write");
    let mut body = Vec::new();
    s(&mut body, "tokenizer.ggml.token_type");
    body.extend_from_slice(&9u32.to_le_bytes()); // array
    body.extend_from_slice(&0u32.to_le_bytes()); // of u8
    let rest = 64u64 << 20;
    body.extend_from_slice(&rest.to_le_bytes());
    let mut crafted = raw(3, 0, 1, &body);
    crafted.resize(crafted.len() + rest as usize, 7);
    let bad = dir.join("crafted.gguf");
    std::fs::write(&bad, crafted).expect("write");
    let (good_rss, err, code) = peak_rss_kib(&["info", "--model", &good.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    for cmd in [
        &["info", "--model"][..],
        &["tokenize", "--model"],
        &["serve", "--check", "--model"],
    ] {
        let mut args: Vec<&str> = cmd.to_vec();
        let p = bad.display().to_string();
        args.push(&p);
        if cmd[0] == "tokenize" {
            args.push("hello");
        }
        let t = std::time::Instant::now();
        let (rss, err, code) = peak_rss_kib(&args);
        assert_ne!(code, 0, "{cmd:?}: {err}");
        assert!(
            err.contains("crafted.gguf"),
            "{cmd:?} names the file: {err}"
        );
        assert!(err.contains("metadata memory"), "{cmd:?}: {err}");
        assert!(
            rss < good_rss + 8 * 1024,
            "{cmd:?}: peak {rss} KiB against {good_rss} KiB for a good model"
        );
        eprintln!(
            "{cmd:?}: refused in {:?}, peak {rss} KiB (good: {good_rss} KiB)",
            t.elapsed()
        );
    }
}
