//! Weights repacked at load into groups of eight rows, for the x86 kernels.
//!
//! A packed block holds block `b` of eight consecutive rows, interleaved four elements at a
//! time: "group" `g` (0..8) of a block is elements `4g..4g + 4` of each row, one row per 32-bit
//! lane. One dot-product instruction (`vpdpbusd`, or `pmaddubsw` + `pmaddwd`) of a group against
//! the four activations it meets, broadcast to every lane, then adds four products into each
//! row's own lane: eight rows' sums come out side by side, with no horizontal reduction, and
//! the weights of a group are loaded once for every token of a batch. Decoding reads each
//! group of rows as one forward stream.
//!
//! Every packed block is exactly the size of the eight blocks it holds: a repacked matrix takes
//! the memory its mapped pages took, and those pages are given back once it is packed.

use super::quant::{
    dequant_q4_0, dequant_q4_1, dequant_q5_0, dequant_q5_1, dequant_q8_0, Block, BlockQ4_0,
    BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8, BlockQ8_0, GgmlType, QK,
};

/// Rows in a packed group.
pub const ROWS: usize = 8;

/// A block of eight rows in one of the layouts below, made from and turned back into the
/// blocks of its source type.
pub trait Packed: Block {
    type Src: Block;
    /// Writes the packed form of eight rows' blocks over `out`.
    fn pack_into(src: [&Self::Src; ROWS], out: &mut Self);
    fn pack(src: [&Self::Src; ROWS]) -> Self {
        // SAFETY: `Block` types are plain old data: all zeros is a valid value.
        let mut p: Self = unsafe { std::mem::zeroed() };
        Self::pack_into(src, &mut p);
        p
    }
    /// Row `r`'s block, as it was.
    fn unpack(&self, r: usize) -> Self::Src;
    /// The eight rows' f16 scales.
    fn d_bits(&self) -> &[u16; ROWS];
}

/// Q4_0 × 8: `qs[32h + 4i + k]` is `qs[4h + k]` of row i (h, k < 4): its low nibbles are
/// group h, its high nibbles group h + 4.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct P4_0 {
    pub d: [u16; ROWS],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<P4_0>() == ROWS * 18);

/// Q4_1 × 8: as [`P4_0`] with each row's offset `m`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct P4_1 {
    pub d: [u16; ROWS],
    pub m: [u16; ROWS],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<P4_1>() == ROWS * 20);

/// Q5_0 × 8: low four bits as [`P4_0`]; the fifth bit of element `4G + k` of row i is bit G
/// of `qh[4i + k]`, so one shift and mask per group puts it in place for all eight rows.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct P5_0 {
    pub d: [u16; ROWS],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<P5_0>() == ROWS * 22);

/// Q5_1 × 8: as [`P5_0`] with each row's offset `m`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct P5_1 {
    pub d: [u16; ROWS],
    pub m: [u16; ROWS],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<P5_1>() == ROWS * 24);

/// Q8_0 × 8: `qs[32g + 4i + k]` is element `4g + k` of row i.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct P8_0 {
    pub d: [u16; ROWS],
    pub qs: [i8; 256],
}
const _: () = assert!(std::mem::size_of::<P8_0>() == ROWS * 34);

// SAFETY: repr(C) structs of u16/u8/i8 arrays whose sizes are asserted above: no padding.
unsafe impl Block for P4_0 {}
// SAFETY: as above.
unsafe impl Block for P4_1 {}
// SAFETY: as above.
unsafe impl Block for P5_0 {}
// SAFETY: as above.
unsafe impl Block for P5_1 {}
// SAFETY: as above.
unsafe impl Block for P8_0 {}

/// Nibble bytes of eight rows, interleaved four bytes at a time.
#[inline(always)]
fn pack_nibbles(src: [&[u8; 16]; ROWS], qs: &mut [u8; 128]) {
    for (i, s) in src.iter().enumerate() {
        for h in 0..4 {
            qs[32 * h + 4 * i..32 * h + 4 * i + 4].copy_from_slice(&s[4 * h..4 * h + 4]);
        }
    }
}

fn unpack_nibbles(qs: &[u8; 128], i: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    for h in 0..4 {
        out[4 * h..4 * h + 4].copy_from_slice(&qs[32 * h + 4 * i..32 * h + 4 * i + 4]);
    }
    out
}

/// Fifth bits of eight rows (each a little-endian u32, bit j for element j) rearranged so
/// that bit G of byte `4i + k` is row i's bit `4G + k`.
#[inline(always)]
fn pack_fifth(src: [[u8; 4]; ROWS], qh: &mut [u8; 32]) {
    for (i, s) in src.iter().enumerate() {
        let bits = u32::from_le_bytes(*s);
        for k in 0..4 {
            // Bits k, k + 4, …, k + 28 gathered into one byte, pairs then nibbles then bytes.
            let x = (bits >> k) & 0x1111_1111;
            let x = (x | x >> 3) & 0x0303_0303;
            let x = (x | x >> 6) & 0x000f_000f;
            qh[4 * i + k] = ((x | x >> 12) & 0xff) as u8;
        }
    }
}

