//! aarch64 kernels: plain NEON (every ARMv8-A core, e.g. Cortex-A53) and a variant with the
//! ARMv8.2 dot-product instruction `sdot` (Cortex-A55/A76, RK3588, Pi 5). Same operations as
//! `generic.rs`, same names. `vdotq_s32` is unstable in Rust, so `sdot` is stable inline asm.
//!
//! The safe wrappers at the bottom are installed in a kernel table only after
//! `is_aarch64_feature_detected!` confirmed the features (see `mod.rs`).

use std::arch::aarch64::*;
use std::arch::asm;

use super::quant::{
    f16_to_f32, q4k_scale_min, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8, BlockQ8_0, QK,
};

/// Sum of products of 32 signed bytes, 4 i32 lanes, with widening multiplies (no dotprod).
/// |a·b| ≤ 127·128·2 per i16 lane: no overflow for activations in [-127, 127].
#[inline(always)]
unsafe fn dot32_plain(a0: int8x16_t, a1: int8x16_t, b0: int8x16_t, b1: int8x16_t) -> int32x4_t {
    let p0 = vmlal_s8(
        vmull_s8(vget_low_s8(a0), vget_low_s8(b0)),
        vget_high_s8(a0),
        vget_high_s8(b0),
    );
    let p1 = vmlal_s8(
        vmull_s8(vget_low_s8(a1), vget_low_s8(b1)),
        vget_high_s8(a1),
        vget_high_s8(b1),
    );
    vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1))
}

#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` is available (target feature above); register-only, no memory access.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot32_sdot(a0: int8x16_t, a1: int8x16_t, b0: int8x16_t, b1: int8x16_t) -> int32x4_t {
    sdot(sdot(vdupq_n_s32(0), a0, b0), a1, b1)
}

/// Q4 nibbles of one block as two vectors of 16 bytes: elements 0..16 and 16..32.
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> (uint8x16_t, uint8x16_t) {
    let v = vld1q_u8(qs.as_ptr());
    (vandq_u8(v, vdupq_n_u8(0x0f)), vshrq_n_u8(v, 4))
}

#[inline(always)]
unsafe fn load_y(y: &BlockQ8) -> (int8x16_t, int8x16_t) {
    (vld1q_s8(y.qs.as_ptr()), vld1q_s8(y.qs.as_ptr().add(16)))
}

/// Fifth bits of a Q5_0 or Q5_1 block, one per byte at bit 4: byte j is bit j of `qh` (bytes
/// 0..16 go with the low nibbles, 16..32 with the high ones).
#[inline(always)]
fn fifth_bits(qh: [u8; 4]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh);
    let mut h = [0u8; 32];
    for (j, hj) in h.iter_mut().enumerate() {
        *hj = (((qh >> j) & 1) << 4) as u8;
    }
    h
}

