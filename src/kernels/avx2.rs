//! x86_64 kernels with AVX2, FMA and F16C: the same operations as `generic.rs`, same names.
//!
//! The safe wrappers at the bottom are installed in the kernel table only after
//! `is_x86_feature_detected!` confirmed the features (see `mod.rs`); nothing else may call them.

use std::arch::x86_64::*;

use super::packed::{Packed, P4_0, P4_1, P5_0, P5_1, P8_0, ROWS};
use super::quant::{
    f16_to_f32, q4k_scale_min, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8, BlockQ8_0, QK,
};

#[inline(always)]
unsafe fn f16(h: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 16 bytes of packed nibbles to 32 bytes: element j (low nibble of byte j) in lane j, element
/// j+16 (high nibble of byte j) in lane j+16 — ggml's Q4 element order.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let t = _mm_loadu_si128(p as *const __m128i);
    let v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
}

/// [low nibbles of the 16 bytes | high nibbles × 16]: a broadcast load and one mask.
#[inline(always)]
unsafe fn nibbles_x16(p: *const u8) -> __m256i {
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    _mm256_and_si256(
        v,
        _mm256_setr_epi64x(
            0x0f0f0f0f0f0f0f0f,
            0x0f0f0f0f0f0f0f0f,
            0xf0f0f0f0f0f0f0f0u64 as i64,
            0xf0f0f0f0f0f0f0f0u64 as i64,
        ),
    )
}

/// Eight f16 values as eight f32 lanes, built in a register (no store-forwarding stall).
#[inline(always)]
unsafe fn f16x8(h: &[u16; 8]) -> __m256 {
    _mm256_cvtph_ps(_mm_set_epi16(
        h[7] as i16,
        h[6] as i16,
        h[5] as i16,
        h[4] as i16,
        h[3] as i16,
        h[2] as i16,
        h[1] as i16,
        h[0] as i16,
    ))
}

/// Sum of products of unsigned bytes `a` and signed bytes `b`, as 8 f32 lanes.
#[inline(always)]
unsafe fn mul_sum_us8(a: __m256i, b: __m256i) -> __m256 {
    let p16 = _mm256_maddubs_epi16(a, b);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// Sum of products of signed bytes, as 8 f32 lanes.
#[inline(always)]
unsafe fn mul_sum_i8(a: __m256i, b: __m256i) -> __m256 {
    mul_sum_us8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
}

/// Lane j is 0xff where bit j of `x` is set.
#[inline(always)]
unsafe fn bytes_from_bits(x: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let b = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0_imp(w: &[BlockQ4_0], x: &[BlockQ8]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let off = _mm256_set1_epi8(8);
    let mut i = 0;
    while i + 1 < n {
        let (b0, y0, b1, y1) = (&w[i], &x[i], &w[i + 1], &x[i + 1]);
        let q0 = _mm256_sub_epi8(nibbles(b0.qs.as_ptr()), off);
        let q1 = _mm256_sub_epi8(nibbles(b1.qs.as_ptr()), off);
        let p0 = mul_sum_i8(q0, _mm256_loadu_si256(y0.qs.as_ptr() as *const __m256i));
        let p1 = mul_sum_i8(q1, _mm256_loadu_si256(y1.qs.as_ptr() as *const __m256i));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16(b0.d) * y0.d), p0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16(b1.d) * y1.d), p1, acc1);
        i += 2;
    }
    if i < n {
        let q = _mm256_sub_epi8(nibbles(w[i].qs.as_ptr()), off);
        let p = mul_sum_i8(q, _mm256_loadu_si256(x[i].qs.as_ptr() as *const __m256i));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16(w[i].d) * x[i].d), p, acc0);
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_imp(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut summs = 0f32;
    let mut i = 0;
    while i + 1 < n {
        let (b0, y0, b1, y1) = (&w[i], &x[i], &w[i + 1], &x[i + 1]);
        let p0 = mul_sum_us8(
            nibbles(b0.qs.as_ptr()),
            _mm256_loadu_si256(y0.qs.as_ptr() as *const __m256i),
        );
        let p1 = mul_sum_us8(
            nibbles(b1.qs.as_ptr()),
            _mm256_loadu_si256(y1.qs.as_ptr() as *const __m256i),
        );
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16(b0.d) * y0.d), p0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16(b1.d) * y1.d), p1, acc1);
        summs += f16(b0.m) * y0.s + f16(b1.m) * y1.s;
        i += 2;
    }
    if i < n {
        let p = mul_sum_us8(
            nibbles(w[i].qs.as_ptr()),
            _mm256_loadu_si256(x[i].qs.as_ptr() as *const __m256i),
        );
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16(w[i].d) * x[i].d), p, acc0);
        summs += f16(w[i].m) * x[i].s;
    }
    hsum(_mm256_add_ps(acc0, acc1)) + summs
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0_imp(w: &[BlockQ5_0], x: &[BlockQ8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, y) in w.iter().zip(x) {
        let q = nibbles(b.qs.as_ptr());
        // Where the fifth bit is clear, the value is q - 16 = q | 0xf0 as a signed byte.
        let hi = _mm256_andnot_si256(
            bytes_from_bits(u32::from_le_bytes(b.qh)),
            _mm256_set1_epi8(0xf0u8 as i8),
        );
        let q = _mm256_or_si256(q, hi);
        let p = mul_sum_i8(q, _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(b.d) * y.d), p, acc);
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_imp(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 1 < n {
        let (b0, y0, b1, y1) = (&w[i], &x[i], &w[i + 1], &x[i + 1]);
        let p0 = mul_sum_i8(
            _mm256_loadu_si256(b0.qs.as_ptr() as *const __m256i),
            _mm256_loadu_si256(y0.qs.as_ptr() as *const __m256i),
        );
        let p1 = mul_sum_i8(
            _mm256_loadu_si256(b1.qs.as_ptr() as *const __m256i),
            _mm256_loadu_si256(y1.qs.as_ptr() as *const __m256i),
        );
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16(b0.d) * y0.d), p0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16(b1.d) * y1.d), p1, acc1);
        i += 2;
    }
    if i < n {
        let p = mul_sum_i8(
            _mm256_loadu_si256(w[i].qs.as_ptr() as *const __m256i),
            _mm256_loadu_si256(x[i].qs.as_ptr() as *const __m256i),
        );
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16(w[i].d) * x[i].d), p, acc0);
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