fn unpack_fifth(qh: &[u8; 32], i: usize) -> [u8; 4] {
    let mut bits = 0u32;
    for k in 0..4 {
        for g in 0..8 {
            bits |= (((qh[4 * i + k] >> g) & 1) as u32) << (4 * g + k);
        }
    }
    bits.to_le_bytes()
}

impl Packed for P4_0 {
    type Src = BlockQ4_0;
    fn d_bits(&self) -> &[u16; ROWS] {
        &self.d
    }
    fn pack_into(src: [&BlockQ4_0; ROWS], out: &mut P4_0) {
        out.d = src.map(|b| b.d);
        pack_nibbles(src.map(|b| &b.qs), &mut out.qs);
    }
    fn unpack(&self, r: usize) -> BlockQ4_0 {
        BlockQ4_0 {
            d: self.d[r],
            qs: unpack_nibbles(&self.qs, r),
        }
    }
}

impl Packed for P4_1 {
    type Src = BlockQ4_1;
    fn d_bits(&self) -> &[u16; ROWS] {
        &self.d
    }
    fn pack_into(src: [&BlockQ4_1; ROWS], out: &mut P4_1) {
        out.d = src.map(|b| b.d);
        out.m = src.map(|b| b.m);
        pack_nibbles(src.map(|b| &b.qs), &mut out.qs);
    }
    fn unpack(&self, r: usize) -> BlockQ4_1 {
        BlockQ4_1 {
            d: self.d[r],
            m: self.m[r],
            qs: unpack_nibbles(&self.qs, r),
        }
    }
}

impl Packed for P5_0 {
    type Src = BlockQ5_0;
    fn d_bits(&self) -> &[u16; ROWS] {
        &self.d
    }
    fn pack_into(src: [&BlockQ5_0; ROWS], out: &mut P5_0) {
        out.d = src.map(|b| b.d);
        pack_fifth(src.map(|b| b.qh), &mut out.qh);
        pack_nibbles(src.map(|b| &b.qs), &mut out.qs);
    }
    fn unpack(&self, r: usize) -> BlockQ5_0 {
        BlockQ5_0 {
            d: self.d[r],
            qh: unpack_fifth(&self.qh, r),
            qs: unpack_nibbles(&self.qs, r),
        }
    }
}

impl Packed for P5_1 {
    type Src = BlockQ5_1;
    fn d_bits(&self) -> &[u16; ROWS] {
        &self.d
    }
    fn pack_into(src: [&BlockQ5_1; ROWS], out: &mut P5_1) {
        out.d = src.map(|b| b.d);
        out.m = src.map(|b| b.m);
        pack_fifth(src.map(|b| b.qh), &mut out.qh);
        pack_nibbles(src.map(|b| &b.qs), &mut out.qs);
    }
    fn unpack(&self, r: usize) -> BlockQ5_1 {
        BlockQ5_1 {
            d: self.d[r],
            m: self.m[r],
            qh: unpack_fifth(&self.qh, r),
            qs: unpack_nibbles(&self.qs, r),
        }
    }
}

impl Packed for P8_0 {
    type Src = BlockQ8_0;
    fn d_bits(&self) -> &[u16; ROWS] {
        &self.d
    }
    fn pack_into(src: [&BlockQ8_0; ROWS], out: &mut P8_0) {
        for (i, s) in src.iter().enumerate() {
            for g in 0..8 {
                out.qs[32 * g + 4 * i..32 * g + 4 * i + 4].copy_from_slice(&s.qs[4 * g..4 * g + 4]);
            }
        }
        out.d = src.map(|b| b.d);
    }
    fn unpack(&self, r: usize) -> BlockQ8_0 {
        let mut qs = [0i8; QK];
        for g in 0..8 {
            qs[4 * g..4 * g + 4].copy_from_slice(&self.qs[32 * g + 4 * r..32 * g + 4 * r + 4]);
        }
        BlockQ8_0 { d: self.d[r], qs }
    }
}

/// Whether matrices of `ty` can be packed (their rows must also come in eights).
pub fn packable(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
    )
}

