//! Kernels: every fast kernel against its scalar twin on seeded data (≈1e-6 relative), and
//! quantized results against f32 within a named bound per format.

use super::generic;
use super::matmul::{matmul, Acts, Matrix};
use super::packed::{self, Packed, P4_0, P4_1, P5_0, P5_1, P8_0};
use super::pool::Pool;
use super::quant::{
    self, dequantize_row, quantize, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8, BlockQ8_0, GgmlType,
};
use super::{KernelKind, Kernels};
use crate::engine::sampler::Rng;

/// Seeded values in [-scale, scale).
fn random_f32(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
        .collect()
}

/// Kernel sets this CPU can run, other than the exact reference.
fn fast_kernels() -> Vec<KernelKind> {
    KernelKind::ALL
        .into_iter()
        .filter(|k| *k != KernelKind::Reference && k.available())
        .collect()
}

/// Root-mean-square error of a quantize → dequantize round trip, relative to the data's RMS.
const ROUNDTRIP_F16: f32 = 0.001;
const ROUNDTRIP_Q8_0: f32 = 0.01;
const ROUNDTRIP_Q6_K: f32 = 0.03;
const ROUNDTRIP_Q5_0: f32 = 0.06;
const ROUNDTRIP_Q4_K: f32 = 0.1;
const ROUNDTRIP_Q4_0: f32 = 0.12;
const ROUNDTRIP_Q4_1: f32 = 0.1;

/// |quantized dot − f32 dot| / (‖w‖·‖x‖), with 8-bit activations.
const DOT_Q8_0: f32 = 0.01;
const DOT_Q5_0: f32 = 0.03;
const DOT_Q4_0: f32 = 0.05;
const DOT_Q4_1: f32 = 0.05;
/// Against the dequantized weights: only the activations' 8 bits count.
const DOT_Q4_K: f32 = 0.01;
const DOT_Q5_K: f32 = 0.01;
const DOT_Q5_1: f32 = 0.03;
const DOT_Q6_K: f32 = 0.01;

/// Fast kernel against its twin: relative to the sum of |terms|, so cancellation cannot hide an
/// error and summation order cannot fake one.
const TWIN: f32 = 1e-5;

const N: usize = 32 * 36;

fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[test]
fn roundtrip_error_per_format() {
    let x = random_f32(1, 256 * 8, 1.0);
    for (ty, bound) in [
        (GgmlType::F16, ROUNDTRIP_F16),
        (GgmlType::Q8_0, ROUNDTRIP_Q8_0),
        (GgmlType::Q6K, ROUNDTRIP_Q6_K),
        (GgmlType::Q5_0, ROUNDTRIP_Q5_0),
        (GgmlType::Q5_1, ROUNDTRIP_Q5_0),
        (GgmlType::Q4K, ROUNDTRIP_Q4_K),
        (GgmlType::Q5K, ROUNDTRIP_Q5_0),
        (GgmlType::Q4_0, ROUNDTRIP_Q4_0),
        (GgmlType::Q4_1, ROUNDTRIP_Q4_1),
    ] {
        let q = quantize(ty, &x);
        assert_eq!(q.len(), ty.row_bytes(x.len()), "{}", ty.name());
        let mut y = vec![0f32; x.len()];
        dequantize_row(ty, &q, &mut y);
        let err: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
        let e = rms(&err) / rms(&x);
        assert!(
            e < bound,
            "{}: round-trip error {e} over {bound}",
            ty.name()
        );
        // And not suspiciously perfect for the lossy formats (a no-op dequantizer would be).
        if ty != GgmlType::F16 {
            assert!(e > 1e-4, "{}: error {e} is implausibly small", ty.name());
        }
    }
}