/// Elements the f32 loops read: f32 itself, or f16 bits (the KV cache), widened 8 at a time.
trait Lanes: Copy {
    unsafe fn load8(p: *const Self) -> __m256;
    fn f32(self) -> f32;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Lanes for u16 {
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
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
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let o = i + 8 * k;
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), E::load8(pb.add(o)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), E::load8(pb.add(i)), acc[0]);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += a[i] * (*pb.add(i)).f32();
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_imp(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b.as_ptr(), a.len().min(b.len()))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_q8_imp(x: &[f32], out: &mut [BlockQ8]) {
    let sign_mask = _mm256_set1_ps(-0.0);
    for (c, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let p = c.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let mut m = _mm256_andnot_ps(sign_mask, v[0]);
        for vk in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign_mask, *vk));
        }
        let m128 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m128 = _mm_max_ps(m128, _mm_movehl_ps(m128, m128));
        let m128 = _mm_max_ss(m128, _mm_movehdup_ps(m128));
        let amax = _mm_cvtss_f32(m128);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        // Round half away from zero like f32::round in the scalar twin.
        let r = |v: __m256| -> __m256i {
            let s = _mm256_mul_ps(v, idv);
            let half = _mm256_or_ps(_mm256_and_ps(s, sign_mask), _mm256_set1_ps(0.5));
            _mm256_cvttps_epi32(_mm256_add_ps(s, half))
        };
        let (i0, i1, i2, i3) = (r(v[0]), r(v[1]), r(v[2]), r(v[3]));
        let sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        let s128 = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s128 = _mm_hadd_epi32(s128, s128);
        let s128 = _mm_hadd_epi32(s128, s128);
        let total = _mm_cvtsi128_si32(s128);
        // Pack i32 -> i16 -> i8; the packs interleave 128-bit lanes, the permute undoes it.
        let p01 = _mm256_packs_epi32(i0, i1);
        let p23 = _mm256_packs_epi32(i2, i3);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, p);
        b.d = d;
        b.s = d * total as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Tiles: R weight rows × C tokens per call. Unpacked weights are shared by the C tokens and
// loaded activations by the R rows, which is what makes batched prompt processing faster than
// one dot product at a time. Every weight type is handled as unsigned bytes times signed
// activations plus an offset term: value = d·(u + k) gives d·dy·Σu·y + d·k·(dy·Σy), and dy·Σy
// is the activation block's `s`.

/// The integer core: Σ u8 × i8 in groups of four into i32 lanes.
trait IDot {
    const VNNI: bool;
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256i;
    /// `acc + dot_us(a, b)`, in one instruction where there is one.
    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, Self::dot_us(a, b))
    }
}

struct Madd;
impl IDot for Madd {
    const VNNI: bool = false;
    #[inline(always)]
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
}

struct Vnni;
impl IDot for Vnni {
    const VNNI: bool = true;
    #[inline(always)]
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
    }
    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, a, b)
    }
}

/// The same instruction in its AVX-512 encoding (AVX512-VNNI with VL, on 256-bit vectors):
/// Ice Lake, Sapphire Rapids, Zen 4 — which have no VEX AVX-VNNI.
struct Vnni512;
impl IDot for Vnni512 {
    const VNNI: bool = true;
    #[inline(always)]
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    }
    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, a, b)
    }
}

trait WBlock: Copy {
    /// The block's 32 weights prepared for `idot`.
    unsafe fn prep<D: IDot>(&self) -> __m256i;
    #[inline(always)]
    unsafe fn idot<D: IDot>(p: __m256i, y: __m256i) -> __m256i {
        D::dot_us(p, y)
    }
    /// (scale, offset coefficient): the block's dot is scale·dy·idot + coef·s.
    #[inline(always)]
    unsafe fn scales<D: IDot>(&self) -> (f32, f32) {
        let d = f16(self.d_bits());
        let coef = match Self::d_coef::<D>() {
            Some(k) => k * d,
            None => f16(self.m_bits()),
        };
        (d, coef)
    }
    /// The scale's f16 bits.
    fn d_bits(&self) -> u16;
    /// The offset coefficient is either `k·d` (`Some(k)`) or the block's own f16 `m`.
    fn d_coef<D: IDot>() -> Option<f32>;
    fn m_bits(&self) -> u16 {
        0
    }
    /// Whether the weights are packed nibbles (see `prep_x16`).
    const NIBBLES: bool = false;
    /// Nibble formats only: low nibbles in the low 128 bits, high nibbles *still times 16* in the
    /// high 128 bits — two instructions instead of four. The high half of an integer dot is then
    /// 16 times too large, exactly, and is shifted back once per eight rows. Products reach
    /// 240·127, so this needs VNNI's 32-bit accumulation (maddubs would saturate).
    unsafe fn prep_x16(&self) -> __m256i {
        _mm256_setzero_si256()
    }
}

impl WBlock for BlockQ4_0 {
    #[inline(always)]
    unsafe fn prep<D: IDot>(&self) -> __m256i {
        nibbles(self.qs.as_ptr())
    }
    const NIBBLES: bool = true;
    #[inline(always)]
    unsafe fn prep_x16(&self) -> __m256i {
        nibbles_x16(self.qs.as_ptr())
    }
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d
    }
    #[inline(always)]
    fn d_coef<D: IDot>() -> Option<f32> {
        Some(-8.0)
    }
}

