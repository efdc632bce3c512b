//! A synthetic model through the whole engine: the forward pass (batched against token by token,
//! fast against exact, llama and qwen2), the tokenizer and template, and generation.

use edgellm::api::Message;
use edgellm::api::SamplingParams;
use edgellm::api::{Completion, FinishReason, GenerateRequest, Prompt, SessionRef};
use edgellm::backend::Backend;
use edgellm::engine::chat::ChatTemplate;
use edgellm::engine::perplexity::perplexity;
use edgellm::engine::tokenizer::Tokenizer;
use edgellm::engine::{Engine, EngineError};
use edgellm::gguf::{Bytes, Gguf};
use edgellm::kernels::quant::GgmlType;
use edgellm::kernels::{KernelKind, Kernels};
use edgellm_testkit::{synth_model, SynthSpec};

use crate::common::{rel_max_diff, synth_backend, synth_backend_with};
use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::backend::KvType;

/// Fast path (8-bit activations) against exact f32 logits of the same weights.
const FAST_VS_EXACT: f32 = 0.05;

fn tokens() -> Vec<u32> {
    (0..23).map(|i| 3 + (i * 37 % 256) as u32).collect()
}

/// Logits of each position, one token per forward call.
fn stepwise(b: &mut dyn Backend, toks: &[u32]) -> Vec<f32> {
    let mut out = Vec::new();
    b.reset();
    for (i, &t) in toks.iter().enumerate() {
        out.extend_from_slice(b.forward(&[t], i, false).expect("forward"));
    }
    out
}

/// Logits of each position from batched calls (chunks of `chunk`).
fn batched(b: &mut dyn Backend, toks: &[u32], chunk: usize) -> Vec<f32> {
    let mut out = Vec::new();
    b.reset();
    let mut pos = 0;
    for part in toks.chunks(chunk) {
        out.extend_from_slice(b.forward(part, pos, true).expect("forward"));
        pos += part.len();
    }
    out
}

#[test]
fn batched_forward_equals_token_by_token() {
    for arch in ["llama", "qwen2"] {
        for k in [KernelKind::Reference, KernelKind::best()] {
            let spec = SynthSpec {
                arch,
                ..Default::default()
            };
            let mut b = synth_backend(&spec, Some(k), 2);
            let toks = tokens();
            let a = stepwise(&mut b, &toks);
            let c = batched(&mut b, &toks, 7);
            let d = rel_max_diff(&c, &a);
            assert!(d < 1e-4, "{arch} {}: batched differs by {d}", k.name());
        }
    }
}

#[test]
fn fast_path_close_to_exact_for_every_weight_type() {
    for (wtype, embd) in [
        (GgmlType::Q4_1, GgmlType::Q8_0),
        (GgmlType::Q4_0, GgmlType::Q4_0),
        (GgmlType::Q5_0, GgmlType::Q8_0),
        (GgmlType::Q5_1, GgmlType::Q5K),
        (GgmlType::Q8_0, GgmlType::F16),
        (GgmlType::Q4K, GgmlType::Q6K),
        (GgmlType::Q5K, GgmlType::Q5_1),
        (GgmlType::Q6K, GgmlType::Q4K),
        (GgmlType::F16, GgmlType::F32),
        (GgmlType::F32, GgmlType::Q8_0),
    ] {
        let spec = SynthSpec {
            wtype,
            embd_type: embd,
            separate_output: wtype == GgmlType::Q8_0,
            dim: 256,
            n_head: 4,
            ffn: 512,
            ..Default::default()
        };
        let toks = tokens();
        let mut exact = synth_backend(&spec, Some(KernelKind::Reference), 1);
        let mut fast = synth_backend(&spec, None, 2);
        let e = batched(&mut exact, &toks, 16);
        let f = batched(&mut fast, &toks, 16);
        let d = rel_max_diff(&f, &e);
        assert!(d < FAST_VS_EXACT, "{}: fast vs exact {d}", wtype.name());
        assert!(e.iter().all(|v| v.is_finite()));
    }
}