macro_rules! neon_kernels {
    ($dot32:ident, $feat:literal, $q4_0:ident, $q4_1:ident, $q5_0:ident, $q5_1:ident, $q8_0:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $q4_0(w: &[BlockQ4_0], x: &[BlockQ8]) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            let off = vdupq_n_s8(8);
            for (b, y) in w.iter().zip(x) {
                let (lo, hi) = nibbles(&b.qs);
                let lo = vsubq_s8(vreinterpretq_s8_u8(lo), off);
                let hi = vsubq_s8(vreinterpretq_s8_u8(hi), off);
                let (y0, y1) = load_y(y);
                let p = vcvtq_f32_s32($dot32(lo, hi, y0, y1));
                acc = vmlaq_n_f32(acc, p, f16_to_f32(b.d) * y.d);
            }
            vaddvq_f32(acc)
        }

        #[target_feature(enable = $feat)]
        unsafe fn $q4_1(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            let mut summs = 0f32;
            for (b, y) in w.iter().zip(x) {
                let (lo, hi) = nibbles(&b.qs);
                let (y0, y1) = load_y(y);
                let p = vcvtq_f32_s32($dot32(
                    vreinterpretq_s8_u8(lo),
                    vreinterpretq_s8_u8(hi),
                    y0,
                    y1,
                ));
                acc = vmlaq_n_f32(acc, p, f16_to_f32(b.d) * y.d);
                summs += f16_to_f32(b.m) * y.s;
            }
            vaddvq_f32(acc) + summs
        }

        #[target_feature(enable = $feat)]
        unsafe fn $q5_0(w: &[BlockQ5_0], x: &[BlockQ8]) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            for (b, y) in w.iter().zip(x) {
                let (lo, hi) = nibbles(&b.qs);
                let h = fifth_bits(b.qh);
                let lo = vorrq_u8(lo, vld1q_u8(h.as_ptr()));
                let hi = vorrq_u8(hi, vld1q_u8(h.as_ptr().add(16)));
                let off = vdupq_n_s8(16);
                let lo = vsubq_s8(vreinterpretq_s8_u8(lo), off);
                let hi = vsubq_s8(vreinterpretq_s8_u8(hi), off);
                let (y0, y1) = load_y(y);
                let p = vcvtq_f32_s32($dot32(lo, hi, y0, y1));
                acc = vmlaq_n_f32(acc, p, f16_to_f32(b.d) * y.d);
            }
            vaddvq_f32(acc)
        }

        #[target_feature(enable = $feat)]
        unsafe fn $q5_1(w: &[BlockQ5_1], x: &[BlockQ8]) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            let mut summs = 0f32;
            for (b, y) in w.iter().zip(x) {
                let (lo, hi) = nibbles(&b.qs);
                let h = fifth_bits(b.qh);
                // Unsigned 0..32: as signed bytes they are the same values.
                let lo = vreinterpretq_s8_u8(vorrq_u8(lo, vld1q_u8(h.as_ptr())));
                let hi = vreinterpretq_s8_u8(vorrq_u8(hi, vld1q_u8(h.as_ptr().add(16))));
                let (y0, y1) = load_y(y);
                let p = vcvtq_f32_s32($dot32(lo, hi, y0, y1));
                acc = vmlaq_n_f32(acc, p, f16_to_f32(b.d) * y.d);
                summs += f16_to_f32(b.m) * y.s;
            }
            vaddvq_f32(acc) + summs
        }

        #[target_feature(enable = $feat)]
        unsafe fn $q8_0(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            for (b, y) in w.iter().zip(x) {
                let a0 = vld1q_s8(b.qs.as_ptr());
                let a1 = vld1q_s8(b.qs.as_ptr().add(16));
                let (y0, y1) = load_y(y);
                let p = vcvtq_f32_s32($dot32(a0, a1, y0, y1));
                acc = vmlaq_n_f32(acc, p, f16_to_f32(b.d) * y.d);
            }
            vaddvq_f32(acc)
        }
    };
}

neon_kernels!(
    dot32_plain,
    "neon",
    dot_q4_0_plain,
    dot_q4_1_plain,
    dot_q5_0_plain,
    dot_q5_1_plain,
    dot_q8_0_plain
);
neon_kernels!(
    dot32_sdot,
    "neon,dotprod",
    dot_q4_0_dp,
    dot_q4_1_dp,
    dot_q5_0_dp,
    dot_q5_1_dp,
    dot_q8_0_dp
);