impl WBlock for BlockQ4_1 {
    #[inline(always)]
    unsafe fn prep<D: IDot>(&self) -> __m256i {
        nibbles(self.qs.as_ptr())
    }
    const NIBBLES: bool = true;
    #[inline(always)]
    unsafe fn prep_x16(&self) -> __m256i {
        nibbles_x16(self.qs.as_ptr())
    }
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d
    }
    #[inline(always)]
    fn d_coef<D: IDot>() -> Option<f32> {
        None
    }
    #[inline(always)]
    fn m_bits(&self) -> u16 {
        self.m
    }
}

impl WBlock for BlockQ8_0 {
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d
    }
    #[inline(always)]
    fn d_coef<D: IDot>() -> Option<f32> {
        Some(if D::VNNI { -128.0 } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn prep<D: IDot>(&self) -> __m256i {
        let w = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
        if D::VNNI {
            // w + 128 as unsigned bytes; the -128 comes back through the offset term.
            _mm256_xor_si256(w, _mm256_set1_epi8(-128))
        } else {
            w
        }
    }
    #[inline(always)]
    unsafe fn idot<D: IDot>(p: __m256i, y: __m256i) -> __m256i {
        if D::VNNI {
            D::dot_us(p, y)
        } else {
            // u8 × i8 pairs of up to 255·127·2 would saturate maddubs: use |w| and sign(y, w).
            D::dot_us(_mm256_sign_epi8(p, p), _mm256_sign_epi8(y, p))
        }
    }
}

impl WBlock for BlockQ5_0 {
    /// The five-bit values unsigned (0..32); the −16 comes back through the offset term.
    #[inline(always)]
    unsafe fn prep<D: IDot>(&self) -> __m256i {
        let hi = _mm256_and_si256(
            bytes_from_bits(u32::from_le_bytes(self.qh)),
            _mm256_set1_epi8(0x10),
        );
        _mm256_or_si256(nibbles(self.qs.as_ptr()), hi)
    }
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d
    }
    #[inline(always)]
    fn d_coef<D: IDot>() -> Option<f32> {
        Some(-16.0)
    }
}

impl WBlock for BlockQ5_1 {
    /// The five-bit values unsigned (0..32); the offset is the block's own `m`.
    #[inline(always)]
    unsafe fn prep<D: IDot>(&self) -> __m256i {
        let hi = _mm256_and_si256(
            bytes_from_bits(u32::from_le_bytes(self.qh)),
            _mm256_set1_epi8(0x10),
        );
        _mm256_or_si256(nibbles(self.qs.as_ptr()), hi)
    }
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d
    }
    #[inline(always)]
    fn d_coef<D: IDot>() -> Option<f32> {
        None
    }
    #[inline(always)]
    fn m_bits(&self) -> u16 {
        self.m
    }
}

/// K-quant blocks of 256 weights: eight sub-blocks of 32, sub-block j meeting activation block
/// j of the eight under the block. Weights are `f·u + k` per sub-block (Q4_K: f = d·sc, k =
/// −dmin·m, u unsigned) or `f·u` with u signed and one f per 16 (Q6_K).
trait KBlock: Copy {
    /// Whether `prep` gives signed bytes (then the dot takes |u| and the activations with u's
    /// sign, as `maddubs` multiplies unsigned by signed).
    const SIGNED: bool;
    /// Per sub-block: the factors of its first and second 16 weights, and the coefficient of the
    /// activation block's `s`.
    fn scales(&self) -> ([[f32; 2]; 8], [f32; 8]);
    /// Sub-block j's 32 weights.
    unsafe fn prep(&self, j: usize) -> __m256i;
}

/// Q4_K's and Q5_K's `KBlock::scales`: sub-block j's weights are `d·sc_j·u − dmin·m_j`.
#[inline(always)]
fn scale_min_factors(d: u16, dmin: u16, scales: &[u8; 12]) -> ([[f32; 2]; 8], [f32; 8]) {
    let (d, dmin) = (f16_to_f32(d), f16_to_f32(dmin));
    let mut f = [[0f32; 2]; 8];
    let mut k = [0f32; 8];
    for j in 0..8 {
        let (sc, m) = q4k_scale_min(j, scales);
        f[j] = [d * sc as f32; 2];
        k[j] = -dmin * m as f32;
    }
    (f, k)
}

impl KBlock for BlockQ4K {
    const SIGNED: bool = false;
    #[inline(always)]
    fn scales(&self) -> ([[f32; 2]; 8], [f32; 8]) {
        scale_min_factors(self.d, self.dmin, &self.scales)
    }
    #[inline(always)]
    unsafe fn prep(&self, j: usize) -> __m256i {
        let v = _mm256_loadu_si256(self.qs.as_ptr().add((j / 2) * 32) as *const __m256i);
        let v = _mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (j % 2) as i32));
        _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
    }
}

impl KBlock for BlockQ5K {
    const SIGNED: bool = false;
    #[inline(always)]
    fn scales(&self) -> ([[f32; 2]; 8], [f32; 8]) {
        scale_min_factors(self.d, self.dmin, &self.scales)
    }
    #[inline(always)]
    unsafe fn prep(&self, j: usize) -> __m256i {
        let v = _mm256_loadu_si256(self.qs.as_ptr().add((j / 2) * 32) as *const __m256i);
        let lo = _mm256_and_si256(
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (j % 2) as i32)),
            _mm256_set1_epi8(0x0f),
        );
        // Bit j of each byte of qh: shifting the 16-bit lanes by j < 8 brings it to bit 0 of
        // its own byte; the mask drops what came down from the byte above.
        let h = _mm256_loadu_si256(self.qh.as_ptr() as *const __m256i);
        let hi = _mm256_and_si256(
            _mm256_srl_epi16(h, _mm_cvtsi32_si128(j as i32)),
            _mm256_set1_epi8(0x01),
        );
        _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4))
    }
}