/// Repacking the matrices into eight-row groups at load (x86) changes their layout, not what
/// the model computes: for every packable type, with tied embeddings packed too (their rows then
/// read back from the groups), on every kernel set, against the same set with the weights left
/// in place. The products agree to float rounding (`kernels::tests::packed_tiles_match_twin`),
/// but a last-bit difference can round one 8-bit activation the other way, which this random
/// model carries into every later logit at the size of the 8-bit rounding itself: the logits
/// are compared within that, and garbage (a row or a group out of place) is far outside it.
#[test]
fn repacked_weights_give_the_same_logits() {
    for (wtype, embd) in [
        (GgmlType::Q4_0, GgmlType::Q4_0),
        (GgmlType::Q4_1, GgmlType::Q5_1),
        (GgmlType::Q5_0, GgmlType::Q8_0),
        (GgmlType::Q5_1, GgmlType::Q4_1),
        (GgmlType::Q8_0, GgmlType::Q5_0),
    ] {
        let spec = SynthSpec {
            wtype,
            embd_type: embd,
            dim: 128,
            ffn: 256,
            min_vocab: 264,
            ..Default::default()
        };
        let toks = tokens();
        for k in crate::common::fast_kernels() {
            let opts = |repack| CpuOptions {
                n_ctx: 128,
                threads: 2,
                kernels: Some(k),
                max_batch: 16,
                kv_type: KvType::F32,
                logit_rows: 0,
                repack,
            };
            let mut packed = synth_backend_with(&spec, &opts(true)).expect("loads");
            let mut plain = synth_backend_with(&spec, &opts(false)).expect("loads");
            // Without an engine to finish loading, the first step repacks.
            assert_eq!(packed.info().repacked_matrices, 0);
            let p = batched(&mut packed, &toks, 16);
            let q = batched(&mut plain, &toks, 16);
            let packs = Kernels::new(k).expect("available").packs;
            // 2 layers × 7 matrices, and the tied output.
            let want = if packs { 15 } else { 0 };
            assert_eq!(
                packed.info().repacked_matrices,
                want,
                "{} {}",
                k.name(),
                wtype.name()
            );
            assert_eq!(plain.info().repacked_matrices, 0);
            let d = rel_max_diff(&p, &q);
            assert!(
                d < FAST_VS_EXACT,
                "{} {}: packed vs in place {d}",
                k.name(),
                wtype.name()
            );
            let p1 = batched(&mut packed, &toks, 1);
            let d1 = rel_max_diff(&p1, &q);
            assert!(
                d1 < FAST_VS_EXACT,
                "{} {}: packed one token at a time {d1}",
                k.name(),
                wtype.name()
            );
        }
    }
}

#[test]
fn every_kernel_set_agrees() {
    let spec = SynthSpec::default();
    let toks = tokens();
    let mut base = synth_backend(&spec, Some(KernelKind::Scalar), 1);
    let want = batched(&mut base, &toks, 16);
    for k in crate::common::fast_kernels() {
        let mut b = synth_backend(&spec, Some(k), 2);
        let got = batched(&mut b, &toks, 16);
        let d = rel_max_diff(&got, &want);
        assert!(d < 1e-4, "{} differs from scalar by {d}", k.name());
    }
}

/// Attention over hundreds of positions: one token at a time, each token's positions are cut
/// into pieces spread over the threads and merged; in a batch each token is one piece. Both
/// give the same logits, with f32 and q8_0 caches, on every fast kernel set (the exact mode
/// never cuts). f32 weights keep the activations in f32, so that nothing but the attention's
/// summation order differs (8-bit activations would let a last-bit difference round one
/// activation the other way, and carry it to every later position through the cache).
#[test]
fn attention_in_pieces_equals_one_pass() {
    let spec = SynthSpec {
        dim: 128,
        n_head: 4,
        n_kv_head: 2,
        ctx: 512,
        wtype: GgmlType::F32,
        embd_type: GgmlType::F32,
        ..Default::default()
    };
    let toks: Vec<u32> = (0..300).map(|i| 3 + (i * 37 % 250) as u32).collect();
    for kv_type in [KvType::F32, KvType::F16, KvType::Q8_0] {
        for k in crate::common::fast_kernels() {
            let opts = CpuOptions {
                n_ctx: 512,
                threads: 2,
                kernels: Some(k),
                max_batch: 64,
                kv_type,
                logit_rows: 0,
                repack: true,
            };
            let mut b = synth_backend_with(&spec, &opts).expect("loads");
            let one = batched(&mut b, &toks, 64);
            let pieces = stepwise(&mut b, &toks);
            let vocab = one.len() / toks.len();
            let diffs: Vec<f32> = (0..toks.len())
                .map(|t| {
                    let r = t * vocab..(t + 1) * vocab;
                    rel_max_diff(&pieces[r.clone()], &one[r])
                })
                .collect();
            let max = diffs.iter().fold(0f32, |m, &d| m.max(d));
            // With a q8_0 cache the query head is quantized to 8 bits: a last-bit difference
            // before it can round one of its values the other way (measured: up to 9e-5 on
            // NEON, 2e-6 otherwise). A wrong merge moves every position past the first piece
            // (by 1.13 when the rescale is dropped).
            let bound = match kv_type {
                KvType::F32 | KvType::F16 => 1e-4,
                KvType::Q8_0 => 1e-3,
            };
            assert!(
                max < bound,
                "{} {}: pieces differ from one pass by {max}",
                k.name(),
                kv_type.name()
            );
        }
    }
}

#[test]
fn qwen2_biases_are_applied() {
    let spec = SynthSpec {
        arch: "qwen2",
        ..Default::default()
    };
    let mut with = synth_backend(&spec, Some(KernelKind::Reference), 1);
    let llama = SynthSpec {
        arch: "llama",
        ..Default::default()
    };
    let mut without = synth_backend(&llama, Some(KernelKind::Reference), 1);
    let a = batched(&mut with, &tokens(), 16);
    let b = batched(&mut without, &tokens(), 16);
    // Same seed and shapes: only the biases (and RoPE style) differ.
    assert!(rel_max_diff(&a, &b) > 1e-3);
}