#[test]
fn dequantize_known_blocks() {
    // Q4_0: d = 0.5, nibble 0 -> -4.0, nibble 15 -> 3.5; element j+16 in the high nibble.
    let mut b = BlockQ4_0 {
        d: quant::f32_to_f16(0.5),
        qs: [0; 16],
    };
    b.qs[0] = 0xf0;
    let mut y = [0f32; 32];
    quant::dequant_q4_0(&[b], &mut y);
    assert_eq!(y[0], -4.0);
    assert_eq!(y[16], 3.5);
    // Q4_1: value = q·d + m.
    let b = BlockQ4_1 {
        d: quant::f32_to_f16(0.25),
        m: quant::f32_to_f16(-1.0),
        qs: [0x21; 16],
    };
    quant::dequant_q4_1(&[b], &mut y);
    assert_eq!(y[0], -0.75);
    assert_eq!(y[16], -0.5);
    // Q5_0: fifth bit from qh.
    let b = BlockQ5_0 {
        d: quant::f32_to_f16(1.0),
        qh: 1u32.to_le_bytes(),
        qs: [0; 16],
    };
    quant::dequant_q5_0(&[b], &mut y);
    assert_eq!(y[0], 0.0); // 16 - 16
    assert_eq!(y[1], -16.0);
    // Q5_1: value = q·d + m, fifth bit from qh (bit 16 is element 16's).
    let b = BlockQ5_1 {
        d: quant::f32_to_f16(0.5),
        m: quant::f32_to_f16(-2.0),
        qh: (1u32 << 16).to_le_bytes(),
        qs: [0x13; 16],
    };
    quant::dequant_q5_1(&[b], &mut y);
    assert_eq!(y[0], 3.0 * 0.5 - 2.0);
    assert_eq!(y[16], (16.0 + 1.0) * 0.5 - 2.0);
    assert_eq!(y[17], 0.5 - 2.0);
}

fn q8(kernels: &Kernels, x: &[f32]) -> Vec<BlockQ8> {
    let mut out = vec![BlockQ8::default(); x.len() / 32];
    (kernels.quantize_q8)(x, &mut out);
    out
}

fn abs_terms(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum()
}

#[test]
fn quantize_q8_matches_twin() {
    let x = random_f32(2, N, 3.0);
    let reference = q8(&Kernels::new(KernelKind::Scalar).expect("scalar"), &x);
    for k in fast_kernels() {
        let kern = Kernels::new(k).expect("available");
        let got = q8(&kern, &x);
        for (a, b) in got.iter().zip(&reference) {
            assert_eq!(a.qs, b.qs, "{}", k.name());
            assert!((a.d - b.d).abs() <= 1e-7 * b.d.abs(), "{}", k.name());
            assert!(
                (a.s - b.s).abs() <= 1e-5 * b.s.abs().max(1.0),
                "{}",
                k.name()
            );
        }
    }
}

#[test]
fn dot_kernels_match_twin_and_f32() {
    let w = random_f32(3, N, 1.0);
    let x = random_f32(4, N, 2.0);
    let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
    let scale = norm(&w) * norm(&x);
    let terms = abs_terms(&w, &x);
    let scalar = Kernels::new(KernelKind::Scalar).expect("scalar");
    let xq = q8(&scalar, &x);
    let q4_0 = quant::quantize_q4_0(&w);
    let q4_1 = quant::quantize_q4_1(&w);
    let q5_0 = quant::quantize_q5_0(&w);
    let q5_1 = quant::quantize_q5_1(&w);
    let q8_0 = quant::quantize_q8_0(&w);
    let twins = [
        ("q4_0", generic::dot_q4_0(&q4_0, &xq), DOT_Q4_0),
        ("q4_1", generic::dot_q4_1(&q4_1, &xq), DOT_Q4_1),
        ("q5_0", generic::dot_q5_0(&q5_0, &xq), DOT_Q5_0),
        ("q8_0", generic::dot_q8_0(&q8_0, &xq), DOT_Q8_0),
        ("q5_1", generic::dot_q5_1(&q5_1, &xq), DOT_Q5_1),
    ];
    for (name, got, bound) in twins {
        let e = (got - exact).abs() / scale;
        assert!(e < bound, "{name}: error vs f32 {e} over {bound}");
    }
    for k in fast_kernels() {
        let kern = Kernels::new(k).expect("available");
        let fast = [
            (kern.dot_q4_0)(&q4_0, &xq),
            (kern.dot_q4_1)(&q4_1, &xq),
            (kern.dot_q5_0)(&q5_0, &xq),
            (kern.dot_q8_0)(&q8_0, &xq),
        ];
        for ((name, twin, _), got) in twins.iter().zip(fast) {
            assert!(
                (got - twin).abs() <= TWIN * terms,
                "{} {name}: {got} vs twin {twin}",
                k.name()
            );
        }
        let f = (kern.dot_f32)(&w, &x);
        assert!(
            (f - exact).abs() <= TWIN * terms,
            "{} f32: {f} vs {exact}",
            k.name()
        );
        // Lengths that are not a multiple of the vector width.
        let g = (kern.dot_f32)(&w[..37], &x[..37]);
        let g0 = generic::dot_f32(&w[..37], &x[..37]);
        assert!(
            (g - g0).abs() <= TWIN * abs_terms(&w[..37], &x[..37]),
            "{}",
            k.name()
        );
    }
}