/// Elements the f32 loops read: f32 itself, or f16 bits (the KV cache), widened 4 at a time.
trait Lanes: Copy {
    unsafe fn load4(p: *const Self) -> float32x4_t;
    fn f32(self) -> f32;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> float32x4_t {
        vld1q_f32(p)
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Lanes for u16 {
    /// `fcvtl` (base ARMv8 SIMD) widens four f16 to f32; Rust's f16 vector types are unstable.
    #[inline(always)]
    unsafe fn load4(p: *const u16) -> float32x4_t {
        let h = vld1_u16(p);
        let out: float32x4_t;
        // SAFETY: register-only conversion; NEON is a baseline aarch64 feature.
        unsafe {
            asm!(
                "fcvtl {o:v}.4s, {h:v}.4h",
                o = lateout(vreg) out,
                h = in(vreg) h,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        out
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        f16_to_f32(self)
    }
}

/// `Σ a[i]·b[i]` over `n` elements. Caller: `n ≤ a.len()` and `n` elements readable at `b`.
#[inline(always)]
unsafe fn dot_lanes<E: Lanes>(a: &[f32], pb: *const E, n: usize) -> f32 {
    let pa = a.as_ptr();
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let o = i + 4 * k;
            *acc = vfmaq_f32(*acc, vld1q_f32(pa.add(o)), E::load4(pb.add(o)));
        }
        i += 16;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        s += a[i] * (*pb.add(i)).f32();
        i += 1;
    }
    s
}

#[target_feature(enable = "neon")]
unsafe fn dot_f32_imp(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b.as_ptr(), a.len().min(b.len()))
}

#[target_feature(enable = "neon")]
unsafe fn quantize_q8_imp(x: &[f32], out: &mut [BlockQ8]) {
    for (c, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let p = c.as_ptr();
        let v = [
            vld1q_f32(p),
            vld1q_f32(p.add(4)),
            vld1q_f32(p.add(8)),
            vld1q_f32(p.add(12)),
            vld1q_f32(p.add(16)),
            vld1q_f32(p.add(20)),
            vld1q_f32(p.add(24)),
            vld1q_f32(p.add(28)),
        ];
        let mut m = vabsq_f32(v[0]);
        for vk in &v[1..] {
            m = vmaxq_f32(m, vabsq_f32(*vk));
        }
        let amax = vmaxvq_f32(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = vdupq_n_s32(0);
        for (k, vk) in v.iter().enumerate() {
            // vcvtaq: round to nearest, ties away from zero, like f32::round.
            let q = vcvtaq_s32_f32(vmulq_n_f32(*vk, id));
            sum = vaddq_s32(sum, q);
            let q16 = vqmovn_s32(q);
            let q8 = vqmovn_s16(vcombine_s16(q16, q16));
            let lanes: [i8; 8] = std::mem::transmute(q8);
            b.qs[4 * k..4 * k + 4].copy_from_slice(&lanes[..4]);
        }
        b.d = d;
        b.s = d * vaddvq_s32(sum) as f32;
    }
}

/// Scores against `out.len()` key rows `stride` apart. Caller: `(out.len() − 1) · stride +
/// q.len() ≤ k.len()`.
#[target_feature(enable = "neon")]
unsafe fn scores_imp<E: Lanes>(q: &[f32], k: &[E], stride: usize, out: &mut [f32]) {
    let hd = q.len();
    let pk = k.as_ptr();
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_lanes(q, pk.add(j * stride), hd);
    }
}

/// e^x for x ≤ 0 lanes, as the AVX2 kernel: Cody–Waite reduction, Cephes' `expf` polynomial,
/// times 2^n. Relative error about 2e-7.
#[inline(always)]
unsafe fn exp_ps(x: float32x4_t) -> float32x4_t {
    let x = vmaxq_f32(x, vdupq_n_f32(-87.336_54));
    let ni = vcvtnq_s32_f32(vmulq_n_f32(x, std::f32::consts::LOG2_E));
    let n = vcvtq_f32_s32(ni);
    let r = vfmsq_f32(x, n, vdupq_n_f32(0.693_359_4));
    let r = vfmsq_f32(r, n, vdupq_n_f32(-2.121_944_4e-4));
    let mut y = vdupq_n_f32(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = vfmaq_f32(vdupq_n_f32(c), y, r);
    }
    let y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), y, vmulq_f32(r, r));
    let e = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(ni, vdupq_n_s32(127))));
    vmulq_f32(y, e)
}