impl KBlock for BlockQ6K {
    const SIGNED: bool = true;
    #[inline(always)]
    fn scales(&self) -> ([[f32; 2]; 8], [f32; 8]) {
        let d = f16_to_f32(self.d);
        let mut f = [[0f32; 2]; 8];
        for (j, fj) in f.iter_mut().enumerate() {
            let (n, t) = (j / 4, j % 4);
            *fj = [
                d * self.scales[n * 8 + 2 * t] as f32,
                d * self.scales[n * 8 + 2 * t + 1] as f32,
            ];
        }
        (f, [0f32; 8])
    }
    #[inline(always)]
    unsafe fn prep(&self, j: usize) -> __m256i {
        let (n, t) = (j / 4, j % 4);
        let l = _mm256_loadu_si256(self.ql.as_ptr().add(n * 64 + (t % 2) * 32) as *const __m256i);
        let h = _mm256_loadu_si256(self.qh.as_ptr().add(n * 32) as *const __m256i);
        let lo = _mm256_and_si256(
            _mm256_srl_epi16(l, _mm_cvtsi32_si128(4 * (t / 2) as i32)),
            _mm256_set1_epi8(0x0f),
        );
        let hi = _mm256_and_si256(
            _mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * t as i32)),
            _mm256_set1_epi8(0x03),
        );
        // hi ≤ 3 in each byte: shifting the 16-bit lanes by 4 cannot carry into the next byte.
        let q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
        _mm256_sub_epi8(q, _mm256_set1_epi8(32))
    }
}

/// R rows × C tokens of K-quant dot products.
#[inline(always)]
unsafe fn ktile_fixed<B: KBlock, D: IDot, const R: usize, const C: usize>(
    w: &[&[B]],
    x: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let nb = w[0].len();
    assert!(w.len() == R && x.len() == C && out.len() >= R * C);
    assert!(w.iter().all(|r| r.len() == nb) && x.iter().all(|c| c.len() >= nb * 8));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut off = [[0f32; C]; R];
    for b in 0..nb {
        let mut f = [[[0f32; 2]; 8]; R];
        let mut k = [[0f32; 8]; R];
        for r in 0..R {
            // SAFETY: r < R == w.len(), b < nb == w[r].len().
            (f[r], k[r]) = w.get_unchecked(r).get_unchecked(b).scales();
        }
        for j in 0..8 {
            // SAFETY: x.len() == C and b·8 + j < nb·8 <= every x[c].len() (asserted above).
            let (y, yd, ys) = act_block::<C>(x, b * 8 + j);
            for r in 0..R {
                // SAFETY: as above.
                let q = w.get_unchecked(r).get_unchecked(b).prep(j);
                let qa = if B::SIGNED { _mm256_sign_epi8(q, q) } else { q };
                for c in 0..C {
                    let yc = if B::SIGNED {
                        _mm256_sign_epi8(y[c], q)
                    } else {
                        y[c]
                    };
                    let i = _mm256_cvtepi32_ps(D::dot_us(qa, yc));
                    let [f0, f1] = f[r][j];
                    let fv = if B::SIGNED {
                        _mm256_set_m128(_mm_set1_ps(f1 * yd[c]), _mm_set1_ps(f0 * yd[c]))
                    } else {
                        _mm256_set1_ps(f0 * yd[c])
                    };
                    acc[r][c] = _mm256_fmadd_ps(i, fv, acc[r][c]);
                    off[r][c] += k[r][j] * ys[c];
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r * C + c] = hsum(acc[r][c]) + off[r][c];
        }
    }
}

#[inline(always)]
unsafe fn ktile_any<B: KBlock, D: IDot>(w: &[&[B]], x: &[&[BlockQ8]], out: &mut [f32]) {
    match (w.len(), x.len()) {
        (8, 1) => ktile_fixed::<B, D, 8, 1>(w, x, out),
        (2, 4) => ktile_fixed::<B, D, 2, 4>(w, x, out),
        (4, 1) => ktile_fixed::<B, D, 4, 1>(w, x, out),
        (1, 4) => ktile_fixed::<B, D, 1, 4>(w, x, out),
        (nr, nc) => {
            for r in 0..nr {
                for c in 0..nc {
                    let mut o = [0f32];
                    ktile_fixed::<B, D, 1, 1>(&w[r..r + 1], &x[c..c + 1], &mut o);
                    out[r * nc + c] = o[0];
                }
            }
        }
    }
}

#[inline(always)]
unsafe fn tile_fixed<B: WBlock, D: IDot, const R: usize, const C: usize>(
    w: &[&[B]],
    x: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let nb = w[0].len();
    assert!(w.len() == R && x.len() == C && out.len() >= R * C);
    assert!(w.iter().all(|r| r.len() == nb) && x.iter().all(|c| c.len() >= nb));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut off = [[0f32; C]; R];
    for b in 0..nb {
        // SAFETY: x.len() == C and b < nb <= every x[c].len() (asserted above).
        let (y, yd, ys) = act_block::<C>(x, b);
        for r in 0..R {
            // SAFETY: b < nb == w[r].len(); r < R == w.len().
            let blk = w.get_unchecked(r).get_unchecked(b);
            let p = blk.prep::<D>();
            let (d, coef) = blk.scales::<D>();
            for c in 0..C {
                let s = _mm256_cvtepi32_ps(B::idot::<D>(p, y[c]));
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(d * yd[c]), s, acc[r][c]);
                off[r][c] += coef * ys[c];
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r * C + c] = hsum(acc[r][c]) + off[r][c];
        }
    }
}

/// Block `b` of each of the C tokens' 8-bit activations: its quants, scale and scaled sum.
///
/// # Safety
/// `x.len() == C` and `b < x[c].len()` for every c; AVX2 available.
#[inline(always)]
unsafe fn act_block<const C: usize>(
    x: &[&[BlockQ8]],
    b: usize,
) -> ([__m256i; C], [f32; C], [f32; C]) {
    let mut y = [_mm256_setzero_si256(); C];
    let mut yd = [0f32; C];
    let mut ys = [0f32; C];
    for c in 0..C {
        // SAFETY: c < C == x.len() and b < x[c].len(), by the caller's contract.
        let yb = x.get_unchecked(c).get_unchecked(b);
        y[c] = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
        yd[c] = yb.d;
        ys[c] = yb.s;
    }
    (y, yd, ys)
}