/// Every tile shape of every fast kernel set equals the dot products of the scalar twin.
#[test]
fn tiles_match_twin() {
    let cols = 32 * 18;
    let rows = 8;
    let tokens = 4;
    let w = random_f32(5, rows * cols, 1.0);
    let xs = random_f32(6, tokens * cols, 2.0);
    let scalar = Kernels::new(KernelKind::Scalar).expect("scalar");
    let xq = q8(&scalar, &xs);
    let nb = cols / 32;
    let xrows: Vec<&[BlockQ8]> = xq.chunks(nb).collect();
    let q4_0 = quant::quantize_q4_0(&w);
    let q4_1 = quant::quantize_q4_1(&w);
    let q8_0 = quant::quantize_q8_0(&w);
    let r4_0: Vec<&[BlockQ4_0]> = q4_0.chunks(nb).collect();
    let r4_1: Vec<&[BlockQ4_1]> = q4_1.chunks(nb).collect();
    let r8_0: Vec<&[BlockQ8_0]> = q8_0.chunks(nb).collect();
    let q5_0 = quant::quantize_q5_0(&w);
    let r5_0: Vec<&[BlockQ5_0]> = q5_0.chunks(nb).collect();
    let q5_1 = quant::quantize_q5_1(&w);
    let r5_1: Vec<&[BlockQ5_1]> = q5_1.chunks(nb).collect();
    let terms: f32 = (0..rows)
        .flat_map(|r| (0..tokens).map(move |c| (r, c)))
        .map(|(r, c)| abs_terms(&w[r * cols..(r + 1) * cols], &xs[c * cols..(c + 1) * cols]))
        .fold(0f32, f32::max);
    for k in fast_kernels() {
        let kern = Kernels::new(k).expect("available");
        for (nr, nc) in [(8, 1), (4, 1), (2, 4), (1, 4), (1, 1), (3, 2), (8, 4)] {
            let mut got = vec![0f32; nr * nc];
            let mut want = vec![0f32; nr * nc];
            (kern.tile_q4_0)(&r4_0[..nr], &xrows[..nc], &mut got);
            generic::tile_q4_0(&r4_0[..nr], &xrows[..nc], &mut want);
            check(&got, &want, terms, k, "q4_0", nr, nc);
            (kern.tile_q4_1)(&r4_1[..nr], &xrows[..nc], &mut got);
            generic::tile_q4_1(&r4_1[..nr], &xrows[..nc], &mut want);
            check(&got, &want, terms, k, "q4_1", nr, nc);
            (kern.tile_q8_0)(&r8_0[..nr], &xrows[..nc], &mut got);
            generic::tile_q8_0(&r8_0[..nr], &xrows[..nc], &mut want);
            check(&got, &want, terms, k, "q8_0", nr, nc);
            (kern.tile_q5_0)(&r5_0[..nr], &xrows[..nc], &mut got);
            generic::tile_q5_0(&r5_0[..nr], &xrows[..nc], &mut want);
            check(&got, &want, terms, k, "q5_0", nr, nc);
            (kern.tile_q5_1)(&r5_1[..nr], &xrows[..nc], &mut got);
            generic::tile_q5_1(&r5_1[..nr], &xrows[..nc], &mut want);
            check(&got, &want, terms, k, "q5_1", nr, nc);
        }
    }
}

