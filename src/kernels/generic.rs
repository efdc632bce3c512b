//! Scalar reference kernels: the twins every SIMD kernel is tested against, and the kernels of
//! the `scalar` set on CPUs without a SIMD port. Written for clarity, not speed.

use super::quant::{
    f16_to_f32, q4k_scale_min, q5_values, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0,
    BlockQ5_1, BlockQ6K, BlockQ8, BlockQ8_0, QK,
};

/// Quantizes activations to 8 bits per block of 32 (symmetric, round to nearest).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (c, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(c) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

pub fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.iter().zip(x) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            s += ((b.qs[j] & 0x0f) as i32 - 8) * y.qs[j] as i32;
            s += ((b.qs[j] >> 4) as i32 - 8) * y.qs[j + QK / 2] as i32;
        }
        acc += f16_to_f32(b.d) * y.d * s as f32;
    }
    acc
}

pub fn dot_q4_1(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.iter().zip(x) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            s += (b.qs[j] & 0x0f) as i32 * y.qs[j] as i32;
            s += (b.qs[j] >> 4) as i32 * y.qs[j + QK / 2] as i32;
        }
        acc += f16_to_f32(b.d) * y.d * s as f32 + f16_to_f32(b.m) * y.s;
    }
    acc
}

pub fn dot_q5_0(w: &[BlockQ5_0], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.iter().zip(x) {
        let s: i32 = q5_values(&b.qs, b.qh)
            .iter()
            .zip(&y.qs)
            .map(|(&v, &a)| (v as i32 - 16) * a as i32)
            .sum();
        acc += f16_to_f32(b.d) * y.d * s as f32;
    }
    acc
}

pub fn dot_q5_1(w: &[BlockQ5_1], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.iter().zip(x) {
        let s: i32 = q5_values(&b.qs, b.qh)
            .iter()
            .zip(&y.qs)
            .map(|(&v, &a)| v as i32 * a as i32)
            .sum();
        acc += f16_to_f32(b.d) * y.d * s as f32 + f16_to_f32(b.m) * y.s;
    }
    acc
}

pub fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.iter().zip(x) {
        let mut s = 0i32;
        for j in 0..QK {
            s += b.qs[j] as i32 * y.qs[j] as i32;
        }
        acc += f16_to_f32(b.d) * y.d * s as f32;
    }
    acc
}

/// Q4_K against 8-bit activations: sub-block j (32 weights) of a block meets activation block
/// j of its eight, with weight `d·sc_j·q − dmin·m_j`, so its dot is
/// `d·sc_j·dy·Σq·y − dmin·m_j·s` (`s` = dy·Σy, carried by the activation block).
pub fn dot_q4k(w: &[BlockQ4K], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, ys) in w.iter().zip(x.chunks_exact(8)) {
        let (d, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
        for (j, y) in ys.iter().enumerate() {
            let (sc, m) = q4k_scale_min(j, &b.scales);
            let q = &b.qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let shift = 4 * (j % 2);
            let s: i32 = q
                .iter()
                .zip(&y.qs)
                .map(|(&w, &a)| ((w >> shift) & 0x0f) as i32 * a as i32)
                .sum();
            acc += d * sc as f32 * y.d * s as f32 - dmin * m as f32 * y.s;
        }
    }
    acc
}

/// Q5_K: Q4_K with a fifth bit (bit j of qh[l] for element l of sub-block j).
pub fn dot_q5k(w: &[BlockQ5K], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, ys) in w.iter().zip(x.chunks_exact(8)) {
        let (d, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
        for (j, y) in ys.iter().enumerate() {
            let (sc, m) = q4k_scale_min(j, &b.scales);
            let q = &b.qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let shift = 4 * (j % 2);
            let s: i32 = (0..32)
                .map(|l| {
                    let v = ((q[l] >> shift) & 0x0f) | (((b.qh[l] >> j) & 1) << 4);
                    v as i32 * y.qs[l] as i32
                })
                .sum();
            acc += d * sc as f32 * y.d * s as f32 - dmin * m as f32 * y.s;
        }
    }
    acc
}

/// The 32 six-bit weights (`q − 32`) of sub-block `j` (0..8) of a Q6_K block, and the indices
/// of the scales of its two halves of 16.
pub fn q6k_sub(b: &BlockQ6K, j: usize) -> ([i8; 32], [usize; 2]) {
    let (n, t) = (j / 4, j % 4);
    let ql = &b.ql[n * 64 + (t % 2) * 32..n * 64 + (t % 2) * 32 + 32];
    let qh = &b.qh[n * 32..n * 32 + 32];
    let (sl, sh) = (4 * (t / 2), 2 * t);
    let mut q = [0i8; 32];
    for l in 0..32 {
        q[l] = ((((ql[l] >> sl) & 0x0f) | (((qh[l] >> sh) & 3) << 4)) as i32 - 32) as i8;
    }
    (q, [n * 8 + 2 * t, n * 8 + 2 * t + 1])
}