#[target_feature(enable = "neon")]
unsafe fn exp_sum_imp(s: &mut [f32], max: f32) -> f32 {
    let n = s.len();
    let p = s.as_mut_ptr();
    let m = vdupq_n_f32(max);
    let mut acc = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 4 <= n {
        let e = exp_ps(vsubq_f32(vld1q_f32(p.add(i)), m));
        vst1q_f32(p.add(i), e);
        acc = vaddq_f32(acc, e);
        i += 4;
    }
    let mut sum = vaddvq_f32(acc);
    for v in &mut s[i..] {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// `out[o..o + 4·A] += Σ_j p[j] · v[j][o..]`, A registers of accumulators.
#[inline(always)]
unsafe fn acc_seg<E: Lanes, const A: usize>(p: &[f32], v: *const E, stride: usize, out: *mut f32) {
    let mut acc = [vdupq_n_f32(0.0); A];
    for (a, acc) in acc.iter_mut().enumerate() {
        *acc = vld1q_f32(out.add(4 * a));
    }
    for (j, &pj) in p.iter().enumerate() {
        let row = v.add(j * stride);
        for (a, acc) in acc.iter_mut().enumerate() {
            *acc = vfmaq_n_f32(*acc, E::load4(row.add(4 * a)), pj);
        }
    }
    for (a, acc) in acc.iter().enumerate() {
        vst1q_f32(out.add(4 * a), *acc);
    }
}

/// Caller: `(p.len() − 1) · stride + out.len() ≤ v.len()`.
#[target_feature(enable = "neon")]
unsafe fn acc_imp<E: Lanes>(p: &[f32], v: &[E], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    let (pv, po) = (v.as_ptr(), out.as_mut_ptr());
    let mut o = 0;
    while o + 64 <= hd {
        acc_seg::<E, 16>(p, pv.add(o), stride, po.add(o));
        o += 64;
    }
    while o + 4 <= hd {
        acc_seg::<E, 1>(p, pv.add(o), stride, po.add(o));
        o += 4;
    }
    for (j, &pj) in p.iter().enumerate() {
        for i in o..hd {
            *po.add(i) += pj * (*pv.add(j * stride + i)).f32();
        }
    }
}

/// `out[32·b0..32·(b0 + B)] += Σ_j p[j] · dequant(v[j][b0..b0 + B])`.
#[inline(always)]
unsafe fn acc_q8_0_seg<const B: usize>(
    p: &[f32],
    v: *const BlockQ8_0,
    stride: usize,
    out: *mut f32,
) {
    let mut acc = [[vdupq_n_f32(0.0); 8]; B];
    for (b, acc) in acc.iter_mut().enumerate() {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = vld1q_f32(out.add(QK * b + 4 * i));
        }
    }
    for (j, &pj) in p.iter().enumerate() {
        let row = v.add(j * stride);
        for (b, acc) in acc.iter_mut().enumerate() {
            let blk = &*row.add(b);
            let f = pj * f16_to_f32(blk.d);
            let q = blk.qs.as_ptr();
            for h in 0..2 {
                let x = vld1q_s8(q.add(16 * h));
                for (k, w) in [vmovl_s8(vget_low_s8(x)), vmovl_s8(vget_high_s8(x))]
                    .into_iter()
                    .enumerate()
                {
                    let lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
                    let hi = vcvtq_f32_s32(vmovl_s16(vget_high_s16(w)));
                    let i = 4 * h + 2 * k;
                    acc[i] = vfmaq_n_f32(acc[i], lo, f);
                    acc[i + 1] = vfmaq_n_f32(acc[i + 1], hi, f);
                }
            }
        }
    }
    for (b, acc) in acc.iter().enumerate() {
        for (i, a) in acc.iter().enumerate() {
            vst1q_f32(out.add(QK * b + 4 * i), *a);
        }
    }
}

/// Caller: `out.len()` a multiple of 32, `(p.len() − 1) · stride + out.len() / 32 ≤ v.len()`.
#[target_feature(enable = "neon")]
unsafe fn acc_q8_0_imp(p: &[f32], v: &[BlockQ8_0], stride: usize, out: &mut [f32]) {
    let nb = out.len() / QK;
    let (pv, po) = (v.as_ptr(), out.as_mut_ptr());
    let mut b = 0;
    while b + 2 <= nb {
        acc_q8_0_seg::<2>(p, pv.add(b), stride, po.add(QK * b));
        b += 2;
    }
    if b < nb {
        acc_q8_0_seg::<1>(p, pv.add(b), stride, po.add(QK * b));
    }
}

// Safe wrappers, installed only after detection (see `Kernels::neon*`).

pub(super) fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe { dot_q4_0_plain(w, x) }
}
pub(super) fn dot_q4_1(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q4_1_plain(w, x) }
}
pub(super) fn dot_q5_0(w: &[BlockQ5_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q5_0_plain(w, x) }
}
pub(super) fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q8_0_plain(w, x) }
}
pub(super) fn dot_q4_0_dotprod(w: &[BlockQ4_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: only reachable through the dotprod table, built after feature detection.
    unsafe { dot_q4_0_dp(w, x) }
}
pub(super) fn dot_q4_1_dotprod(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q4_1_dp(w, x) }
}
pub(super) fn dot_q5_0_dotprod(w: &[BlockQ5_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q5_0_dp(w, x) }
}
pub(super) fn dot_q8_0_dotprod(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q8_0_dp(w, x) }
}
pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe { dot_f32_imp(a, b) }
}
pub(super) fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    // SAFETY: as above.
    unsafe { quantize_q8_imp(x, out) }
}

