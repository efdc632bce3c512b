//! Block formats of ggml's quantized types, their reference dequantizers, and quantizers (used by
//! the tests to make synthetic models, and by `quantize_q8` for activations).
//!
//! Each block is `#[repr(C)]` with a compile-time size check, so a slice of a mapped tensor can be
//! viewed as a slice of blocks in place. f16 fields are kept as raw `u16` bits.

use half::f16;

/// ggml tensor types, with ggml's numbering (the on-disk value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    BF16 = 30,
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match v {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            30 => BF16,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            BF16 => "BF16",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2K => 84,
            Q3K => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            Q8K => 292,
        }
    }

    /// Whether the CPU engine can compute with weights of this type.
    pub fn supported(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K
        )
    }

    /// Bytes of a row of `n` elements (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }
}

pub const QK: usize = 32;
pub const QK_K: usize = 256;

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: u16,
    /// Element j in the low nibble of qs[j], element j+16 in the high nibble.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: u16,
    pub m: u16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: u16,
    /// Fifth bit of element j is bit j of this little-endian u32.
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: u16,
    pub m: u16,
    /// Fifth bit of element j is bit j of this little-endian u32.
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: u16,
    pub dmin: u16,
    /// 8 six-bit scales and 8 six-bit mins, packed.
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

/// Q4_K with a fifth bit: element l of sub-block j (0..8) has its low four bits in nibble
/// j % 2 of qs[(j / 2) * 32 + l] and its fifth in bit j of qh[l].
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: u16,
    pub dmin: u16,
    /// 8 six-bit scales and 8 six-bit mins, packed as Q4_K's.
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

/// Activations quantized to 8 bits per block of 32: the right-hand side of every integer dot
/// product. `s` is `d * sum(qs)`, which the Q4_1 kernels need for the weights' offset term.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8>() == 40);

impl Default for BlockQ8_0 {
    fn default() -> Self {
        BlockQ8_0 { d: 0, qs: [0; QK] }
    }
}

/// Marker for plain-old-data block types: every bit pattern is valid, no padding, no pointers.
///
/// # Safety
/// Implementors must be `#[repr(C)]` structs of integer fields only, without padding.
pub unsafe trait Block: Copy + 'static {}
// SAFETY: each is repr(C) of u8/i8/u16 arrays and fields with sizes asserted above (no padding).
unsafe impl Block for BlockQ4_0 {}
// SAFETY: as above.
unsafe impl Block for BlockQ4_1 {}
// SAFETY: as above.
unsafe impl Block for BlockQ5_0 {}
// SAFETY: as above.
unsafe impl Block for BlockQ5_1 {}
// SAFETY: as above.
unsafe impl Block for BlockQ8_0 {}
// SAFETY: as above.
unsafe impl Block for BlockQ5K {}
// SAFETY: as above.
unsafe impl Block for BlockQ4K {}
// SAFETY: as above.
unsafe impl Block for BlockQ6K {}
// SAFETY: u16 (f16 bits) and f32 have no invalid bit patterns either.
unsafe impl Block for u16 {}
// SAFETY: as above.
unsafe impl Block for f32 {}
// SAFETY: as above (the words behind repacked matrices).
unsafe impl Block for u64 {}

/// Views `bytes` as a slice of blocks, or `None` when the length or alignment does not fit.
pub fn as_blocks<T: Block>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: T is plain old data (trait contract), so any initialised bytes are a valid T;
    // align_to only yields a middle part that is correctly aligned.
    let (pre, mid, post) = unsafe { bytes.align_to::<T>() };
    if pre.is_empty() && post.is_empty() {
        Some(mid)
    } else {
        None
    }
}