#[test]
fn backend_rejects_bad_calls() {
    let mut b = synth_backend(&SynthSpec::default(), None, 1);
    let n_ctx = b.n_ctx();
    assert!(b.forward(&[], 0, false).is_err());
    assert!(b.forward(&[100_000], 0, false).is_err());
    assert!(b.forward(&[5], n_ctx, false).is_err());
    assert!(
        b.forward(&[5; 17], 0, false).is_err(),
        "more than max_batch"
    );
    assert!(b.forward(&[5], n_ctx - 1, false).is_ok());
}

fn engine(kernels: Option<KernelKind>) -> Engine {
    let b = synth_backend(&SynthSpec::default(), kernels, 2);
    let g = Gguf::parse(Bytes::from_vec(synth_model(&SynthSpec::default()))).expect("parses");
    let tok = Tokenizer::from_gguf(&g, None).expect("tokenizer");
    let chat = ChatTemplate::new(None, "", "<|im_end|>").expect("template");
    Engine::new(Box::new(b), tok, chat)
}

#[test]
fn tokenizer_from_metadata_merges_and_specials() {
    let g = Gguf::parse(Bytes::from_vec(synth_model(&SynthSpec::default()))).expect("parses");
    let tok = Tokenizer::from_gguf(&g, None).expect("tokenizer");
    let ids = tok.encode("<|im_start|>hello t").expect("encode");
    // <|im_start|>, "hell" (merged), "o", " t" (merged).
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids[0], 1);
    assert_eq!(tok.text(ids[1]), Some("hell"));
    assert_eq!(
        tok.decode(&ids),
        "hello t",
        "control tokens are not rendered"
    );
    assert!(tok.is_eog(2));
    let bytes = "naïve 日本".to_string();
    assert_eq!(tok.decode(&tok.encode(&bytes).expect("encode")), bytes);
}

#[test]
fn generation_is_deterministic_and_honours_limits() {
    let mut e = engine(None);
    let mut req = GenerateRequest::new(Prompt::Messages(vec![Message::new("user", "hello")]));
    req.max_tokens = 12;
    req.sampling = SamplingParams {
        seed: 7,
        temperature: 0.9,
        ..Default::default()
    };
    let mut s1 = String::new();
    let a = e.generate(&req, &mut s1).expect("generate");
    let mut s2 = String::new();
    let b = e.generate(&req, &mut s2).expect("generate");
    assert_eq!(a.tokens, b.tokens, "same seed, same request, same tokens");
    assert_eq!(s1, a.text, "streamed text concatenates to the final text");
    assert!(a.usage.completion_tokens <= 12);
    if a.finish_reason == FinishReason::Length {
        assert_eq!(a.usage.completion_tokens, 12);
    }
    req.sampling.seed = 8;
    let c = e.generate(&req, &mut String::new()).expect("generate");
    req.sampling.seed = 9;
    let d = e.generate(&req, &mut String::new()).expect("generate");
    assert!(
        c.tokens != a.tokens || d.tokens != a.tokens,
        "seed has no effect"
    );

    // Greedy twice on exact kernels: identical.
    req.sampling = SamplingParams::greedy();
    let g1 = e.generate(&req, &mut String::new()).expect("generate");
    let g2 = e.generate(&req, &mut String::new()).expect("generate");
    assert_eq!(g1.tokens, g2.tokens);
}