/// Packing eight rows and unpacking any of them gives back its blocks bit for bit, on blocks
/// from the quantizers and on random bytes (every bit pattern of the quants and fifth bits).
#[test]
fn packed_blocks_round_trip() {
    fn check<P: Packed>(src: &[P::Src], name: &str) {
        for (gi, rows) in src.chunks_exact(8).enumerate() {
            let p = P::pack(std::array::from_fn(|i| &rows[i]));
            for (i, r) in rows.iter().enumerate() {
                assert!(
                    quant::block_bytes(&[p.unpack(i)])
                        == quant::block_bytes(std::slice::from_ref(r)),
                    "{name}: group {gi} row {i}"
                );
            }
        }
    }
    let w = random_f32(21, 8 * 4 * 32, 1.0);
    check::<P4_0>(&quant::quantize_q4_0(&w), "q4_0");
    check::<P4_1>(&quant::quantize_q4_1(&w), "q4_1");
    check::<P5_0>(&quant::quantize_q5_0(&w), "q5_0");
    check::<P5_1>(&quant::quantize_q5_1(&w), "q5_1");
    check::<P8_0>(&quant::quantize_q8_0(&w), "q8_0");
    let mut rng = Rng::new(22);
    let bytes: Vec<u8> = (0..8 * 34 * 16).map(|_| rng.next_u64() as u8).collect();
    check::<P4_0>(&blocks_of(&bytes[..8 * 18 * 16]), "q4_0 random");
    check::<P4_1>(&blocks_of(&bytes[..8 * 20 * 16]), "q4_1 random");
    check::<P5_0>(&blocks_of(&bytes[..8 * 22 * 16]), "q5_0 random");
    check::<P5_1>(&blocks_of(&bytes[..8 * 24 * 16]), "q5_1 random");
    check::<P8_0>(&blocks_of(&bytes[..8 * 34 * 16]), "q8_0 random");
}

/// Blocks with the given bytes (copied to an aligned buffer first).
fn blocks_of<T: quant::Block>(bytes: &[u8]) -> Vec<T> {
    let aligned = crate::gguf::Bytes::from_vec(bytes.to_vec());
    quant::as_blocks(&aligned).expect("aligned blocks").to_vec()
}

/// The packed tiles of every fast set against the scalar twin (the same rows unpacked), for 1
/// to 6 tokens, on quantized weights and on random blocks (Q8_0 weights of −128 included).
#[test]
fn packed_tiles_match_twin() {
    let cols = 32 * 18;
    let tokens = 6;
    // Six different groups of eight rows.
    const G: usize = 6;
    let w = random_f32(23, G * 8 * cols, 1.0);
    let xs = random_f32(24, tokens * cols, 2.0);
    let scalar = Kernels::new(KernelKind::Scalar).expect("scalar");
    let xq = q8(&scalar, &xs);
    let nb = cols / 32;
    let xrows: Vec<&[BlockQ8]> = xq.chunks(nb).collect();
    let terms: f32 = (0..G * 8)
        .flat_map(|r| (0..tokens).map(move |c| (r, c)))
        .map(|(r, c)| abs_terms(&w[r * cols..(r + 1) * cols], &xs[c * cols..(c + 1) * cols]))
        .fold(0f32, f32::max);
    /// Each group's packed blocks.
    fn pack<P: Packed>(src: &[P::Src], nb: usize) -> Vec<Vec<P>> {
        src.chunks(8 * nb)
            .map(|g| {
                (0..nb)
                    .map(|b| P::pack(std::array::from_fn(|i| &g[i * nb + b])))
                    .collect()
            })
            .collect()
    }
    let mut rng = Rng::new(25);
    let mut random_q8: Vec<BlockQ8_0> = (0..G * 8 * nb)
        .map(|_| BlockQ8_0 {
            d: quant::f32_to_f16(0.01),
            qs: std::array::from_fn(|_| rng.next_u64() as i8),
        })
        .collect();
    random_q8[3].qs[5] = -128;
    let mut deq = vec![0f32; G * 8 * cols];
    quant::dequant_q8_0(&random_q8, &mut deq);
    let rterms: f32 = (0..G * 8)
        .flat_map(|r| (0..tokens).map(move |c| (r, c)))
        .map(|(r, c)| {
            abs_terms(
                &deq[r * cols..(r + 1) * cols],
                &xs[c * cols..(c + 1) * cols],
            )
        })
        .fold(0f32, f32::max);
    let p4_0 = pack::<P4_0>(&quant::quantize_q4_0(&w), nb);
    let p4_1 = pack::<P4_1>(&quant::quantize_q4_1(&w), nb);
    let p5_0 = pack::<P5_0>(&quant::quantize_q5_0(&w), nb);
    let p5_1 = pack::<P5_1>(&quant::quantize_q5_1(&w), nb);
    let p8_0 = pack::<P8_0>(&quant::quantize_q8_0(&w), nb);
    let p8_r = pack::<P8_0>(&random_q8, nb);
    // The twin itself: each row's unpacked blocks give the plain scalar dot.
    let q5 = quant::quantize_q5_0(&w);
    let mut twin = vec![0f32; 8];
    packed::tile_q5_0(&[&p5_0[0]], &xrows[..1], &mut twin);
    for (i, t) in twin.iter().enumerate() {
        let plain = generic::dot_q5_0(&q5[i * nb..(i + 1) * nb], xrows[0]);
        assert!(
            (t - plain).abs() <= TWIN * terms,
            "twin row {i}: {t} vs {plain}"
        );
    }
    for k in fast_kernels() {
        let kern = Kernels::new(k).expect("available");
        // One to six groups × one token, two groups × one to six tokens.
        for (ng, nc) in (1..=G).map(|g| (g, 1)).chain((1..=tokens).map(|c| (2, c))) {
            let mut got = vec![0f32; 8 * ng * nc];
            let mut want = vec![0f32; 8 * ng * nc];
            let x = &xrows[..nc];
            macro_rules! case {
                ($fast:ident, $twin:ident, $p:expr, $t:expr, $name:literal) => {
                    let w: Vec<&[_]> = $p[..ng].iter().map(|g| &g[..]).collect();
                    (kern.$fast)(&w, x, &mut got);
                    packed::$twin(&w, x, &mut want);
                    check(&got, &want, $t, k, $name, 8 * ng, nc);
                };
            }
            case!(ptile_q4_0, tile_q4_0, p4_0, terms, "packed q4_0");
            case!(ptile_q4_1, tile_q4_1, p4_1, terms, "packed q4_1");
            case!(ptile_q5_0, tile_q5_0, p5_0, terms, "packed q5_0");
            case!(ptile_q5_1, tile_q5_1, p5_1, terms, "packed q5_1");
            case!(ptile_q8_0, tile_q8_0, p8_0, terms, "packed q8_0");
            case!(ptile_q8_0, tile_q8_0, p8_r, rterms, "packed random q8_0");
        }
    }
}