/// Views a slice of blocks as bytes (for writing files, reading repacked matrices).
pub fn block_bytes<T: Block>(blocks: &[T]) -> &[u8] {
    // SAFETY: T is plain old data without padding, so all its bytes are initialised.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

// ---------------------------------------------------------------------------------------------
// Reference dequantizers: one row of `out.len()` elements.

pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::Q4_0 => dequant_q4_0(blocks(row), out),
        GgmlType::Q4_1 => dequant_q4_1(blocks(row), out),
        GgmlType::Q5_0 => dequant_q5_0(blocks(row), out),
        GgmlType::Q5_1 => dequant_q5_1(blocks(row), out),
        GgmlType::Q8_0 => dequant_q8_0(blocks(row), out),
        GgmlType::Q4K => dequant_q4k(blocks(row), out),
        GgmlType::Q5K => dequant_q5k(blocks(row), out),
        GgmlType::Q6K => dequant_q6k(blocks(row), out),
        // The loader refuses unsupported types before any row is read.
        other => unreachable!(
            "dequantize_row called for unsupported type {}",
            other.name()
        ),
    }
}

/// Rows of the model are validated for size and alignment at load: a mismatch here is a bug.
fn blocks<T: Block>(row: &[u8]) -> &[T] {
    as_blocks(row).expect("weight row validated at load")
}