#[test]
fn context_limits_are_errors_or_length() {
    let mut e = engine(None);
    let n_ctx = e.backend.n_ctx();
    let long = "x ".repeat(n_ctx);
    let req = GenerateRequest::new(Prompt::Raw(long));
    match e.generate(&req, &mut String::new()) {
        Err(EngineError::PromptTooLong {
            tokens, n_ctx: n, ..
        }) => {
            assert!(tokens >= n);
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    // A short prompt asking for more than the window: stops with `length` at the window's end.
    let mut req = GenerateRequest::new(Prompt::Raw("hello".into()));
    req.max_tokens = 10 * n_ctx;
    req.sampling = SamplingParams {
        temperature: 1.0,
        seed: 3,
        ..Default::default()
    };
    let mut ended_by_window = false;
    for seed in 0..20 {
        req.sampling.seed = seed;
        let c = e.generate(&req, &mut String::new()).expect("generate");
        // The last token is sampled from the last position's logits and needs no slot itself.
        assert!(c.usage.prompt_tokens + c.usage.completion_tokens <= n_ctx + 1);
        if c.finish_reason == FinishReason::Length {
            ended_by_window = true;
            break;
        }
    }
    assert!(ended_by_window, "no generation reached the window's end");
    let req = GenerateRequest::new(Prompt::Raw(String::new()));
    assert!(matches!(
        e.generate(&req, &mut String::new()),
        Err(EngineError::EmptyPrompt)
    ));
    // Sampling ranges are checked once, where a request is parsed (the engine takes what
    // passed): `validate` names the field.
    let mut req = GenerateRequest::new(Prompt::Raw("hello".into()));
    req.sampling.top_p = 0.0;
    let (code, err) = req.validate(&edgellm::api::Limits::default()).unwrap_err();
    assert_eq!(code, edgellm::api::ErrorCode::BadRequest);
    assert!(err.contains("top_p"), "{err}");
}

#[test]
fn stop_strings_end_generation_before_the_match() {
    let mut e = engine(None);
    let mut req = GenerateRequest::new(Prompt::Raw("hello".into()));
    req.max_tokens = 40;
    req.sampling = SamplingParams::greedy();
    let free = e.generate(&req, &mut String::new()).expect("generate");
    // Pick a stop string from the middle of the unconstrained answer.
    let text = free.text.clone();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() < 6 {
        return;
    }
    let stop: String = chars[3..5].iter().collect();
    req.stop = vec![stop.clone()];
    let mut streamed = String::new();
    let c = e.generate(&req, &mut streamed).expect("generate");
    assert_eq!(c.finish_reason, FinishReason::Stop);
    let cut = text.find(&stop).expect("stop occurs");
    assert_eq!(c.text, text[..cut]);
    assert_eq!(streamed, c.text);
}

/// A SentencePiece (`tokenizer.ggml.model = llama`) vocabulary: whole-word pieces win over
/// letters by score, unknown characters fall back to byte tokens, and decoding restores the text.
#[test]
fn sentencepiece_tokenizer_from_metadata() {
    use edgellm::convert::writer::GgufWriter;
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    let mut scores: Vec<f32> = vec![0.0, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (piece, score) in [
        ("\u{2581}hello", -1.0),
        ("\u{2581}world", -1.5),
        ("\u{2581}", -3.0),
        ("h", -5.0),
        ("e", -5.0),
        ("l", -5.0),
        ("o", -5.0),
        ("w", -5.0),
        ("r", -5.0),
        ("d", -5.0),
    ] {
        tokens.push(piece.into());
        types.push(1);
        scores.push(score);
    }
    let id = |t: &str| tokens.iter().position(|x| x == t).expect("token") as u32;
    let mut w = GgufWriter::new();
    w.kv_str("tokenizer.ggml.model", "llama")
        .kv_strs("tokenizer.ggml.tokens", &tokens)
        .kv_i32s("tokenizer.ggml.token_type", &types)
        .kv_f32s("tokenizer.ggml.scores", &scores)
        .kv_u32("tokenizer.ggml.bos_token_id", 1)
        .kv_u32("tokenizer.ggml.eos_token_id", 2);
    let g = Gguf::parse(Bytes::from_vec(w.to_bytes())).expect("parses");
    let tok = Tokenizer::from_gguf(&g, None).expect("tokenizer");
    assert!(tok.add_bos, "SentencePiece models add BOS by default");
    let ids = tok.encode("hello world").expect("encode");
    assert_eq!(ids, vec![id("\u{2581}hello"), id("\u{2581}world")]);
    assert_eq!(tok.encode_prompt("hello").expect("encode")[0], 1);
    assert_eq!(tok.decode(&ids).trim_start(), "hello world");
    // "é" is not in the vocabulary: its two UTF-8 bytes come out as byte tokens.
    let ids = tok.encode("hé").expect("encode");
    assert!(
        ids.contains(&id("<0xC3>")) && ids.contains(&id("<0xA9>")),
        "{ids:?}"
    );
    assert_eq!(tok.decode(&ids).trim_start(), "hé");
    // A control token's text is matched whole, not spelt in pieces.
    let ids = tok.encode("hello</s>").expect("encode");
    assert_eq!(ids.last(), Some(&2), "{ids:?}");
}

/// After `shift`, the cache holds what a fresh run of the kept tokens at their new positions
/// would: the sinks, then the tokens after the evicted ones, with keys re-rotated. A one-layer
/// model makes that exact (deeper layers' keys and values also carry what the kept tokens saw of
/// the evicted ones, which is the point of keeping them). Both RoPE pairings (llama's
/// interleaved, qwen2's halves), exact kernels.
#[test]
fn shift_rebases_cached_keys_as_if_recomputed() {
    for arch in ["llama", "qwen2"] {
        let spec = SynthSpec {
            arch,
            n_layer: 1,
            ..Default::default()
        };
        let toks = tokens();
        let (len, keep, discard) = (toks.len(), 4, 7);
        let next = 3 + 99;
        let mut slid = synth_backend(&spec, Some(KernelKind::Reference), 1);
        batched(&mut slid, &toks, 16);
        slid.shift(keep, discard, len).expect("shift");
        let a = slid
            .forward(&[next], len - discard, false)
            .expect("after shift")
            .to_vec();

        let kept: Vec<u32> = toks[..keep]
            .iter()
            .chain(&toks[keep + discard..])
            .copied()
            .collect();
        let mut fresh = synth_backend(&spec, Some(KernelKind::Reference), 1);
        batched(&mut fresh, &kept, 16);
        let b = fresh
            .forward(&[next], kept.len(), false)
            .expect("fresh")
            .to_vec();
        let d = rel_max_diff(&a, &b);
        assert!(d < 1e-4, "{arch}: slid vs recomputed differ by {d}");

        // The negative control: without re-rotation (positions not re-based) they differ.
        let mut unrotated = synth_backend(&spec, Some(KernelKind::Reference), 1);
        batched(&mut unrotated, &toks, 16);
        let c = unrotated
            .forward(&[next], len, false)
            .expect("no shift")
            .to_vec();
        assert!(
            rel_max_diff(&c, &b) > 1e-3,
            "{arch}: the check cannot see a shift"
        );

        assert!(slid.shift(keep, 0, len).is_err(), "discarding nothing");
        assert!(slid.shift(keep, 200, len).is_err(), "more than cached");
    }
}

/// A q8_0 KV cache takes under a third of the f32 cache's bytes and gives nearly the same
/// logits, before and after a slide; a model whose heads are not whole q8_0 blocks is refused it
/// with a message.
#[test]
fn q8_kv_cache_is_smaller_and_close_to_f32() {
    let spec = SynthSpec {
        dim: 128,
        n_head: 4,
        n_kv_head: 2,
        ..Default::default()
    };
    let opts = |kv_type| CpuOptions {
        n_ctx: 128,
        threads: 1,
        kernels: None,
        max_batch: 16,
        kv_type,
        logit_rows: 0,
        repack: true,
    };
    let mut f = synth_backend_with(&spec, &opts(KvType::F32)).expect("f32 cache");
    let mut q = synth_backend_with(&spec, &opts(KvType::Q8_0)).expect("q8_0 cache");
    let (bf, bq) = (f.info().state_bytes, q.info().state_bytes);
    let g = Gguf::parse(Bytes::from_vec(synth_model(&spec))).expect("parses");
    let (pf, pq) = (
        CpuBackend::plan(&g, &opts(KvType::F32)).expect("plan"),
        CpuBackend::plan(&g, &opts(KvType::Q8_0)).expect("plan"),
    );
    assert_eq!(
        pf.kv_cache + pf.scratch,
        bf,
        "the plan is what f32 allocates"
    );
    assert_eq!(
        pq.kv_cache + pq.scratch,
        bq,
        "the plan is what q8_0 allocates"
    );
    assert!(3 * pq.kv_cache < pf.kv_cache, "{pq:?} vs {pf:?}");

    let toks = tokens();
    let a = batched(&mut f, &toks, 16);
    let b = batched(&mut q, &toks, 16);
    let d = rel_max_diff(&b, &a);
    assert!(d > 0.0 && d < 0.05, "q8_0 vs f32 logits differ by {d}");
    let len = toks.len();
    f.shift(4, 7, len).expect("shift f32");
    q.shift(4, 7, len).expect("shift q8_0");
    let a = f.forward(&[5], len - 7, false).expect("f32").to_vec();
    let b = q.forward(&[5], len - 7, false).expect("q8_0").to_vec();
    let d = rel_max_diff(&b, &a);
    assert!(d < 0.05, "after a slide q8_0 vs f32 differ by {d}");

    let narrow = SynthSpec::default(); // heads of 16 values
    let e = synth_backend_with(&narrow, &opts(KvType::Q8_0)).expect_err("refused");
    assert!(e.to_string().contains("kv_type = q8_0"), "{e}");
}

/// An f16 KV cache (the default) takes half the f32 cache's bytes, as planned, and gives the
/// f32 cache's logits within f16's rounding, before and after a slide (which widens, re-rotates
/// and rounds the moved keys again). Exact kernels, so the cache's rounding is all that differs
/// (measured 2.7e-4): the fast path's 8-bit activations turn a last-bit change anywhere into a
/// rounding flip on this random model (1.6e-2 either way, f16 cache or a different summation
/// order, which is why the tests of equal paths keep f32 caches).
#[test]
fn f16_kv_cache_is_half_and_close_to_f32() {
    let spec = SynthSpec {
        dim: 128,
        n_head: 4,
        n_kv_head: 2,
        ..Default::default()
    };
    let opts = |kv_type| CpuOptions {
        n_ctx: 128,
        threads: 2,
        kernels: Some(KernelKind::Reference),
        max_batch: 16,
        kv_type,
        logit_rows: 0,
        repack: true,
    };
    assert_eq!(CpuOptions::default().kv_type, KvType::F16, "the default");
    let g = Gguf::parse(Bytes::from_vec(synth_model(&spec))).expect("parses");
    let (pf, ph) = (
        CpuBackend::plan(&g, &opts(KvType::F32)).expect("plan"),
        CpuBackend::plan(&g, &opts(KvType::F16)).expect("plan"),
    );
    assert_eq!(2 * ph.kv_cache, pf.kv_cache, "{ph:?} vs {pf:?}");
    let mut f = synth_backend_with(&spec, &opts(KvType::F32)).expect("f32 cache");
    let mut h = synth_backend_with(&spec, &opts(KvType::F16)).expect("f16 cache");
    assert_eq!(
        ph.kv_cache + ph.scratch,
        h.info().state_bytes,
        "the plan is what f16 allocates"
    );
    assert_eq!(h.info().kv_type, "f16");
    let toks = tokens();
    let a = batched(&mut f, &toks, 16);
    let b = batched(&mut h, &toks, 16);
    let d = rel_max_diff(&b, &a);
    assert!(d > 0.0 && d < 1e-3, "f16 vs f32 logits differ by {d}");
    let len = toks.len();
    f.shift(4, 7, len).expect("shift f32");
    h.shift(4, 7, len).expect("shift f16");
    let a = f.forward(&[5], len - 7, false).expect("f32").to_vec();
    let b = h.forward(&[5], len - 7, false).expect("f16").to_vec();
    let d = rel_max_diff(&b, &a);
    assert!(
        d > 0.0 && d < 0.01,
        "after a slide f16 vs f32 differ by {d}"
    );
}

/// With a sliding window, one request generates eight windows' worth of tokens; every
/// eviction is counted. Without one it stops with `length` at the window's end.
#[test]
fn sliding_window_generates_past_the_window() {
    let mut e = engine(None);
    let n_ctx = e.backend.n_ctx();
    let mut req = GenerateRequest::new(Prompt::Raw("hello".into()));
    req.max_tokens = 8 * n_ctx;
    req.ignore_eos = true;
    req.sampling = SamplingParams::greedy();
    let stopped = e.generate(&req, &mut String::new()).expect("generate");
    assert_eq!(stopped.finish_reason, FinishReason::Length);
    assert!(stopped.usage.prompt_tokens + stopped.usage.completion_tokens <= n_ctx + 1);
    assert_eq!(stopped.usage.evicted_tokens, 0);

    let w = edgellm::engine::Window::new(n_ctx, 4, 0).expect("window");
    assert_eq!(w.n_discard, (n_ctx - 5) / 4);
    e.set_window(Some(w));
    let mut streamed = String::new();
    let c = e.generate(&req, &mut streamed).expect("generate");
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.usage.completion_tokens, 8 * n_ctx);
    let cached = c.usage.prompt_tokens + c.usage.completion_tokens - c.usage.evicted_tokens;
    assert!(cached <= n_ctx + 1, "{:?}", c.usage);
    assert_eq!(c.usage.evicted_tokens % w.n_discard, 0);
    assert!(c.usage.evicted_tokens >= 7 * n_ctx);
    assert_eq!(streamed, c.text);
    // The first window's tokens are the same as without sliding.
    assert_eq!(&c.tokens[..stopped.tokens.len()], &stopped.tokens[..]);

    assert!(edgellm::engine::Window::new(8, 4, 0).is_some());
    assert!(
        edgellm::engine::Window::new(5, 4, 0).is_none(),
        "no room to slide"
    );
    assert!(edgellm::engine::Window::new(64, 4, 60).is_none());
}

fn user(text: &str) -> Message {
    Message::new("user", text)
}

fn chat_req(
    messages: Vec<Message>,
    session: Option<(&str, Option<Vec<Message>>)>,
) -> GenerateRequest {
    let mut req = GenerateRequest::new(Prompt::Messages(messages));
    req.max_tokens = 6;
    req.ignore_eos = true;
    req.sampling = SamplingParams::greedy();
    req.session = session.map(|(id, history)| SessionRef {
        owner: String::new(),
        id: id.into(),
        history,
    });
    req
}

/// A conversation longer than the window loses its oldest turns, never the system prompt or
/// the last user turn, and says how many tokens went; when even those two do not fit, the
/// error names the prompt's tokens and the window.
#[test]
fn prompt_overflow_drops_the_oldest_turns() {
    let mut e = engine(None);
    let n_ctx = e.backend.n_ctx();
    let sys = Message::new("system", "be brief");
    let mut msgs = vec![sys.clone()];
    for i in 0..12 {
        msgs.push(user(&format!("question number {i} about the weather")));
        msgs.push(Message::new(
            "assistant",
            &format!("answer number {i} it rains"),
        ));
    }
    msgs.push(user("last one"));
    let tokens_of = |e: &Engine, m: &[Message]| {
        let text = e.chat.render(m, &[]).expect("render");
        e.tokenizer.encode_prompt(&text).expect("encode").len()
    };
    let full = tokens_of(&e, &msgs);
    assert!(
        full > n_ctx,
        "the test needs a conversation over the window ({full})"
    );
    let c = e
        .generate(&chat_req(msgs.clone(), None), &mut String::new())
        .expect("fits");
    let dropped = c.usage.prompt_tokens_dropped;
    assert_eq!(c.usage.prompt_tokens + dropped, full);
    assert!(
        c.usage.prompt_tokens < n_ctx && dropped > 0,
        "{:?}",
        c.usage
    );
    // What was kept is the system prompt and the newest turns: some suffix of the messages.
    let kept = (1..msgs.len())
        .map(|k| {
            let m: Vec<Message> = std::iter::once(sys.clone())
                .chain(msgs[k..].iter().cloned())
                .collect();
            tokens_of(&e, &m)
        })
        .position(|n| n == c.usage.prompt_tokens);
    assert!(
        kept.is_some(),
        "prompt is not the system prompt plus the newest turns"
    );

    let short = e
        .generate(&chat_req(vec![user("hi")], None), &mut String::new())
        .expect("ok");
    assert_eq!(short.usage.prompt_tokens_dropped, 0);

    let huge = vec![sys, user(&"rain ".repeat(n_ctx))];
    match e.generate(&chat_req(huge, None), &mut String::new()) {
        Err(EngineError::TurnTooLong { tokens, n_ctx: n }) => {
            assert!(tokens >= n && n == n_ctx, "{tokens} {n}");
        }
        other => panic!("expected TurnTooLong, got {other:?}"),
    }
}

/// A follow-up turn of a session prefills only the new turn; sessions interleaved with others answer exactly as when run
/// alone (nothing of one leaks into another); bounds evict the least recently used, and an
/// evicted session is rebuilt from the history the client sends, or refused without one.
#[test]
fn sessions_reuse_their_cache_and_stay_apart() {
    let turns = |e: &mut Engine, id: &str, qs: &[&str]| -> Vec<Completion> {
        let mut out = Vec::new();
        for (i, q) in qs.iter().enumerate() {
            let history = (i == 0).then(Vec::new);
            let c = e
                .generate(
                    &chat_req(vec![user(q)], Some((id, history))),
                    &mut String::new(),
                )
                .expect("turn");
            out.push(c);
        }
        out
    };
    let mut alone = engine(None);
    alone.set_sessions(4, 1 << 20);
    let a_alone = turns(&mut alone, "a", &["hello there", "and then", "more"]);
    assert_eq!(a_alone[0].usage.cached_tokens, 0);
    for c in &a_alone[1..] {
        assert!(
            c.usage.cached_tokens > 0,
            "follow-up reused nothing: {:?}",
            c.usage
        );
        assert!(
            c.usage.prompt_tokens < c.usage.cached_tokens,
            "follow-up prefilled {:?}",
            c.usage
        );
    }
    assert_eq!(a_alone[2].session.as_ref().map(|s| s.turns), Some(3));

    // Interleaved with session b and with plain requests: a answers exactly as alone.
    let mut mixed = engine(None);
    mixed.set_sessions(4, 1 << 20);
    let mut got = Vec::new();
    for (i, q) in ["hello there", "and then", "more"].iter().enumerate() {
        let history = (i == 0).then(Vec::new);
        got.push(
            mixed
                .generate(
                    &chat_req(vec![user(q)], Some(("a", history.clone()))),
                    &mut String::new(),
                )
                .expect("a"),
        );
        mixed
            .generate(
                &chat_req(vec![user("other talk entirely")], Some(("b", history))),
                &mut String::new(),
            )
            .expect("b");
        mixed
            .generate(
                &chat_req(vec![user("no session")], None),
                &mut String::new(),
            )
            .expect("plain");
    }
    for (g, a) in got.iter().zip(&a_alone) {
        assert_eq!(g.tokens, a.tokens, "session a changed by its neighbours");
        assert_eq!(g.usage.cached_tokens, a.usage.cached_tokens);
    }
    assert_eq!(mixed.session_stats().held, 2);

    // Bounds: two sessions at most; a third evicts the least recently used (b, then a).
    let mut e = engine(None);
    e.set_sessions(2, 1 << 20);
    turns(&mut e, "a", &["one"]);
    turns(&mut e, "b", &["two"]);
    turns(&mut e, "a", &["one", "again"]);
    turns(&mut e, "c", &["three"]);
    assert_eq!(e.session_stats().held, 2);
    assert_eq!(e.session_stats().evicted, 1);
    let refused = e.generate(
        &chat_req(vec![user("hm")], Some(("b", None))),
        &mut String::new(),
    );
    match refused {
        Err(EngineError::SessionUnknown(id)) => assert_eq!(id, "b"),
        other => panic!("expected SessionUnknown, got {other:?}"),
    }
    let history = vec![user("two"), Message::new("assistant", "whatever it said")];
    let rebuilt = e
        .generate(
            &chat_req(vec![user("hm")], Some(("b", Some(history)))),
            &mut String::new(),
        )
        .expect("rebuilt from history");
    assert_eq!(rebuilt.usage.cached_tokens, 0);
    assert_eq!(rebuilt.session.as_ref().map(|s| s.turns), Some(1));
    let next = e
        .generate(
            &chat_req(vec![user("so")], Some(("b", None))),
            &mut String::new(),
        )
        .expect("held again");
    assert!(next.usage.cached_tokens > 0);

    // Bytes: a store too small for any saved cache keeps none but the resident one.
    let mut tight = engine(None);
    tight.set_sessions(8, 1000);
    turns(&mut tight, "a", &["one"]);
    turns(&mut tight, "b", &["two"]);
    let st = tight.session_stats();
    assert_eq!((st.held, st.bytes), (1, 0), "{st:?}");
    assert!(matches!(
        tight.generate(
            &chat_req(vec![user("x")], Some(("a", None))),
            &mut String::new()
        ),
        Err(EngineError::SessionUnknown(_))
    ));
}

/// A backend loaded for generation (`logit_rows: 1`, as the daemon, `ask` and `bench` load
/// it) plans and holds one row of logits, not `max_batch`; a call for more rows is refused
/// naming the limit, and perplexity, which reads every row, still gives the same result in
/// one-token steps.
#[test]
fn logits_for_one_token_are_all_generation_holds() {
    let spec = SynthSpec::default();
    let opts = |logit_rows| CpuOptions {
        n_ctx: 128,
        threads: 2,
        kernels: None,
        max_batch: 16,
        kv_type: KvType::F32,
        logit_rows,
        repack: true,
    };
    let g = || Gguf::parse(Bytes::from_vec(synth_model(&spec))).expect("parses");
    let all = CpuBackend::plan(&g(), &opts(0)).expect("plan");
    let one = CpuBackend::plan(&g(), &opts(1)).expect("plan");
    let mut full = synth_backend_with(&spec, &opts(0)).expect("loads");
    let mut lean = synth_backend_with(&spec, &opts(1)).expect("loads");
    let vocab = full.n_vocab() as u64;
    assert_eq!(all.scratch - one.scratch, 15 * vocab * 4);
    assert_eq!(lean.max_logit_rows(), 1);
    let toks: Vec<u32> = (0..64).map(|i| 3 + (i * 37 % 256) as u32).collect();
    let err = lean
        .forward(&toks[..2], 0, true)
        .expect_err("two rows refused");
    let msg = err.to_string();
    assert!(
        msg.contains("logit_rows") && msg.contains("at most 1"),
        "{msg}"
    );
    // The last token's logits of a batch are what they are on the full backend.
    lean.reset();
    let last = lean.forward(&toks[..16], 0, false).expect("batch").to_vec();
    full.reset();
    assert_eq!(last, full.forward(&toks[..16], 0, false).expect("batch"));

    let ppl = |b: &mut CpuBackend| {
        perplexity(b, None, &toks, 32, None, &mut |_, _, _| {})
            .expect("perplexity")
            .ppl
    };
    let (p_full, p_lean) = (ppl(&mut full), ppl(&mut lean));
    assert!(
        (p_full - p_lean).abs() < 1e-6 * p_full,
        "{p_full} vs {p_lean}"
    );
}

/// Once the engine has built its tokenizer, the GGUF's vocabulary arrays are dropped (they
/// take several times their file size as parsed values), and the tokenizer, which holds its
/// own copy, still encodes and decodes every token. The tokenizer is built on a thread of its
/// own while the weights are repacked: both are done when the engine is.
#[test]
fn the_engine_frees_the_parsed_vocabulary() {
    let g = Gguf::parse(Bytes::from_vec(synth_model(&SynthSpec::default()))).expect("parses");
    let reference = Tokenizer::from_gguf(&g, None).expect("tokenizer");
    let before = g.get_array("tokenizer.ggml.tokens").expect("tokens").len();
    let b = CpuBackend::load(g, &CpuOptions::default()).expect("loads");
    assert_eq!(b.info().repacked_matrices, 0);
    let engine = Engine::from_backend(Box::new(b)).expect("engine");
    let packs = Kernels::select(None).expect("kernels").packs;
    assert_eq!(engine.backend.info().repacked_matrices > 0, packs);
    match engine.backend.vocabulary() {
        edgellm::backend::Vocabulary::Gguf { gguf, .. } => {
            assert!(gguf.get("tokenizer.ggml.tokens").is_none());
            assert!(gguf.get("tokenizer.ggml.merges").is_none());
            assert!(gguf.keys.iter().any(|k| k == "tokenizer.ggml.tokens"));
        }
        _ => panic!("a GGUF backend"),
    }
    assert_eq!(engine.tokenizer.n_vocab(), before);
    for id in 0..before as u32 {
        assert_eq!(
            engine.tokenizer.piece(id),
            reference.piece(id),
            "token {id}"
        );
        assert_eq!(engine.tokenizer.text(id), reference.text(id), "token {id}");
    }
    let text = "Hello, world! 12 tokens";
    let ids = engine.tokenizer.encode(text).expect("encode");
    assert_eq!(ids, reference.encode(text).expect("encode"));
    assert_eq!(engine.tokenizer.decode(&ids), text);
}