/// Sum of products of 16 signed bytes into 4 i32 lanes, without dotprod.
#[inline(always)]
unsafe fn dot16_plain(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    vpaddlq_s16(vmlal_s8(
        vmull_s8(vget_low_s8(a), vget_low_s8(b)),
        vget_high_s8(a),
        vget_high_s8(b),
    ))
}

#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot16_sdot(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    sdot(vdupq_n_s32(0), a, b)
}

/// Sub-block j (0..8) of a Q6_K block: its 32 weights `q − 32` as two vectors of 16.
#[inline(always)]
unsafe fn q6k_sub(b: &BlockQ6K, j: usize) -> (int8x16_t, int8x16_t) {
    let (n, t) = (j / 4, j % 4);
    let pl = b.ql.as_ptr().add(n * 64 + (t % 2) * 32);
    let ph = b.qh.as_ptr().add(n * 32);
    let (l0, l1) = (vld1q_u8(pl), vld1q_u8(pl.add(16)));
    let (l0, l1) = if t / 2 == 0 {
        (
            vandq_u8(l0, vdupq_n_u8(0x0f)),
            vandq_u8(l1, vdupq_n_u8(0x0f)),
        )
    } else {
        (vshrq_n_u8(l0, 4), vshrq_n_u8(l1, 4))
    };
    // (qh >> 2t) & 3, moved to bits 4..6: a right shift is a left shift by a negative count.
    let sh = vdupq_n_s8(-2 * t as i8);
    let h = |v: uint8x16_t| vshlq_n_u8(vandq_u8(vshlq_u8(v, sh), vdupq_n_u8(3)), 4);
    let (h0, h1) = (h(vld1q_u8(ph)), h(vld1q_u8(ph.add(16))));
    let off = vdupq_n_s8(32);
    (
        vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l0, h0)), off),
        vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l1, h1)), off),
    )
}

