//! Scalar reference kernels: the twins every SIMD kernel is tested against, and the kernels of
//! the `scalar` set on CPUs without a SIMD port. Written for clarity, not speed.

use super::quant::{f16_to_f32, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ8, BlockQ8_0, QK};

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
        let qh = u32::from_le_bytes(b.qh);
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            s += (((b.qs[j] & 0x0f) as u32 | h0) as i32 - 16) * y.qs[j] as i32;
            s += (((b.qs[j] >> 4) as u32 | h1) as i32 - 16) * y.qs[j + QK / 2] as i32;
        }
        acc += f16_to_f32(b.d) * y.d * s as f32;
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

// Attention kernels. `k`/`v` hold cached rows `stride` elements (or blocks) apart; row `j` of a
// head starts at `j * stride`.

/// Scores of one query head against `out.len()` cached key rows: `out[j] = q · k[j]`.
pub fn scores_f32(q: &[f32], k: &[f32], stride: usize, out: &mut [f32]) {
    let hd = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_f32(q, &k[j * stride..j * stride + hd]);
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