/// Eight dot products at once, R rows × C tokens with R·C = 8: 8 × 1 when decoding, 2 × 4 for
/// batches. Instead of a horizontal sum per dot and block, the eight integer sums of a block are
/// reduced together into one vector (lane j = row j / C, token j % C), and the eight scales are
/// built into one vector, so the float work per block is a handful of instructions for all
/// eight. The accumulator ends with one lane per output, in the tile's order: no final sums.
#[inline(always)]
unsafe fn tile_lanes<B: WBlock, D: IDot, const R: usize, const C: usize>(
    w: &[&[B]],
    x: &[&[BlockQ8]],
    out: &mut [f32],
) {
    const { assert!(R * C == 8) };
    let nb = w[0].len();
    assert!(w.len() == R && x.len() == C && out.len() >= 8);
    assert!(w.iter().all(|r| r.len() == nb) && x.iter().all(|c| c.len() >= nb));
    let x16 = B::NIBBLES && D::VNNI;
    let mut acc = _mm256_setzero_ps();
    let mut off = _mm256_setzero_ps();
    for b in 0..nb {
        // SAFETY: x.len() == C and b < nb <= every x[c].len() (asserted above).
        let (y, yd, ys) = act_block::<C>(x, b);
        let mut p = [_mm256_setzero_si256(); 8];
        let mut d = [0u16; R];
        let mut m = [0u16; R];
        for r in 0..R {
            // SAFETY: r < R == w.len(), b < nb == w[r].len().
            let blk = w.get_unchecked(r).get_unchecked(b);
            let q = if x16 { blk.prep_x16() } else { blk.prep::<D>() };
            for c in 0..C {
                p[r * C + c] = if x16 {
                    D::dot_us(q, y[c])
                } else {
                    B::idot::<D>(q, y[c])
                };
            }
            d[r] = blk.d_bits();
            m[r] = blk.m_bits();
        }
        let s01 = _mm256_hadd_epi32(p[0], p[1]);
        let s23 = _mm256_hadd_epi32(p[2], p[3]);
        let s45 = _mm256_hadd_epi32(p[4], p[5]);
        let s67 = _mm256_hadd_epi32(p[6], p[7]);
        let s0123 = _mm256_hadd_epi32(s01, s23);
        let s4567 = _mm256_hadd_epi32(s45, s67);
        let lo = _mm256_permute2x128_si256(s0123, s4567, 0x20);
        let hi = _mm256_permute2x128_si256(s0123, s4567, 0x31);
        let tot = if x16 {
            _mm256_add_epi32(lo, _mm256_srai_epi32(hi, 4))
        } else {
            _mm256_add_epi32(lo, hi)
        };
        // Lane j holds row j / C and token j % C, built in registers (no store-forwarding
        // stall): eight rows' scales convert as one vector, fewer as scalars.
        let by_row = |h: &[u16; R]| -> __m256 {
            if let Ok(h8) = <&[u16; 8]>::try_from(&h[..]) {
                f16x8(h8)
            } else {
                let mut v = [0f32; R];
                for (vi, &hi) in v.iter_mut().zip(h) {
                    *vi = f16(hi);
                }
                _mm256_set_ps(
                    v[7 / C],
                    v[6 / C],
                    v[5 / C],
                    v[4 / C],
                    v[3 / C],
                    v[2 / C],
                    v[1 / C],
                    v[0],
                )
            }
        };
        let by_token = |v: &[f32; C]| {
            _mm256_set_ps(
                v[7 % C],
                v[6 % C],
                v[5 % C],
                v[4 % C],
                v[3 % C],
                v[2 % C],
                v[1 % C],
                v[0],
            )
        };
        let dv = by_row(&d);
        let ydv = by_token(&yd);
        let ysv = by_token(&ys);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_mul_ps(dv, ydv), acc);
        let coef = match B::d_coef::<D>() {
            Some(k) => _mm256_mul_ps(dv, _mm256_set1_ps(k)),
            None => by_row(&m),
        };
        off = _mm256_fmadd_ps(coef, ysv, off);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(acc, off));
}

/// Any tile shape: the common ones are monomorphised, the rest are built from 1 × 1 tiles.
#[inline(always)]
unsafe fn tile_any<B: WBlock, D: IDot>(w: &[&[B]], x: &[&[BlockQ8]], out: &mut [f32]) {
    match (w.len(), x.len()) {
        (8, 1) => tile_lanes::<B, D, 8, 1>(w, x, out),
        (2, 4) => tile_lanes::<B, D, 2, 4>(w, x, out),
        (4, 1) => tile_fixed::<B, D, 4, 1>(w, x, out),
        (1, 4) => tile_fixed::<B, D, 1, 4>(w, x, out),
        (1, 1) => tile_fixed::<B, D, 1, 1>(w, x, out),
        (nr, nc) => {
            for r in 0..nr {
                for c in 0..nc {
                    let mut o = [0f32];
                    tile_fixed::<B, D, 1, 1>(&w[r..r + 1], &x[c..c + 1], &mut o);
                    out[r * nc + c] = o[0];
                }
            }
        }
    }
}

/// Tile entry points compiled for one feature set: `$any` (`tile_any`, `ktile_any` or
/// `ptile_any`) for each weight block type.
macro_rules! tile_fns {
    ($any:ident, $feat:literal, $d:ty, $($name:ident: $b:ty),*) => {
        $(
            #[target_feature(enable = $feat)]
            unsafe fn $name(w: &[&[$b]], x: &[&[BlockQ8]], out: &mut [f32]) {
                $any::<$b, $d>(w, x, out)
            }
        )*
    };
}