pub fn dequant_q4_0(b: &[BlockQ4_0], out: &mut [f32]) {
    for (blk, y) in b.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16_to_f32(blk.d);
        for j in 0..QK / 2 {
            y[j] = ((blk.qs[j] & 0x0f) as i32 - 8) as f32 * d;
            y[j + QK / 2] = ((blk.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequant_q4_1(b: &[BlockQ4_1], out: &mut [f32]) {
    for (blk, y) in b.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16_to_f32(blk.d);
        let m = f16_to_f32(blk.m);
        for j in 0..QK / 2 {
            y[j] = (blk.qs[j] & 0x0f) as f32 * d + m;
            y[j + QK / 2] = (blk.qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// The 32 unsigned five-bit values of a Q5_0 or Q5_1 block: element j's low four bits in the
/// low (j < 16) or high nibble of qs[j % 16], its fifth in bit j of `qh` (little-endian).
#[inline]
pub fn q5_values(qs: &[u8; QK / 2], qh: [u8; 4]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut v = [0u8; QK];
    for j in 0..QK / 2 {
        v[j] = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        v[j + QK / 2] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    v
}

/// The inverse of [`q5_values`]: qs and qh of 32 values below 32.
/// Five-bit codes (0..=31) as Q5_0/Q5_1 store them: low nibbles and a word of high bits.
pub fn pack_q5(q: &[u8; QK]) -> ([u8; QK / 2], [u8; 4]) {
    let (mut qs, mut qh) = ([0u8; QK / 2], 0u32);
    for j in 0..QK / 2 {
        qs[j] = (q[j] & 0x0f) | ((q[j + QK / 2] & 0x0f) << 4);
        qh |= ((q[j] >> 4) as u32 & 1) << j;
        qh |= ((q[j + QK / 2] >> 4) as u32 & 1) << (j + 16);
    }
    (qs, qh.to_le_bytes())
}

pub fn dequant_q5_0(b: &[BlockQ5_0], out: &mut [f32]) {
    for (blk, y) in b.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16_to_f32(blk.d);
        for (o, &v) in y.iter_mut().zip(&q5_values(&blk.qs, blk.qh)) {
            *o = (v as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequant_q5_1(b: &[BlockQ5_1], out: &mut [f32]) {
    for (blk, y) in b.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_to_f32(blk.d), f16_to_f32(blk.m));
        for (o, &v) in y.iter_mut().zip(&q5_values(&blk.qs, blk.qh)) {
            *o = v as f32 * d + m;
        }
    }
}

pub fn dequant_q8_0(b: &[BlockQ8_0], out: &mut [f32]) {
    for (blk, y) in b.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16_to_f32(blk.d);
        for (yj, &q) in y.iter_mut().zip(&blk.qs) {
            *yj = q as f32 * d;
        }
    }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K block.
#[inline]
pub fn q4k_scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

pub fn dequant_q4k(b: &[BlockQ4K], out: &mut [f32]) {
    for (blk, y) in b.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_to_f32(blk.d);
        let min = f16_to_f32(blk.dmin);
        for (c, chunk) in y.chunks_exact_mut(64).enumerate() {
            let q = &blk.qs[c * 32..c * 32 + 32];
            let (sc1, m1) = q4k_scale_min(2 * c, &blk.scales);
            let (sc2, m2) = q4k_scale_min(2 * c + 1, &blk.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                chunk[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                chunk[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

pub fn dequant_q5k(b: &[BlockQ5K], out: &mut [f32]) {
    for (blk, y) in b.iter().zip(out.chunks_exact_mut(QK_K)) {
        let (d, min) = (f16_to_f32(blk.d), f16_to_f32(blk.dmin));
        for (j, sub) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = q4k_scale_min(j, &blk.scales);
            let (dj, mj) = (d * sc as f32, min * m as f32);
            let q = &blk.qs[(j / 2) * 32..(j / 2) * 32 + 32];
            for (l, o) in sub.iter_mut().enumerate() {
                let v = ((q[l] >> (4 * (j % 2))) & 0x0f) | (((blk.qh[l] >> j) & 1) << 4);
                *o = dj * v as f32 - mj;
            }
        }
    }
}

pub fn dequant_q6k(b: &[BlockQ6K], out: &mut [f32]) {
    for (blk, y) in b.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_to_f32(blk.d);
        for (n, y) in y.chunks_exact_mut(128).enumerate() {
            let ql = &blk.ql[n * 64..n * 64 + 64];
            let qh = &blk.qh[n * 32..n * 32 + 32];
            let sc = &blk.scales[n * 8..n * 8 + 8];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * sc[is] as f32 * q1 as f32;
                y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantizers. Round to nearest, as ggml's reference quantizers do.

pub fn quantize_q4_0(x: &[f32]) -> Vec<BlockQ4_0> {
    x.chunks_exact(QK)
        .map(|c| {
            // ggml: the value of largest magnitude maps to -8, so d carries its sign.
            let mut max = 0f32;
            for &v in c {
                if v.abs() > max.abs() {
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut b = BlockQ4_0 {
                d: f32_to_f16(d),
                qs: [0; 16],
            };
            for j in 0..16 {
                let q0 = ((c[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                let q1 = ((c[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                b.qs[j] = q0 | (q1 << 4);
            }
            b
        })
        .collect()
}

pub fn quantize_q4_1(x: &[f32]) -> Vec<BlockQ4_1> {
    x.chunks_exact(QK)
        .map(|c| {
            let min = c.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = c.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut b = BlockQ4_1 {
                d: f32_to_f16(d),
                m: f32_to_f16(min),
                qs: [0; 16],
            };
            for j in 0..16 {
                let q0 = (((c[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                let q1 = (((c[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                b.qs[j] = q0 | (q1 << 4);
            }
            b
        })
        .collect()
}

pub fn quantize_q5_0(x: &[f32]) -> Vec<BlockQ5_0> {
    x.chunks_exact(QK)
        .map(|c| {
            let mut max = 0f32;
            for &v in c {
                if v.abs() > max.abs() {
                    max = v;
                }
            }
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0u8; QK];
            for (qj, &v) in q.iter_mut().zip(c) {
                *qj = ((v * id + 16.5) as i32).clamp(0, 31) as u8;
            }
            let (qs, qh) = pack_q5(&q);
            BlockQ5_0 {
                d: f32_to_f16(d),
                qh,
                qs,
            }
        })
        .collect()
}

pub fn quantize_q5_1(x: &[f32]) -> Vec<BlockQ5_1> {
    x.chunks_exact(QK)
        .map(|c| {
            let min = c.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = c.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 31.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0u8; QK];
            for (qj, &v) in q.iter_mut().zip(c) {
                *qj = (((v - min) * id + 0.5) as i32).clamp(0, 31) as u8;
            }
            let (qs, qh) = pack_q5(&q);
            BlockQ5_1 {
                d: f32_to_f16(d),
                m: f32_to_f16(min),
                qh,
                qs,
            }
        })
        .collect()
}

pub fn quantize_q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
    let mut out = vec![BlockQ8_0::default(); x.len() / QK];
    quantize_q8_0_into(x, &mut out);
    out
}

/// [`quantize_q8_0`] into blocks the caller owns (`x.len() / 32` of them); allocates nothing.
pub fn quantize_q8_0_into(x: &[f32], out: &mut [BlockQ8_0]) {
    for (b, c) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        for (q, &v) in b.qs.iter_mut().zip(c) {
            // Round half away from zero as `f32::round` does (but for values within an ulp of
            // a half), in a form the compiler vectorizes: `round` is a libm call on baseline
            // x86_64, and a saturating cast is a branchy one. |v · id| ≤ 127; the clamp also
            // turns NaN into a number, which makes the unchecked conversion sound.
            let x = v * id;
            #[allow(clippy::manual_clamp)] // clamp keeps NaN; max/min replace it
            let r = (x + 0.5f32.copysign(x)).max(-127.0).min(127.0);
            // SAFETY: r is finite and inside i32's range (clamped above).
            *q = unsafe { r.to_int_unchecked::<i32>() } as i8;
        }
    }
}

/// A simple Q4_K quantizer (per-sub-block min/max, 6-bit scales): enough for tests.
/// Scales, mins and unsigned values (0..=`top`) of one 256-weight block as Q4_K and Q5_K
/// store them: per 32, `w ≈ d·sc·q − dmin·m` with six-bit `sc` and `m`.
fn quantize_k_min(c: &[f32], top: f32) -> (u16, u16, [u8; 12], [u8; QK_K]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, sb) in c.chunks_exact(32).enumerate() {
        let min = sb.iter().cloned().fold(f32::INFINITY, f32::min).min(0.0);
        let max = sb.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        scales[j] = (max - min) / top;
        mins[j] = -min;
    }
    let max_scale = scales.iter().cloned().fold(0f32, f32::max);
    let max_min = mins.iter().cloned().fold(0f32, f32::max);
    let d = max_scale / 63.0;
    let dmin = max_min / 63.0;
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = if d > 0.0 {
            ((scales[j] / d).round() as i32).clamp(0, 63) as u8
        } else {
            0
        };
        lm[j] = if dmin > 0.0 {
            ((mins[j] / dmin).round() as i32).clamp(0, 63) as u8
        } else {
            0
        };
    }
    let sc = pack_k_scales(&ls, &lm);
    let d16 = f32_to_f16(d);
    let dmin16 = f32_to_f16(dmin);
    let (dr, mr) = (f16_to_f32(d16), f16_to_f32(dmin16));
    let mut q = [0u8; QK_K];
    for (j, qj) in q.chunks_exact_mut(32).enumerate() {
        let (s, m) = q4k_scale_min(j, &sc);
        let ds = dr * s as f32;
        let dm = mr * m as f32;
        for (l, o) in qj.iter_mut().enumerate() {
            let v = c[j * 32 + l];
            *o = if ds > 0.0 {
                (((v + dm) / ds).round() as i32).clamp(0, top as i32) as u8
            } else {
                0
            };
        }
    }
    (d16, dmin16, sc, q)
}

pub fn quantize_q4k(x: &[f32]) -> Vec<BlockQ4K> {
    x.chunks_exact(QK_K)
        .map(|c| {
            let (d, dmin, scales, q) = quantize_k_min(c, 15.0);
            q4k_block(d, dmin, scales, &q)
        })
        .collect()
}

pub fn quantize_q5k(x: &[f32]) -> Vec<BlockQ5K> {
    x.chunks_exact(QK_K)
        .map(|c| {
            let (d, dmin, scales, q) = quantize_k_min(c, 31.0);
            q5k_block(d, dmin, scales, &q)
        })
        .collect()
}

/// A simple Q6_K quantizer (per-16 absmax, 8-bit scales): enough for tests.
pub fn quantize_q6k(x: &[f32]) -> Vec<BlockQ6K> {
    x.chunks_exact(QK_K)
        .map(|c| {
            let mut sub = [0f32; 16];
            for (j, sb) in c.chunks_exact(16).enumerate() {
                sub[j] = sb.iter().fold(0f32, |m, v| m.max(v.abs())) / 31.0;
            }
            let max_sub = sub.iter().cloned().fold(0f32, f32::max);
            let d = max_sub / 127.0;
            let d16 = f32_to_f16(d);
            let dr = f16_to_f32(d16);
            let mut scales = [0i8; 16];
            for j in 0..16 {
                scales[j] = if dr > 0.0 {
                    ((sub[j] / dr).round() as i32).clamp(-128, 127) as i8
                } else {
                    0
                };
            }
            let mut q = [0u8; 256];
            for (i, v) in c.iter().enumerate() {
                let s = dr * scales[i / 16] as f32;
                let qi = if s != 0.0 {
                    ((v / s).round() as i32).clamp(-32, 31)
                } else {
                    0
                };
                q[i] = (qi + 32) as u8;
            }
            q6k_block(d16, scales, &q)
        })
        .collect()
}

/// Six-bit scales and mins of Q4_K/Q5_K's eight sub-blocks, packed into their 12 bytes.
pub fn pack_k_scales(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut sc = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            sc[j] = ls[j];
            sc[j + 4] = lm[j];
        } else {
            sc[j + 4] = (ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4);
            sc[j - 4] |= (ls[j] >> 4) << 6;
            sc[j] |= (lm[j] >> 4) << 6;
        }
    }
    sc
}

/// A Q4_K block from its header and 256 codes (0..=15).
pub fn q4k_block(d: u16, dmin: u16, scales: [u8; 12], q: &[u8; QK_K]) -> BlockQ4K {
    let mut qs = [0u8; 128];
    for (j, qj) in q.chunks_exact(32).enumerate() {
        for (l, &v) in qj.iter().enumerate() {
            qs[(j / 2) * 32 + l] |= (v & 0x0f) << (4 * (j % 2));
        }
    }
    BlockQ4K {
        d,
        dmin,
        scales,
        qs,
    }
}

/// A Q5_K block from its header and 256 codes (0..=31).
pub fn q5k_block(d: u16, dmin: u16, scales: [u8; 12], q: &[u8; QK_K]) -> BlockQ5K {
    let (mut qs, mut qh) = ([0u8; 128], [0u8; 32]);
    for (j, qj) in q.chunks_exact(32).enumerate() {
        for (l, &v) in qj.iter().enumerate() {
            qs[(j / 2) * 32 + l] |= (v & 0x0f) << (4 * (j % 2));
            qh[l] |= ((v >> 4) & 1) << j;
        }
    }
    BlockQ5K {
        d,
        dmin,
        scales,
        qh,
        qs,
    }
}

/// A Q6_K block from its scale, sixteen sub-block scales and 256 codes (0..=63, value − 32).
pub fn q6k_block(d: u16, scales: [i8; 16], q: &[u8; QK_K]) -> BlockQ6K {
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for n in 0..2 {
        for l in 0..32 {
            let b = n * 128;
            let (q1, q2, q3, q4) = (q[b + l], q[b + l + 32], q[b + l + 64], q[b + l + 96]);
            ql[n * 64 + l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[n * 64 + l + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[n * 32 + l] = ((q1 >> 4) & 3)
                | (((q2 >> 4) & 3) << 2)
                | (((q3 >> 4) & 3) << 4)
                | (((q4 >> 4) & 3) << 6);
        }
    }
    BlockQ6K { ql, qh, scales, d }
}

/// Encodes f32 values as a tensor of type `ty` (for tests and synthetic models).
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x
            .iter()
            .flat_map(|&v| f32_to_f16(v).to_le_bytes())
            .collect(),
        GgmlType::Q4_0 => block_bytes(&quantize_q4_0(x)).to_vec(),
        GgmlType::Q4_1 => block_bytes(&quantize_q4_1(x)).to_vec(),
        GgmlType::Q5_0 => block_bytes(&quantize_q5_0(x)).to_vec(),
        GgmlType::Q5_1 => block_bytes(&quantize_q5_1(x)).to_vec(),
        GgmlType::Q8_0 => block_bytes(&quantize_q8_0(x)).to_vec(),
        GgmlType::Q4K => block_bytes(&quantize_q4k(x)).to_vec(),
        GgmlType::Q5K => block_bytes(&quantize_q5k(x)).to_vec(),
        GgmlType::Q6K => block_bytes(&quantize_q6k(x)).to_vec(),
        other => panic!("no quantizer for {}", other.name()),
    }
}