/// K-quants (blocks of 256 under eight activation blocks): the scalar twin against f32 within
/// a bound per format, and every tile shape of every fast set against the twin — on weights
/// whose scales and mins cover their whole range, from real quantizers and from random bytes.
#[test]
fn k_quant_tiles_match_twin_and_f32() {
    let cols = 256 * 3;
    let (rows, tokens) = (8, 4);
    let w = random_f32(9, rows * cols, 1.0);
    let xs = random_f32(10, tokens * cols, 2.0);
    let scalar = Kernels::new(KernelKind::Scalar).expect("scalar");
    let xq = q8(&scalar, &xs);
    let xrows: Vec<&[BlockQ8]> = xq.chunks(cols / 32).collect();
    let nb = cols / 256;
    let q4k = quant::quantize_q4k(&w);
    let q5k = quant::quantize_q5k(&w);
    let q6k = quant::quantize_q6k(&w);
    // Random bytes are valid blocks too (every 6-bit scale and min, negative Q6_K scales); only
    // the f16 scales are set, to finite values.
    let mut rng = Rng::new(11);
    let mut bytes = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.next_u64() as u8).collect() };
    let mut r4k: Vec<BlockQ4K> = quant::as_blocks::<BlockQ4K>(&bytes(rows * nb * 144))
        .expect("blocks")
        .to_vec();
    for b in &mut r4k {
        b.d = quant::f32_to_f16(0.01);
        b.dmin = quant::f32_to_f16(0.02);
    }
    let mut r6k: Vec<BlockQ6K> = quant::as_blocks::<BlockQ6K>(&bytes(rows * nb * 210))
        .expect("blocks")
        .to_vec();
    for b in &mut r6k {
        b.d = quant::f32_to_f16(0.001);
    }
    let mut r5k: Vec<BlockQ5K> = quant::as_blocks::<BlockQ5K>(&bytes(rows * nb * 176))
        .expect("blocks")
        .to_vec();
    for b in &mut r5k {
        b.d = quant::f32_to_f16(0.005);
        b.dmin = quant::f32_to_f16(0.02);
    }
    for (name, data, bound) in [
        ("q4_k", quant::block_bytes(&q4k).to_vec(), DOT_Q4_K),
        ("q5_k", quant::block_bytes(&q5k).to_vec(), DOT_Q5_K),
        ("q6_k", quant::block_bytes(&q6k).to_vec(), DOT_Q6_K),
    ] {
        let ty = match name {
            "q4_k" => GgmlType::Q4K,
            "q5_k" => GgmlType::Q5K,
            _ => GgmlType::Q6K,
        };
        let mut deq = vec![0f32; cols];
        for r in 0..rows {
            let row = &data[r * ty.row_bytes(cols)..(r + 1) * ty.row_bytes(cols)];
            dequantize_row(ty, row, &mut deq);
            for (c, xc) in xrows.iter().enumerate() {
                let x = &xs[c * cols..(c + 1) * cols];
                let got = match ty {
                    GgmlType::Q4K => generic::dot_q4k(quant::as_blocks(row).expect("q4k"), xc),
                    GgmlType::Q5K => generic::dot_q5k(quant::as_blocks(row).expect("q5k"), xc),
                    _ => generic::dot_q6k(quant::as_blocks(row).expect("q6k"), xc),
                };
                let want: f32 = deq.iter().zip(x).map(|(a, b)| a * b).sum();
                let e = (got - want).abs() / (norm(&deq) * norm(x));
                assert!(
                    e < bound,
                    "{name} row {r} token {c}: error vs f32 {e} over {bound}"
                );
                // Against the weights before quantization, looser: the format's own error.
                let orig: f32 = w[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| a * b)
                    .sum();
                let e = (got - orig).abs() / (norm(&w[r * cols..(r + 1) * cols]) * norm(x));
                assert!(
                    e < 4.0 * bound,
                    "{name} row {r} token {c}: error vs original {e}"
                );
            }
        }
    }
    for (label, b4, b5, b6) in [("quantized", q4k, q5k, q6k), ("random", r4k, r5k, r6k)] {
        let w4: Vec<&[BlockQ4K]> = b4.chunks(nb).collect();
        let w5: Vec<&[BlockQ5K]> = b5.chunks(nb).collect();
        let w6: Vec<&[BlockQ6K]> = b6.chunks(nb).collect();
        let mut terms = 0f32;
        for r in 0..rows {
            let mut d4 = vec![0f32; cols];
            let mut d5 = vec![0f32; cols];
            let mut d6 = vec![0f32; cols];
            quant::dequant_q4k(w4[r], &mut d4);
            quant::dequant_q5k(w5[r], &mut d5);
            quant::dequant_q6k(w6[r], &mut d6);
            for c in 0..tokens {
                let x = &xs[c * cols..(c + 1) * cols];
                terms = terms
                    .max(abs_terms(&d4, x))
                    .max(abs_terms(&d5, x))
                    .max(abs_terms(&d6, x));
            }
        }
        for k in fast_kernels() {
            let kern = Kernels::new(k).expect("available");
            for (nr, nc) in [(8, 1), (4, 1), (2, 4), (1, 4), (1, 1), (3, 2), (8, 4)] {
                let mut got = vec![0f32; nr * nc];
                let mut want = vec![0f32; nr * nc];
                (kern.tile_q4k)(&w4[..nr], &xrows[..nc], &mut got);
                generic::tile_q4k(&w4[..nr], &xrows[..nc], &mut want);
                check(&got, &want, terms, k, &format!("{label} q4_k"), nr, nc);
                (kern.tile_q5k)(&w5[..nr], &xrows[..nc], &mut got);
                generic::tile_q5k(&w5[..nr], &xrows[..nc], &mut want);
                check(&got, &want, terms, k, &format!("{label} q5_k"), nr, nc);
                (kern.tile_q6k)(&w6[..nr], &xrows[..nc], &mut got);
                generic::tile_q6k(&w6[..nr], &xrows[..nc], &mut want);
                check(&got, &want, terms, k, &format!("{label} q6_k"), nr, nc);
            }
        }
    }
}