tile_fns!(tile_any, "avx2,fma,f16c", Madd, tile_q4_0_imp: BlockQ4_0, tile_q4_1_imp: BlockQ4_1, tile_q5_0_imp: BlockQ5_0, tile_q5_1_imp: BlockQ5_1, tile_q8_0_imp: BlockQ8_0);
tile_fns!(tile_any, "avx2,fma,f16c,avxvnni", Vnni, tile_q4_0_vnni_imp: BlockQ4_0, tile_q4_1_vnni_imp: BlockQ4_1, tile_q5_0_vnni_imp: BlockQ5_0, tile_q5_1_vnni_imp: BlockQ5_1, tile_q8_0_vnni_imp: BlockQ8_0);
tile_fns!(tile_any, "avx2,fma,f16c,avx512vnni,avx512vl", Vnni512, tile_q4_0_v512_imp: BlockQ4_0, tile_q4_1_v512_imp: BlockQ4_1, tile_q5_0_v512_imp: BlockQ5_0, tile_q5_1_v512_imp: BlockQ5_1, tile_q8_0_v512_imp: BlockQ8_0);
tile_fns!(ktile_any, "avx2,fma,f16c", Madd, tile_q4k_imp: BlockQ4K, tile_q5k_imp: BlockQ5K, tile_q6k_imp: BlockQ6K);
tile_fns!(ktile_any, "avx2,fma,f16c,avxvnni", Vnni, tile_q4k_vnni_imp: BlockQ4K, tile_q5k_vnni_imp: BlockQ5K, tile_q6k_vnni_imp: BlockQ6K);
tile_fns!(ktile_any, "avx2,fma,f16c,avx512vnni,avx512vl", Vnni512, tile_q4k_v512_imp: BlockQ4K, tile_q5k_v512_imp: BlockQ5K, tile_q6k_v512_imp: BlockQ6K);

/// A packed block of eight rows (see `packed.rs`) as the packed tiles read it.
trait PBlock: Packed {
    /// Q8_0: the weights are signed bytes, multiplied through their absolute values with the
    /// activations' signs flipped to match (`pmaddubsw` and `vpdpbusd` take unsigned × signed).
    const SIGNED: bool = false;
    /// Groups h and h + 4 of the block (h < 4): four weights of each of the eight rows.
    unsafe fn pair(&self, h: usize) -> (__m256i, __m256i);
    /// The eight rows' scales.
    #[inline(always)]
    unsafe fn d(&self) -> __m256 {
        load_d(self.d_bits())
    }
    /// The eight rows' offset coefficients (`coef · s` is added per activation block), given
    /// their scales.
    unsafe fn coef(&self, d: __m256) -> __m256;
}

#[inline(always)]
unsafe fn load_d(d: &[u16; ROWS]) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i))
}

/// Low and high nibbles of 32 packed bytes.
#[inline(always)]
unsafe fn nibble_pair(p: *const u8) -> (__m256i, __m256i) {
    let v = _mm256_loadu_si256(p as *const __m256i);
    let m = _mm256_set1_epi8(0x0f);
    (
        _mm256_and_si256(v, m),
        _mm256_and_si256(_mm256_srli_epi16(v, 4), m),
    )
}

/// Fifth bits for groups h and h + 4 from the rearranged `qh` (bit G of each byte for group G),
/// each moved to bit 4 of its byte.
#[inline(always)]
unsafe fn fifth_pair(qh: &[u8; 32], h: usize) -> (__m256i, __m256i) {
    let v = _mm256_loadu_si256(qh.as_ptr() as *const __m256i);
    let m = _mm256_set1_epi8(0x10);
    // 16-bit shifts: a byte's bit 4 after shifting left by 4 − h (or right by h ≤ 3) comes from
    // the same byte, and the mask drops what crossed over from its neighbour.
    (
        _mm256_and_si256(_mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - h as i32)), m),
        _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(h as i32)), m),
    )
}

impl PBlock for P4_0 {
    #[inline(always)]
    unsafe fn pair(&self, h: usize) -> (__m256i, __m256i) {
        nibble_pair(self.qs.as_ptr().add(32 * h))
    }
    #[inline(always)]
    unsafe fn coef(&self, d: __m256) -> __m256 {
        _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
    }
}

impl PBlock for P4_1 {
    #[inline(always)]
    unsafe fn pair(&self, h: usize) -> (__m256i, __m256i) {
        nibble_pair(self.qs.as_ptr().add(32 * h))
    }
    #[inline(always)]
    unsafe fn coef(&self, _d: __m256) -> __m256 {
        load_d(&self.m)
    }
}

impl PBlock for P5_0 {
    #[inline(always)]
    unsafe fn pair(&self, h: usize) -> (__m256i, __m256i) {
        let (lo, hi) = nibble_pair(self.qs.as_ptr().add(32 * h));
        let (flo, fhi) = fifth_pair(&self.qh, h);
        (_mm256_or_si256(lo, flo), _mm256_or_si256(hi, fhi))
    }
    #[inline(always)]
    unsafe fn coef(&self, d: __m256) -> __m256 {
        _mm256_mul_ps(d, _mm256_set1_ps(-16.0))
    }
}

impl PBlock for P5_1 {
    #[inline(always)]
    unsafe fn pair(&self, h: usize) -> (__m256i, __m256i) {
        let (lo, hi) = nibble_pair(self.qs.as_ptr().add(32 * h));
        let (flo, fhi) = fifth_pair(&self.qh, h);
        (_mm256_or_si256(lo, flo), _mm256_or_si256(hi, fhi))
    }
    #[inline(always)]
    unsafe fn coef(&self, _d: __m256) -> __m256 {
        load_d(&self.m)
    }
}

impl PBlock for P8_0 {
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn pair(&self, h: usize) -> (__m256i, __m256i) {
        let p = self.qs.as_ptr();
        (
            _mm256_loadu_si256(p.add(32 * h) as *const __m256i),
            _mm256_loadu_si256(p.add(32 * (h + 4)) as *const __m256i),
        )
    }
    #[inline(always)]
    unsafe fn coef(&self, _d: __m256) -> __m256 {
        _mm256_setzero_ps()
    }
}