/// Packs rows `8·g0 .. 8·g1` of a matrix of type `ty` with `cols` columns (`src`: its bytes
/// in ggml's layout) into `out` (groups `g0..g1` of the packed layout, `(g1 − g0)` × the row
/// bytes × 8).
///
/// # Panics
/// If `ty` is not [`packable`] or the lengths disagree.
pub fn pack_groups(ty: GgmlType, cols: usize, src: &[u8], g0: usize, g1: usize, out: &mut [u8]) {
    fn go<P: Packed>(cols: usize, src: &[u8], g0: usize, g1: usize, out: &mut [u8]) {
        let nb = cols / QK;
        let src: &[P::Src] = as_blocks(src);
        let out: &mut [P] = as_blocks_mut(out);
        assert_eq!(out.len(), (g1 - g0) * nb, "packed output size");
        for g in g0..g1 {
            for b in 0..nb {
                let rows: [&P::Src; ROWS] = std::array::from_fn(|i| &src[(g * ROWS + i) * nb + b]);
                P::pack_into(rows, &mut out[(g - g0) * nb + b]);
            }
        }
    }
    match ty {
        GgmlType::Q4_0 => go::<P4_0>(cols, src, g0, g1, out),
        GgmlType::Q4_1 => go::<P4_1>(cols, src, g0, g1, out),
        GgmlType::Q5_0 => go::<P5_0>(cols, src, g0, g1, out),
        GgmlType::Q5_1 => go::<P5_1>(cols, src, g0, g1, out),
        GgmlType::Q8_0 => go::<P8_0>(cols, src, g0, g1, out),
        other => panic!("{} is not packable", other.name()),
    }
}

/// Row `r` of a packed matrix of type `ty` and `cols` columns, in f32.
pub fn dequantize_row(ty: GgmlType, cols: usize, data: &[u8], r: usize, out: &mut [f32]) {
    fn go<P: Packed>(
        cols: usize,
        data: &[u8],
        r: usize,
        out: &mut [f32],
        deq: fn(&[P::Src], &mut [f32]),
    ) {
        let nb = cols / QK;
        let all: &[P] = as_blocks(data);
        let group = &all[(r / ROWS) * nb..(r / ROWS + 1) * nb];
        for (blk, y) in group.iter().zip(out.chunks_exact_mut(QK)) {
            deq(&[blk.unpack(r % ROWS)], y);
        }
    }
    match ty {
        GgmlType::Q4_0 => go::<P4_0>(cols, data, r, out, dequant_q4_0),
        GgmlType::Q4_1 => go::<P4_1>(cols, data, r, out, dequant_q4_1),
        GgmlType::Q5_0 => go::<P5_0>(cols, data, r, out, dequant_q5_0),
        GgmlType::Q5_1 => go::<P5_1>(cols, data, r, out, dequant_q5_1),
        GgmlType::Q8_0 => go::<P8_0>(cols, data, r, out, dequant_q8_0),
        other => panic!("{} is not packable", other.name()),
    }
}

fn as_blocks<T: Block>(bytes: &[u8]) -> &[T] {
    super::quant::as_blocks(bytes).expect("packed data aligned and sized for its blocks")
}

fn as_blocks_mut<T: Block>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
        "packed output aligned and sized for its blocks"
    );
    // SAFETY: `T: Block` is plain old data (every bit pattern valid, no padding); the pointer is
    // aligned for T and the length a whole number of T (asserted above); the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / size) }
}

/// Tiles on packed weights: groups of eight rows (`w`: each group's blocks across the row) × C
/// tokens (`x`), `out[8(rC + c) + i] = dot(row i of group r, token c)`.
pub type PTile<P> = fn(&[&[P]], &[&[BlockQ8]], &mut [f32]);

/// The scalar twin of the packed tiles: each row unpacked block by block and dotted with
/// `dot`, the source type's scalar dot product.
pub fn tile<P: Packed>(
    dot: fn(&[P::Src], &[BlockQ8]) -> f32,
    w: &[&[P]],
    x: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let nc = x.len();
    for (r, g) in w.iter().enumerate() {
        for (c, xc) in x.iter().enumerate() {
            for i in 0..ROWS {
                out[ROWS * (r * nc + c) + i] = g
                    .iter()
                    .zip(xc.iter())
                    .map(|(blk, y)| dot(&[blk.unpack(i)], std::slice::from_ref(y)))
                    .sum();
            }
        }
    }
}

pub fn tile_q4_0(w: &[&[P4_0]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(super::generic::dot_q4_0, w, x, out)
}
pub fn tile_q4_1(w: &[&[P4_1]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(super::generic::dot_q4_1, w, x, out)
}
pub fn tile_q5_0(w: &[&[P5_0]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(super::generic::dot_q5_0, w, x, out)
}
pub fn tile_q5_1(w: &[&[P5_1]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(super::generic::dot_q5_1, w, x, out)
}
pub fn tile_q8_0(w: &[&[P8_0]], x: &[&[BlockQ8]], out: &mut [f32]) {
    tile(super::generic::dot_q8_0, w, x, out)
}