fn check(got: &[f32], want: &[f32], terms: f32, k: KernelKind, ty: &str, nr: usize, nc: usize) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TWIN * terms,
            "{} {ty} tile {nr}x{nc} element {i}: {g} vs {w}",
            k.name()
        );
    }
}

/// The threaded matmul gives the same numbers on 1 and 3 threads, for every weight type, and
/// agrees with f32 products of the dequantized weights.
#[test]
fn matmul_threads_and_types() {
    let (rows, cols, n) = (40, 256, 5);
    let w = random_f32(7, rows * cols, 1.0);
    let x = random_f32(8, n * cols, 1.0);
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        let data = quantize(ty, &w);
        let m = Matrix {
            ty,
            rows,
            cols,
            data: &data,
            packed: false,
        };
        let mut deq = vec![0f32; rows * cols];
        for r in 0..rows {
            dequantize_row(ty, m.row(r), &mut deq[r * cols..(r + 1) * cols]);
        }
        // The same matrix repacked in groups of eight rows, where its type can be.
        let mut pdata = vec![0u64; data.len().div_ceil(8)];
        // SAFETY: the same memory as bytes; u8 has no alignment or validity requirements.
        let pbytes =
            unsafe { std::slice::from_raw_parts_mut(pdata.as_mut_ptr() as *mut u8, data.len()) };
        let mut layouts = vec![m];
        if packed::packable(ty) {
            packed::pack_groups(ty, cols, &data, 0, rows / 8, pbytes);
            layouts.push(Matrix {
                data: pbytes,
                packed: true,
                ..m
            });
            for r in [0, 13, rows - 1] {
                let mut row = vec![0f32; cols];
                layouts[1].dequantize_row(r, &mut row);
                assert_eq!(
                    row,
                    deq[r * cols..(r + 1) * cols],
                    "{} packed row {r}",
                    ty.name()
                );
            }
        }
        for (k, m) in [KernelKind::Reference, KernelKind::best()]
            .into_iter()
            .flat_map(|k| layouts.iter().map(move |m| (k, m)))
        {
            let kern = Kernels::new(k).expect("available");
            let xq = q8(&Kernels::new(KernelKind::Scalar).expect("scalar"), &x);
            let acts = Acts {
                n,
                cols,
                f: &x,
                q: &xq,
            };
            let mut outs = Vec::new();
            for threads in [1, 3] {
                let mut pool = Pool::new(threads).expect("pool");
                let mut out = vec![0f32; n * rows];
                let mut scratch = vec![0f32; threads * cols];
                matmul(
                    &mut pool,
                    &kern,
                    &acts,
                    &mut [(m, &mut out[..])],
                    &mut scratch,
                );
                outs.push(out);
            }
            assert_eq!(
                outs[0],
                outs[1],
                "{} {} (packed: {}): threads disagree",
                ty.name(),
                k.name(),
                m.packed
            );
            for t in 0..n {
                for r in 0..rows {
                    let want: f32 = deq[r * cols..(r + 1) * cols]
                        .iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(a, b)| a * b)
                        .sum();
                    let got = outs[0][t * rows + r];
                    let scale =
                        norm(&deq[r * cols..(r + 1) * cols]) * norm(&x[t * cols..(t + 1) * cols]);
                    // Exact mode is f32 throughout; the fast path quantizes activations.
                    let bound = if k == KernelKind::Reference {
                        1e-5
                    } else {
                        0.02
                    };
                    assert!(
                        (got - want).abs() <= bound * scale,
                        "{} {} (packed: {}): row {r} token {t}: {got} vs {want}",
                        ty.name(),
                        k.name(),
                        m.packed
                    );
                }
            }
        }
    }
}

