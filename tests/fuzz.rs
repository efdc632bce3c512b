//! Deterministic fuzzing: a mutator over the GGUF header and one over request lines, thousands
//! of cases each in CI, zero panics allowed. `EDGELLM_FUZZ_CASES` sets the cases per target and
//! `EDGELLM_FUZZ_SEED` the first seed; a longer run is
//! `EDGELLM_FUZZ_CASES=200000 cargo test --release --test tests fuzz::`.
//! A failure names the seed of its case, which replays alone with
//! `EDGELLM_FUZZ_CASES=1 EDGELLM_FUZZ_SEED=<seed>`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use serde_json::json;

use edgellm::api::wire;
use edgellm::api::Limits;
use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::engine::sampler::Rng;
use edgellm::gguf::{Bytes, Gguf};
use edgellm_testkit::{synth_model, SynthSpec};

pub fn cases() -> u64 {
    std::env::var("EDGELLM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

pub fn first_seed() -> u64 {
    std::env::var("EDGELLM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Values that sit on the edges of what a length or count field holds.
const EDGES: [u64; 9] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    1 << 40,
];

/// One mutation of `b` within `b[..end]`: a byte set, a bit flipped, an 8-byte field set to an
/// edge value, a chunk deleted, duplicated, or the tail cut.
fn mutate(b: &mut Vec<u8>, end: usize, rng: &mut Rng) {
    if b.is_empty() {
        b.push(rng.next_u64() as u8);
        return;
    }
    let end = end.min(b.len()).max(1);
    let at = (rng.next_u64() as usize) % end;
    match rng.next_u64() % 7 {
        0 => b[at] = rng.next_u64() as u8,
        1 => b[at] ^= 1 << (rng.next_u64() % 8),
        2 => {
            let v = EDGES[(rng.next_u64() as usize) % EDGES.len()];
            let n = (b.len() - at).min(8);
            b[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
        }
        3 => {
            let n = (1 + rng.next_u64() as usize % 64).min(b.len() - at);
            b.drain(at..at + n);
        }
        4 => {
            let n = (1 + rng.next_u64() as usize % 64).min(b.len() - at);
            let chunk: Vec<u8> = b[at..at + n].to_vec();
            b.splice(at..at, chunk);
        }
        5 => b.truncate(at),
        _ => {
            // A small count (an array length, a string length) moved by a little.
            let n = (b.len() - at).min(4);
            let mut x = [0u8; 4];
            x[..n].copy_from_slice(&b[at..at + n]);
            let v = u32::from_le_bytes(x).wrapping_add(rng.next_u64() as u32 % 17) ^ 8;
            b[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
        }
    }
}

/// Mutated GGUF headers (metadata and tensor infos) are parsed and, when they parse, loaded:
/// errors are fine, panics are not.
#[test]
fn gguf_header_mutations_never_panic() {
    let full = synth_model(&SynthSpec::default());
    let header_end = 8192.min(full.len());
    let t = Instant::now();
    let (mut parsed, mut loaded) = (0, 0);
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = Rng::new(seed);
        let mut b = full.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            mutate(&mut b, header_end, &mut rng);
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            let Ok(g) = Gguf::parse(Bytes::from_vec(b)) else {
                return (0, 0);
            };
            let ok = CpuBackend::load(
                g,
                &CpuOptions {
                    n_ctx: 16,
                    threads: 1,
                    ..Default::default()
                },
            )
            .is_ok();
            (1, u32::from(ok))
        }));
        match r {
            Ok((p, l)) => {
                parsed += p;
                loaded += l;
            }
            Err(_) => panic!("GGUF case seed {seed} panicked"),
        }
    }
    eprintln!(
        "fuzz gguf: {} cases, {parsed} parsed, {loaded} loaded, {:.1} s",
        cases(),
        t.elapsed().as_secs_f64()
    );
}

/// Valid request lines of every kind, the corpus the line mutator starts from.
fn corpus() -> Vec<Vec<u8>> {
    [
        json!({"id": "r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
        json!({"id": "r2", "prompt": "Once", "stream": true, "stop": ["\n", "."], "seed": 3,
               "temperature": 0.5, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "priority": 3,
               "deadline_ms": 1000, "repeat_penalty": 1.1, "repeat_last_n": 8}),
        json!({"id": "s", "session": "kitchen", "history": [
            {"role": "system", "content": "be brief"}, {"role": "assistant", "content": "ok"}],
            "messages": [{"role": "user", "content": "and?"}]}),
        json!({"op": "status"}),
        json!({"op": "cancel", "id": "r1"}),
        json!({"id": "m", "reply_to": "edgellm/replies/x", "prompt": "x"}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .collect()
}

/// Pieces spliced into lines: JSON structure, big and odd numbers, escapes, control text.
const PIECES: [&str; 16] = [
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "null",
    "1e999",
    "-1",
    "18446744073709551616",
    "\\u0000",
    "\\ud800",
    "<|im_start|>",
    "\"id\":\"r1\"",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
];

/// One to four mutations of a JSON request: pieces of JSON spliced in, or [`mutate`]'s.
pub fn mutate_request(line: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..1 + rng.next_u64() % 4 {
        if rng.next_u64().is_multiple_of(3) {
            let p = PIECES[(rng.next_u64() as usize) % PIECES.len()].as_bytes();
            let at = (rng.next_u64() as usize) % (line.len() + 1);
            line.splice(at..at, p.iter().copied());
        } else {
            let end = line.len();
            mutate(line, end, rng);
        }
    }
}

/// Mutated request lines through the one parser every front-end uses: answered or refused,
/// never a panic; a refusal names its code.
#[test]
fn request_line_mutations_never_panic() {
    let corpus = corpus();
    let limits = Limits::default();
    let now = Instant::now();
    let t = Instant::now();
    let (mut accepted, mut refused) = (0, 0);
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = Rng::new(seed);
        let mut line = corpus[(rng.next_u64() as usize) % corpus.len()].clone();
        mutate_request(&mut line, &mut rng);
        let r = catch_unwind(AssertUnwindSafe(|| {
            wire::parse(&line, &limits, 0, now).map(|_| ())
        }));
        match r {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(refusal)) => {
                refused += 1;
                assert!(
                    !refusal.message.is_empty(),
                    "seed {seed}: a refusal without a message"
                );
            }
            Err(_) => panic!(
                "request case seed {seed} panicked: {:?}",
                String::from_utf8_lossy(&line)
            ),
        }
    }
    assert!(refused > 0 && accepted > 0, "{accepted} {refused}");
    eprintln!(
        "fuzz lines: {} cases, {accepted} accepted, {refused} refused, {:.1} s",
        cases(),
        t.elapsed().as_secs_f64()
    );
}