macro_rules! neon_k_kernels {
    ($dot32:ident, $dot16:ident, $feat:literal, $q4k:ident, $q5k:ident, $q6k:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $q4k(w: &[BlockQ4K], x: &[BlockQ8]) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            let mut summs = 0f32;
            for (b, ys) in w.iter().zip(x.chunks_exact(8)) {
                let (d, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
                for c in 0..4 {
                    let p = b.qs.as_ptr().add(c * 32);
                    let (v0, v1) = (vld1q_u8(p), vld1q_u8(p.add(16)));
                    let m = vdupq_n_u8(0x0f);
                    let halves = [
                        (vandq_u8(v0, m), vandq_u8(v1, m)),
                        (vshrq_n_u8(v0, 4), vshrq_n_u8(v1, 4)),
                    ];
                    for (h, (a0, a1)) in halves.into_iter().enumerate() {
                        let j = 2 * c + h;
                        let y = &ys[j];
                        let (sc, mn) = q4k_scale_min(j, &b.scales);
                        let (y0, y1) = load_y(y);
                        let s = $dot32(vreinterpretq_s8_u8(a0), vreinterpretq_s8_u8(a1), y0, y1);
                        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), d * sc as f32 * y.d);
                        summs += dmin * mn as f32 * y.s;
                    }
                }
            }
            vaddvq_f32(acc) - summs
        }

        #[target_feature(enable = $feat)]
        unsafe fn $q5k(w: &[BlockQ5K], x: &[BlockQ8]) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            let mut summs = 0f32;
            let (m4, one) = (vdupq_n_u8(0x0f), vdupq_n_u8(1));
            for (b, ys) in w.iter().zip(x.chunks_exact(8)) {
                let (d, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
                let (h0, h1) = (vld1q_u8(b.qh.as_ptr()), vld1q_u8(b.qh.as_ptr().add(16)));
                for (j, y) in ys.iter().enumerate() {
                    let p = b.qs.as_ptr().add((j / 2) * 32);
                    let (v0, v1) = (vld1q_u8(p), vld1q_u8(p.add(16)));
                    let (v0, v1) = if j % 2 == 0 {
                        (vandq_u8(v0, m4), vandq_u8(v1, m4))
                    } else {
                        (vshrq_n_u8(v0, 4), vshrq_n_u8(v1, 4))
                    };
                    // Bit j of qh, moved to bit 4.
                    let sh = vdupq_n_s8(-(j as i8));
                    let b0 = vshlq_n_u8(vandq_u8(vshlq_u8(h0, sh), one), 4);
                    let b1 = vshlq_n_u8(vandq_u8(vshlq_u8(h1, sh), one), 4);
                    let (a0, a1) = (vorrq_u8(v0, b0), vorrq_u8(v1, b1));
                    let (sc, mn) = q4k_scale_min(j, &b.scales);
                    let (y0, y1) = load_y(y);
                    let s = $dot32(vreinterpretq_s8_u8(a0), vreinterpretq_s8_u8(a1), y0, y1);
                    acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), d * sc as f32 * y.d);
                    summs += dmin * mn as f32 * y.s;
                }
            }
            vaddvq_f32(acc) - summs
        }

        #[target_feature(enable = $feat)]
        unsafe fn $q6k(w: &[BlockQ6K], x: &[BlockQ8]) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            for (b, ys) in w.iter().zip(x.chunks_exact(8)) {
                let d = f16_to_f32(b.d);
                for (j, y) in ys.iter().enumerate() {
                    let (n, t) = (j / 4, j % 4);
                    let (a0, a1) = q6k_sub(b, j);
                    let (y0, y1) = load_y(y);
                    let s = vaddq_s32(
                        vmulq_n_s32($dot16(a0, y0), b.scales[n * 8 + 2 * t] as i32),
                        vmulq_n_s32($dot16(a1, y1), b.scales[n * 8 + 2 * t + 1] as i32),
                    );
                    acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), d * y.d);
                }
            }
            vaddvq_f32(acc)
        }
    };
}

neon_k_kernels!(
    dot32_plain,
    dot16_plain,
    "neon",
    dot_q4k_plain,
    dot_q5k_plain,
    dot_q6k_plain
);
neon_k_kernels!(
    dot32_sdot,
    dot16_sdot,
    "neon,dotprod",
    dot_q4k_dp,
    dot_q5k_dp,
    dot_q6k_dp
);