/// The attention kernels of every fast set against their scalar twins: scores over strided key
/// rows, `exp(s − max)` with its sum (down to where e^x underflows), and the weighted sums of f32
/// and q8_0 value rows, at head sizes that take the wide, narrow and scalar-tail paths.
#[test]
fn attention_kernels_match_twin() {
    let stride = 200;
    let rows = 37;
    let kv = random_f32(11, rows * stride, 1.0);
    let q8v = quant::quantize_q8_0(&kv);
    let kv16: Vec<u16> = kv.iter().map(|&x| quant::f32_to_f16(x)).collect();
    let kv16f: Vec<f32> = kv16.iter().map(|&h| quant::f16_to_f32(h)).collect();
    for k in fast_kernels() {
        let kern = Kernels::new(k).expect("available");
        for hd in [64, 40, 13] {
            let q = random_f32(12 + hd as u64, hd, 1.0);
            let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
            generic::scores_f32(&q, &kv[3..], stride, &mut a);
            (kern.scores_f32)(&q, &kv[3..], stride, &mut b);
            let terms: f32 = (0..rows)
                .map(|j| abs_terms(&q, &kv[3 + j * stride..3 + j * stride + hd]))
                .sum();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= TWIN * terms, "{} scores hd {hd}", k.name());
            }

            let p: Vec<f32> = random_f32(13, rows, 1.0).iter().map(|v| v.abs()).collect();
            let init = random_f32(14, hd, 1.0);
            let (mut a, mut b) = (init.clone(), init.clone());
            generic::acc_f32(&p, &kv[5..], stride, &mut a);
            (kern.acc_f32)(&p, &kv[5..], stride, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * rows as f32,
                    "{} acc_f32 hd {hd}",
                    k.name()
                );
            }

            // f16 rows: the twin, and the f32 kernel on the same values widened.
            let (mut a, mut b, mut c) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
            generic::scores_f16(&q, &kv16[3..], stride, &mut a);
            (kern.scores_f16)(&q, &kv16[3..], stride, &mut b);
            generic::scores_f32(&q, &kv16f[3..], stride, &mut c);
            for ((x, y), z) in a.iter().zip(&b).zip(&c) {
                assert!(
                    (x - y).abs() <= TWIN * terms,
                    "{} scores_f16 hd {hd}",
                    k.name()
                );
                assert!(
                    (x - z).abs() <= TWIN * terms,
                    "{} scores_f16 widening",
                    k.name()
                );
            }
            let (mut a, mut b, mut c) = (init.clone(), init.clone(), init.clone());
            generic::acc_f16(&p, &kv16[5..], stride, &mut a);
            (kern.acc_f16)(&p, &kv16[5..], stride, &mut b);
            generic::acc_f32(&p, &kv16f[5..], stride, &mut c);
            for ((x, y), z) in a.iter().zip(&b).zip(&c) {
                let bound = 1e-5 * rows as f32;
                assert!((x - y).abs() <= bound, "{} acc_f16 hd {hd}", k.name());
                assert!((x - z).abs() <= bound, "{} acc_f16 widening", k.name());
            }
        }
        for hd in [64, 96, 32] {
            // q8_0 rows: `stride` floats are stride / 32 blocks apart.
            let per = stride / 32;
            let rows = 20;
            let p: Vec<f32> = random_f32(15, rows, 1.0).iter().map(|v| v.abs()).collect();
            let init = random_f32(16, hd, 1.0);
            let (mut a, mut b) = (init.clone(), init.clone());
            generic::acc_q8_0(&p, &q8v[1..], per, &mut a);
            (kern.acc_q8_0)(&p, &q8v[1..], per, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * rows as f32,
                    "{} acc_q8_0 hd {hd}",
                    k.name()
                );
            }
        }
        // exp: 37 values (vector body and tail), from 0 down past the underflow bound.
        let s0: Vec<f32> = (0..37).map(|i| 3.0 - i as f32 * 2.7).collect();
        let (mut a, mut b) = (s0.clone(), s0.clone());
        let sa = generic::exp_sum(&mut a, 3.0);
        let sb = (kern.exp_sum)(&mut b, 3.0);
        assert!(
            (sa - sb).abs() <= 1e-6 * sa,
            "{} exp sum {sb} vs {sa}",
            k.name()
        );
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * x.max(1e-30),
                "{} exp {y} vs {x}",
                k.name()
            );
        }
        assert_eq!(b[0], 1.0, "{}: exp(0)", k.name());
    }
}

/// Every attention kernel set refuses key rows past the end of the cache instead of reading them.
#[test]
fn attention_kernels_refuse_rows_out_of_bounds() {
    for k in fast_kernels() {
        let kern = Kernels::new(k).expect("available");
        let kv = vec![1f32; 100];
        let q = vec![1f32; 64];
        let r = std::panic::catch_unwind(|| {
            let mut out = vec![0f32; 2];
            (kern.scores_f32)(&q, &kv, 64, &mut out);
        });
        assert!(r.is_err(), "{}: 2 rows of 64 from 100 values", k.name());
        let kv16 = vec![0u16; 100];
        let r = std::panic::catch_unwind(|| {
            let mut out = vec![0f32; 2];
            (kern.scores_f16)(&q, &kv16, 64, &mut out);
        });
        assert!(r.is_err(), "{}: 2 f16 rows of 64 from 100 values", k.name());
        let r = std::panic::catch_unwind(|| {
            let mut out = vec![0f32; 64];
            (kern.acc_f16)(&[1.0, 1.0], &kv16, 64, &mut out);
        });
        assert!(
            r.is_err(),
            "{}: acc over 2 f16 rows of 64 from 100",
            k.name()
        );
    }
}