/// One packed group of eight rows × C tokens: `out[8c + i] = dot(row i, token c)`. Per block,
/// each group of four weights per row is loaded once and meets each token's four activations
/// broadcast to every lane; the eight rows' integer sums land in their own lanes, scaled by one
/// vector of row scales times the token's scale.
#[inline(always)]
unsafe fn ptile_fixed<P: PBlock, D: IDot, const C: usize>(
    w: &[P],
    x: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let nb = w.len();
    assert!(x.len() == C && out.len() >= ROWS * C);
    assert!(x.iter().all(|c| c.len() >= nb));
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        // SAFETY: b < nb == w.len().
        let blk = w.get_unchecked(b);
        let mut isum = [_mm256_setzero_si256(); C];
        for h in 0..4 {
            let (lo, hi) = blk.pair(h);
            for (g, q) in [(h, lo), (h + 4, hi)] {
                let qa = if P::SIGNED { _mm256_sign_epi8(q, q) } else { q };
                for (c, s) in isum.iter_mut().enumerate() {
                    // SAFETY: c < C == x.len(), b < nb <= x[c].len(); 4g + 4 <= 32 bytes of qs.
                    let yp = x.get_unchecked(c).get_unchecked(b).qs.as_ptr().add(4 * g);
                    let mut y = _mm256_set1_epi32((yp as *const i32).read_unaligned());
                    if P::SIGNED {
                        y = _mm256_sign_epi8(y, q);
                    }
                    *s = D::dot_acc(*s, qa, y);
                }
            }
        }
        let d = blk.d();
        let coef = blk.coef(d);
        for c in 0..C {
            // SAFETY: as above.
            let yb = x.get_unchecked(c).get_unchecked(b);
            let s = _mm256_mul_ps(d, _mm256_set1_ps(yb.d));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c]), s, acc[c]);
            if !P::SIGNED {
                acc[c] = _mm256_fmadd_ps(coef, _mm256_set1_ps(yb.s), acc[c]);
            }
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(ROWS * c), *a);
    }
}

/// Any number of groups × tokens: each group with the tokens four at a time. (Taking two or
/// four groups at once for one token, sharing the broadcasts, ran at half the speed here:
/// the arrays of registers were not kept in registers.)
#[inline(always)]
unsafe fn ptile_any<P: PBlock, D: IDot>(w: &[&[P]], x: &[&[BlockQ8]], out: &mut [f32]) {
    let nc = x.len();
    for (r, g) in w.iter().enumerate() {
        let mut c0 = 0;
        while c0 < nc {
            let rest = &x[c0..];
            let o = &mut out[ROWS * (r * nc + c0)..];
            c0 += match rest.len() {
                1 => {
                    ptile_fixed::<P, D, 1>(g, rest, o);
                    1
                }
                2 => {
                    ptile_fixed::<P, D, 2>(g, rest, o);
                    2
                }
                3 => {
                    ptile_fixed::<P, D, 3>(g, rest, o);
                    3
                }
                _ => {
                    ptile_fixed::<P, D, 4>(g, &rest[..4], o);
                    4
                }
            };
        }
    }
}

tile_fns!(ptile_any, "avx2,fma,f16c", Madd, ptile_q4_0_imp: P4_0, ptile_q4_1_imp: P4_1, ptile_q5_0_imp: P5_0, ptile_q5_1_imp: P5_1, ptile_q8_0_imp: P8_0);
tile_fns!(ptile_any, "avx2,fma,f16c,avxvnni", Vnni, ptile_q4_0_vnni_imp: P4_0, ptile_q4_1_vnni_imp: P4_1, ptile_q5_0_vnni_imp: P5_0, ptile_q5_1_vnni_imp: P5_1, ptile_q8_0_vnni_imp: P8_0);
tile_fns!(ptile_any, "avx2,fma,f16c,avx512vnni,avx512vl", Vnni512, ptile_q4_0_v512_imp: P4_0, ptile_q4_1_v512_imp: P4_1, ptile_q5_0_v512_imp: P5_0, ptile_q5_1_v512_imp: P5_1, ptile_q8_0_v512_imp: P8_0);

/// Scores against `out.len()` key rows `stride` apart. Caller: `(out.len() − 1) · stride +
/// q.len() ≤ k.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_imp<E: Lanes>(q: &[f32], k: &[E], stride: usize, out: &mut [f32]) {
    let hd = q.len();
    let pk = k.as_ptr();
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_lanes(q, pk.add(j * stride), hd);
    }
}

/// e^x for x ≤ 0 lanes (inputs below −87.3 give about 1e-38): Cody–Waite reduction
/// x = n·ln2 + r, |r| ≤ ln2/2, the degree-5 polynomial of Cephes' `expf` for e^r, times 2^n.
/// Relative error about 2e-7.
#[inline(always)]
unsafe fn exp_ps(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.336_54));
    // Round to nearest (the default MXCSR mode).
    let ni = _mm256_cvtps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
    let n = _mm256_cvtepi32_ps(ni);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum_imp(s: &mut [f32], max: f32) -> f32 {
    let n = s.len();
    let p = s.as_mut_ptr();
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
        _mm256_storeu_ps(p.add(i), e);
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    let mut sum = hsum(acc);
    for v in &mut s[i..] {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// `out[o..o + 8·A] += Σ_j p[j] · v[j][o..]`, A registers of accumulators.
#[inline(always)]
unsafe fn acc_seg<E: Lanes, const A: usize>(p: &[f32], v: *const E, stride: usize, out: *mut f32) {
    let mut acc = [_mm256_setzero_ps(); A];
    for (a, acc) in acc.iter_mut().enumerate() {
        *acc = _mm256_loadu_ps(out.add(8 * a));
    }
    for (j, &pj) in p.iter().enumerate() {
        let pv = _mm256_set1_ps(pj);
        let row = v.add(j * stride);
        for (a, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(pv, E::load8(row.add(8 * a)), *acc);
        }
    }
    for (a, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(8 * a), *acc);
    }
}

/// Caller: `(p.len() − 1) · stride + out.len() ≤ v.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_imp<E: Lanes>(p: &[f32], v: &[E], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    let (pv, po) = (v.as_ptr(), out.as_mut_ptr());
    let mut o = 0;
    while o + 64 <= hd {
        acc_seg::<E, 8>(p, pv.add(o), stride, po.add(o));
        o += 64;
    }
    while o + 8 <= hd {
        acc_seg::<E, 1>(p, pv.add(o), stride, po.add(o));
        o += 8;
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
    let mut acc = [[_mm256_setzero_ps(); 4]; B];
    for (b, acc) in acc.iter_mut().enumerate() {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(out.add(QK * b + 8 * i));
        }
    }
    for (j, &pj) in p.iter().enumerate() {
        let row = v.add(j * stride);
        for (b, acc) in acc.iter_mut().enumerate() {
            let blk = &*row.add(b);
            let f = _mm256_set1_ps(pj * f16(blk.d));
            let q = blk.qs.as_ptr();
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(8 * i) as *const __m128i));
                *a = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(x), *a);
            }
        }
    }
    for (b, acc) in acc.iter().enumerate() {
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(QK * b + 8 * i), *a);
        }
    }
}