/// Q6_K against 8-bit activations: weight `d·sc·(q − 32)` with one scale per 16.
pub fn dot_q6k(w: &[BlockQ6K], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, ys) in w.iter().zip(x.chunks_exact(8)) {
        let d = f16_to_f32(b.d);
        for (j, y) in ys.iter().enumerate() {
            let (q, sc) = q6k_sub(b, j);
            let mut s = [0i32; 2];
            for (l, (&w, &a)) in q.iter().zip(&y.qs).enumerate() {
                s[l / 16] += w as i32 * a as i32;
            }
            let s = b.scales[sc[0]] as i32 * s[0] + b.scales[sc[1]] as i32 * s[1];
            acc += d * y.d * s as f32;
        }
    }
    acc
}

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (x, y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// A tile of dot products: `out[r * x.len() + c] = dot(w[r], x[c])`. The SIMD kernels compute
/// whole tiles at once (sharing unpacked weights across tokens and loaded activations across
/// rows); this is their twin, and the fallback for any shape.
#[inline]
pub fn tile<B>(dot: fn(&[B], &[BlockQ8]) -> f32, w: &[&[B]], x: &[&[BlockQ8]], out: &mut [f32]) {
    let nc = x.len();
    for (r, wr) in w.iter().enumerate() {
        for (c, xc) in x.iter().enumerate() {
            out[r * nc + c] = dot(wr, xc);
        }
    }
}

pub fn tile_q4_0(w: &[&[BlockQ4_0]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(dot_q4_0, w, x, out)
}

pub fn tile_q4_1(w: &[&[BlockQ4_1]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(dot_q4_1, w, x, out)
}

pub fn tile_q8_0(w: &[&[BlockQ8_0]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(dot_q8_0, w, x, out)
}

pub fn tile_q5_0(w: &[&[BlockQ5_0]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(dot_q5_0, w, x, out)
}

pub fn tile_q5_1(w: &[&[BlockQ5_1]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(dot_q5_1, w, x, out)
}

pub fn tile_q5k(w: &[&[BlockQ5K]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(dot_q5k, w, x, out)
}

pub fn tile_q4k(w: &[&[BlockQ4K]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(dot_q4k, w, x, out)
}

pub fn tile_q6k(w: &[&[BlockQ6K]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(dot_q6k, w, x, out)
}

// Attention kernels. `k`/`v` hold cached rows `stride` elements (or blocks) apart; row `j` of a
// head starts at `j * stride`.

/// Scores of one query head against `out.len()` cached key rows: `out[j] = q · k[j]`.
pub fn scores_f32(q: &[f32], k: &[f32], stride: usize, out: &mut [f32]) {
    let hd = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_f32(q, &k[j * stride..j * stride + hd]);
    }
}

/// [`scores_f32`] over f16 key rows (the bits, as the KV cache stores them).
pub fn scores_f16(q: &[f32], k: &[u16], stride: usize, out: &mut [f32]) {
    let hd = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = q
            .iter()
            .zip(&k[j * stride..j * stride + hd])
            .map(|(&a, &b)| a * f16_to_f32(b))
            .sum();
    }
}

/// `s[j] = exp(s[j] − max)`, returning their sum.
pub fn exp_sum(s: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// `out += Σ_j p[j] · v[j]` over `p.len()` cached value rows of `out.len()` elements.
pub fn acc_f32(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    for (j, &pj) in p.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&v[j * stride..j * stride + hd]) {
            *o += pj * x;
        }
    }
}

/// [`acc_f32`] over f16 value rows.
pub fn acc_f16(p: &[f32], v: &[u16], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    for (j, &pj) in p.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&v[j * stride..j * stride + hd]) {
            *o += pj * f16_to_f32(x);
        }
    }
}

/// [`acc_f32`] over q8_0 value rows (`stride` in blocks; `out.len()` a multiple of 32).
pub fn acc_q8_0(p: &[f32], v: &[BlockQ8_0], stride: usize, out: &mut [f32]) {
    let nb = out.len() / QK;
    for (j, &pj) in p.iter().enumerate() {
        for (ob, b) in out
            .chunks_exact_mut(QK)
            .zip(&v[j * stride..j * stride + nb])
        {
            let f = pj * f16_to_f32(b.d);
            for (o, &q) in ob.iter_mut().zip(&b.qs) {
                *o += f * q as f32;
            }
        }
    }
}