macro_rules! neon_wrappers {
    ($why:literal, $($name:ident($imp:ident): $b:ty),*) => {
        $(
            pub(super) fn $name(w: &[$b], x: &[BlockQ8]) -> f32 {
                // SAFETY: only reachable through the kernel table named by `$why`, built after
                // detecting its features (see `mod.rs`).
                unsafe { $imp(w, x) }
            }
        )*
    };
}
neon_wrappers!(
    "neon",
    dot_q5_1(dot_q5_1_plain): BlockQ5_1,
    dot_q4k(dot_q4k_plain): BlockQ4K,
    dot_q5k(dot_q5k_plain): BlockQ5K,
    dot_q6k(dot_q6k_plain): BlockQ6K
);
neon_wrappers!(
    "neon-dotprod",
    dot_q5_1_dotprod(dot_q5_1_dp): BlockQ5_1,
    dot_q4k_dotprod(dot_q4k_dp): BlockQ4K,
    dot_q5k_dotprod(dot_q5k_dp): BlockQ5K,
    dot_q6k_dotprod(dot_q6k_dp): BlockQ6K
);

// Tiles as loops of dot products (a tiled NEON kernel is future work).
macro_rules! neon_tiles {
    ($($name:ident: $b:ty => $dot:ident),*) => {
        $(
            pub(super) fn $name(w: &[&[$b]], x: &[&[BlockQ8]], out: &mut [f32]) {
                super::generic::tile($dot, w, x, out)
            }
        )*
    };
}
neon_tiles!(
    tile_q4_0: BlockQ4_0 => dot_q4_0,
    tile_q4_1: BlockQ4_1 => dot_q4_1,
    tile_q5_0: BlockQ5_0 => dot_q5_0,
    tile_q5_1: BlockQ5_1 => dot_q5_1,
    tile_q8_0: BlockQ8_0 => dot_q8_0,
    tile_q4k: BlockQ4K => dot_q4k,
    tile_q5k: BlockQ5K => dot_q5k,
    tile_q6k: BlockQ6K => dot_q6k,
    tile_q4_0_dotprod: BlockQ4_0 => dot_q4_0_dotprod,
    tile_q4_1_dotprod: BlockQ4_1 => dot_q4_1_dotprod,
    tile_q5_0_dotprod: BlockQ5_0 => dot_q5_0_dotprod,
    tile_q5_1_dotprod: BlockQ5_1 => dot_q5_1_dotprod,
    tile_q8_0_dotprod: BlockQ8_0 => dot_q8_0_dotprod,
    tile_q4k_dotprod: BlockQ4K => dot_q4k_dotprod,
    tile_q5k_dotprod: BlockQ5K => dot_q5k_dotprod,
    tile_q6k_dotprod: BlockQ6K => dot_q6k_dotprod
);

pub(super) fn scores_f32(q: &[f32], k: &[f32], stride: usize, out: &mut [f32]) {
    super::check_rows(out.len(), stride, q.len(), k.len());
    // SAFETY: rows checked; NEON is part of the aarch64 baseline.
    unsafe { scores_imp(q, k, stride, out) }
}
pub(super) fn scores_f16(q: &[f32], k: &[u16], stride: usize, out: &mut [f32]) {
    super::check_rows(out.len(), stride, q.len(), k.len());
    // SAFETY: as above.
    unsafe { scores_imp(q, k, stride, out) }
}
pub(super) fn exp_sum(s: &mut [f32], max: f32) -> f32 {
    // SAFETY: as above.
    unsafe { exp_sum_imp(s, max) }
}
pub(super) fn acc_f32(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    super::check_rows(p.len(), stride, out.len(), v.len());
    // SAFETY: as above.
    unsafe { acc_imp(p, v, stride, out) }
}
pub(super) fn acc_f16(p: &[f32], v: &[u16], stride: usize, out: &mut [f32]) {
    super::check_rows(p.len(), stride, out.len(), v.len());
    // SAFETY: as above.
    unsafe { acc_imp(p, v, stride, out) }
}
pub(super) fn acc_q8_0(p: &[f32], v: &[BlockQ8_0], stride: usize, out: &mut [f32]) {
    assert!(out.len().is_multiple_of(QK), "q8_0 rows are whole blocks");
    super::check_rows(p.len(), stride, out.len() / QK, v.len());
    // SAFETY: as above.
    unsafe { acc_q8_0_imp(p, v, stride, out) }
}