/// Caller: `out.len()` a multiple of 32, `(p.len() − 1) · stride + out.len() / 32 ≤ v.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
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

// Safe wrappers, installed only after detection (see `Kernels::avx2`).

pub(super) fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: only reachable through the AVX2 kernel table, built after feature detection.
    unsafe { dot_q4_0_imp(w, x) }
}
pub(super) fn dot_q4_1(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q4_1_imp(w, x) }
}
pub(super) fn dot_q5_0(w: &[BlockQ5_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q5_0_imp(w, x) }
}
pub(super) fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q8_0_imp(w, x) }
}
pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_f32_imp(a, b) }
}
pub(super) fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    // SAFETY: as above.
    unsafe { quantize_q8_imp(x, out) }
}

macro_rules! tile_wrappers {
    ($why:literal, $($name:ident($imp:ident): $b:ty),*) => {
        $(
            pub(super) fn $name(w: &[&[$b]], x: &[&[BlockQ8]], out: &mut [f32]) {
                // SAFETY: only reachable through the kernel table named by `$why`, built after
                // detecting its features (see `mod.rs`).
                unsafe { $imp(w, x, out) }
            }
        )*
    };
}

tile_wrappers!(
    "avx2",
    tile_q4_0(tile_q4_0_imp): BlockQ4_0,
    tile_q4_1(tile_q4_1_imp): BlockQ4_1,
    tile_q5_0(tile_q5_0_imp): BlockQ5_0,
    tile_q5_1(tile_q5_1_imp): BlockQ5_1,
    tile_q8_0(tile_q8_0_imp): BlockQ8_0,
    tile_q4k(tile_q4k_imp): BlockQ4K,
    tile_q5k(tile_q5k_imp): BlockQ5K,
    tile_q6k(tile_q6k_imp): BlockQ6K
);
tile_wrappers!(
    "avx-vnni",
    tile_q4_0_vnni(tile_q4_0_vnni_imp): BlockQ4_0,
    tile_q4_1_vnni(tile_q4_1_vnni_imp): BlockQ4_1,
    tile_q5_0_vnni(tile_q5_0_vnni_imp): BlockQ5_0,
    tile_q5_1_vnni(tile_q5_1_vnni_imp): BlockQ5_1,
    tile_q8_0_vnni(tile_q8_0_vnni_imp): BlockQ8_0,
    tile_q4k_vnni(tile_q4k_vnni_imp): BlockQ4K,
    tile_q5k_vnni(tile_q5k_vnni_imp): BlockQ5K,
    tile_q6k_vnni(tile_q6k_vnni_imp): BlockQ6K
);
tile_wrappers!(
    "avx512-vnni",
    tile_q4_0_v512(tile_q4_0_v512_imp): BlockQ4_0,
    tile_q4_1_v512(tile_q4_1_v512_imp): BlockQ4_1,
    tile_q5_0_v512(tile_q5_0_v512_imp): BlockQ5_0,
    tile_q5_1_v512(tile_q5_1_v512_imp): BlockQ5_1,
    tile_q8_0_v512(tile_q8_0_v512_imp): BlockQ8_0,
    tile_q4k_v512(tile_q4k_v512_imp): BlockQ4K,
    tile_q5k_v512(tile_q5k_v512_imp): BlockQ5K,
    tile_q6k_v512(tile_q6k_v512_imp): BlockQ6K
);

tile_wrappers!(
    "avx2",
    ptile_q4_0(ptile_q4_0_imp): P4_0,
    ptile_q4_1(ptile_q4_1_imp): P4_1,
    ptile_q5_0(ptile_q5_0_imp): P5_0,
    ptile_q5_1(ptile_q5_1_imp): P5_1,
    ptile_q8_0(ptile_q8_0_imp): P8_0
);
tile_wrappers!(
    "avx-vnni",
    ptile_q4_0_vnni(ptile_q4_0_vnni_imp): P4_0,
    ptile_q4_1_vnni(ptile_q4_1_vnni_imp): P4_1,
    ptile_q5_0_vnni(ptile_q5_0_vnni_imp): P5_0,
    ptile_q5_1_vnni(ptile_q5_1_vnni_imp): P5_1,
    ptile_q8_0_vnni(ptile_q8_0_vnni_imp): P8_0
);
tile_wrappers!(
    "avx512-vnni",
    ptile_q4_0_v512(ptile_q4_0_v512_imp): P4_0,
    ptile_q4_1_v512(ptile_q4_1_v512_imp): P4_1,
    ptile_q5_0_v512(ptile_q5_0_v512_imp): P5_0,
    ptile_q5_1_v512(ptile_q5_1_v512_imp): P5_1,
    ptile_q8_0_v512(ptile_q8_0_v512_imp): P8_0
);

pub(super) fn scores_f32(q: &[f32], k: &[f32], stride: usize, out: &mut [f32]) {
    super::check_rows(out.len(), stride, q.len(), k.len());
    // SAFETY: rows checked; only reachable through the AVX2 tables, built after detection.
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
