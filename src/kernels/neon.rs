//! aarch64 kernels: plain NEON (every ARMv8-A core, e.g. Cortex-A53) and a variant with the
//! ARMv8.2 dot-product instruction `sdot` (Cortex-A55/A76, RK3588, Pi 5). Same operations as
//! `generic.rs`, same names. `vdotq_s32` is unstable in Rust, so `sdot` is stable inline asm.
//!
//! The safe wrappers at the bottom are installed in a kernel table only after
//! `is_aarch64_feature_detected!` confirmed the features (see `mod.rs`).

use std::arch::aarch64::*;
use std::arch::asm;

use super::quant::{f16_to_f32, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ8, BlockQ8_0, QK};

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

macro_rules! neon_kernels {
    ($dot32:ident, $feat:literal, $q4_0:ident, $q4_1:ident, $q5_0:ident, $q8_0:ident) => {
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
                // Fifth bits, one per byte: lane j gets bit j (lo) or bit j+16 (hi).
                let qh = u32::from_le_bytes(b.qh);
                let mut h = [0u8; 32];
                for (j, hj) in h.iter_mut().enumerate() {
                    *hj = (((qh >> j) & 1) << 4) as u8;
                }
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
    dot_q8_0_plain
);
neon_kernels!(
    dot32_sdot,
    "neon,dotprod",
    dot_q4_0_dp,
    dot_q4_1_dp,
    dot_q5_0_dp,
    dot_q8_0_dp
);

#[target_feature(enable = "neon")]
unsafe fn dot_f32_imp(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let o = i + 4 * k;
            *acc = vfmaq_f32(*acc, vld1q_f32(pa.add(o)), vld1q_f32(pb.add(o)));
        }
        i += 16;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
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
    tile_q8_0: BlockQ8_0 => dot_q8_0,
    tile_q4_0_dotprod: BlockQ4_0 => dot_q4_0_dotprod,
    tile_q4_1_dotprod: BlockQ4_1 => dot_q4_1_dotprod,
    tile_q8_0_dotprod: BlockQ8_0 => dot_q8_0_dotprod
);
