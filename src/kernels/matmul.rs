//! Matrix × activations for a batch of tokens, split over the pool by output rows.
//!
//! Integer types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) dot their blocks with the activations
//! quantized to 8 bits — in ggml's layout, or repacked in groups of eight rows (`packed`, x86);
//! F32 and F16, and every type in exact mode, dequantize each weight row once into a per-thread
//! scratch row and dot it in f32 with every token of the batch.

use super::packed::{self, PTile, Packed, ROWS};
use super::pool::{split, Pool, Shards};
use super::quant::{as_blocks, dequantize_row, Block, BlockQ8, GgmlType, QK};
use super::{Kernels, Tile};

/// A weight matrix: `rows` rows of `cols` elements of type `ty`, in place in the mapping in
/// ggml's layout, or repacked in groups of eight rows (`packed`, see [`super::packed`]).
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    pub packed: bool,
}

impl<'a> Matrix<'a> {
    /// Row `r`'s bytes in ggml's layout (not for packed matrices).
    pub fn row(&self, r: usize) -> &'a [u8] {
        debug_assert!(!self.packed, "packed matrices have no ggml rows");
        let rb = self.ty.row_bytes(self.cols);
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Row `r` in f32, from either layout.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.packed {
            packed::dequantize_row(self.ty, self.cols, self.data, r, &mut out[..self.cols]);
        } else {
            dequantize_row(self.ty, self.row(r), &mut out[..self.cols]);
        }
    }
}

/// Activations of `n` tokens with `cols` features, in f32 and quantized to 8 bits.
#[derive(Clone, Copy)]
pub struct Acts<'a> {
    pub n: usize,
    pub cols: usize,
    /// (n, cols)
    pub f: &'a [f32],
    /// (n, cols / 32)
    pub q: &'a [BlockQ8],
}

impl Acts<'_> {
    fn f_row(&self, t: usize) -> &[f32] {
        &self.f[t * self.cols..(t + 1) * self.cols]
    }
    fn q_row(&self, t: usize) -> &[BlockQ8] {
        let nb = self.cols / QK;
        &self.q[t * nb..(t + 1) * nb]
    }
}

/// Whether `matmul` reads the quantized activations for this weight type and kernel set.
pub fn uses_q8(k: &Kernels, ty: GgmlType) -> bool {
    !k.exact()
        && matches!(
            ty,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4K
                | GgmlType::Q5K
                | GgmlType::Q6K
        )
}

/// `out[t][r] = w[r] · x[t]` for rows `rows` of `w`, every token `t`; `out` is (n, w.rows).
/// `scratch` holds at least `w.cols` floats.
pub fn matmul_rows(
    k: &Kernels,
    w: &Matrix,
    x: &Acts,
    rows: std::ops::Range<usize>,
    out: &Shards<f32>,
    scratch: &mut [f32],
) {
    debug_assert_eq!(w.cols, x.cols);
    if w.packed && !k.exact() {
        match w.ty {
            GgmlType::Q4_0 => packed_rows(k.ptile_q4_0, w, x, rows, out),
            GgmlType::Q4_1 => packed_rows(k.ptile_q4_1, w, x, rows, out),
            GgmlType::Q5_0 => packed_rows(k.ptile_q5_0, w, x, rows, out),
            GgmlType::Q5_1 => packed_rows(k.ptile_q5_1, w, x, rows, out),
            GgmlType::Q8_0 => packed_rows(k.ptile_q8_0, w, x, rows, out),
            other => unreachable!("{} is never packed", other.name()),
        }
        return;
    }
    if uses_q8(k, w.ty) {
        match w.ty {
            GgmlType::Q4_0 => int_rows(k.tile_q4_0, w, x, rows, out),
            GgmlType::Q4_1 => int_rows(k.tile_q4_1, w, x, rows, out),
            GgmlType::Q8_0 => int_rows(k.tile_q8_0, w, x, rows, out),
            GgmlType::Q5_0 => int_rows(k.tile_q5_0, w, x, rows, out),
            GgmlType::Q5_1 => int_rows(k.tile_q5_1, w, x, rows, out),
            GgmlType::Q5K => int_rows(k.tile_q5k, w, x, rows, out),
            GgmlType::Q4K => int_rows(k.tile_q4k, w, x, rows, out),
            GgmlType::Q6K => int_rows(k.tile_q6k, w, x, rows, out),
            other => unreachable!("uses_q8 admits {}", other.name()),
        }
        return;
    }
    // Dequantize each row once, dot it with every token in f32.
    for r in rows {
        let direct = if w.ty == GgmlType::F32 && !k.exact() {
            // f32 rows aligned in the mapping need no copy.
            as_blocks::<f32>(w.row(r))
        } else {
            None
        };
        let row: &[f32] = match direct {
            Some(row) => row,
            None => {
                w.dequantize_row(r, scratch);
                &scratch[..w.cols]
            }
        };
        for t in 0..x.n {
            // SAFETY: as above.
            unsafe { out.part(t * w.rows + r, 1)[0] = (k.dot_f32)(row, x.f_row(t)) };
        }
    }
}

/// Integer rows in tiles: for a batch, 2 rows × 4 tokens over bands of rows small enough to stay
/// in L1 while every token passes over them; for one token, see `decode_rows`.
fn int_rows<B: Block>(
    tile: Tile<B>,
    w: &Matrix,
    x: &Acts,
    rows: std::ops::Range<usize>,
    out: &Shards<f32>,
) {
    if x.n == 1 {
        decode_rows(tile, w, x, rows, out);
        return;
    }
    const BAND: usize = 16;
    let (rt, ct) = (2, 4);
    let mut band = rows.start;
    while band < rows.end {
        let band_end = (band + BAND).min(rows.end);
        let mut t0 = 0;
        while t0 < x.n {
            let nc = (x.n - t0).min(ct);
            let mut xs: [&[BlockQ8]; 4] = [&[]; 4];
            for (c, xc) in xs.iter_mut().enumerate().take(nc) {
                *xc = x.q_row(t0 + c);
            }
            let mut r = band;
            while r < band_end {
                let nr = (band_end - r).min(rt);
                let mut ws: [&[B]; 2] = [&[]; 2];
                for (i, wi) in ws.iter_mut().enumerate().take(nr) {
                    *wi = blocks(w.row(r + i));
                }
                let mut o = [0f32; 8];
                tile(&ws[..nr], &xs[..nc], &mut o[..nr * nc]);
                for c in 0..nc {
                    // SAFETY: this thread's rows only (ranges from `split` are disjoint).
                    let dst = unsafe { out.part((t0 + c) * w.rows + r, nr) };
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = o[i * nc + c];
                    }
                }
                r += nr;
            }
            t0 += nc;
        }
        band = band_end;
    }
}

/// One token: tiles of 8 rows taken `stride` rows apart (row i of each eighth of the range), so
/// that each of the 8 rows a tile reads continues where the previous tile's left off. The
/// weights are then read as 8 forward streams, which the hardware prefetcher follows, instead of
/// 8 short interleaved runs inside one region, which it does not: on a 2-core Xeon this is the
/// difference between 7 and 13 GB/s from one core.
fn decode_rows<B: Block>(
    tile: Tile<B>,
    w: &Matrix,
    x: &Acts,
    rows: std::ops::Range<usize>,
    out: &Shards<f32>,
) {
    let xs = [x.q_row(0)];
    let n = rows.len();
    let stride = n / 8;
    let nb = w.cols / w.ty.block_size();
    let all: &[B] = blocks(w.data);
    for i in 0..stride {
        let mut ws: [&[B]; 8] = [&[]; 8];
        for (k, wk) in ws.iter_mut().enumerate() {
            let r = rows.start + k * stride + i;
            *wk = &all[r * nb..(r + 1) * nb];
        }
        let mut o = [0f32; 8];
        tile(&ws, &xs, &mut o);
        for (k, v) in o.iter().enumerate() {
            // SAFETY: this thread's rows only (ranges from `split` are disjoint).
            unsafe { out.part(rows.start + k * stride + i, 1)[0] = *v };
        }
    }
    for r in rows.start + 8 * stride..rows.end {
        let mut o = [0f32; 1];
        tile(&[blocks(w.row(r))], &xs, &mut o);
        // SAFETY: as above.
        unsafe { out.part(r, 1)[0] = o[0] };
    }
}

/// Packed rows (`rows` starts and ends on a group of eight): for a batch, bands of groups small
/// enough to stay in L1 while every token passes over them, one group × 4 tokens a tile; for
/// one token, four groups a call, each group one forward stream.
fn packed_rows<P: Packed>(
    tile: PTile<P>,
    w: &Matrix,
    x: &Acts,
    rows: std::ops::Range<usize>,
    out: &Shards<f32>,
) {
    debug_assert!(rows.start.is_multiple_of(ROWS) && rows.end.is_multiple_of(ROWS));
    let nb = w.cols / QK;
    let all: &[P] = blocks(w.data);
    let group = |g: usize| &all[g * nb..(g + 1) * nb];
    let (g0, g1) = (rows.start / ROWS, rows.end / ROWS);
    let mut o = [0f32; ROWS * 4];
    if x.n == 1 {
        let xs = [x.q_row(0)];
        let mut g = g0;
        while g < g1 {
            let ng = (g1 - g).min(4);
            let mut ws: [&[P]; 4] = [&[]; 4];
            for (i, wi) in ws.iter_mut().enumerate().take(ng) {
                *wi = group(g + i);
            }
            tile(&ws[..ng], &xs, &mut o[..ROWS * ng]);
            // SAFETY: this thread's rows only (ranges from `split` are disjoint).
            unsafe { out.part(g * ROWS, ROWS * ng) }.copy_from_slice(&o[..ROWS * ng]);
            g += ng;
        }
        return;
    }
    let band = (16 * 1024 / (nb * std::mem::size_of::<P>())).max(1);
    let mut b0 = g0;
    while b0 < g1 {
        let b1 = (b0 + band).min(g1);
        let mut t0 = 0;
        while t0 < x.n {
            let nc = (x.n - t0).min(4);
            let mut xs: [&[BlockQ8]; 4] = [&[]; 4];
            for (c, xc) in xs.iter_mut().enumerate().take(nc) {
                *xc = x.q_row(t0 + c);
            }
            for g in b0..b1 {
                tile(&[group(g)], &xs[..nc], &mut o[..ROWS * nc]);
                for c in 0..nc {
                    // SAFETY: this thread's rows only (ranges from `split` are disjoint).
                    let dst = unsafe { out.part((t0 + c) * w.rows + g * ROWS, ROWS) };
                    dst.copy_from_slice(&o[ROWS * c..ROWS * (c + 1)]);
                }
            }
            t0 += nc;
        }
        b0 = b1;
    }
}

fn blocks<T: Block>(row: &[u8]) -> &[T] {
    as_blocks(row).expect("weight rows validated at load")
}

/// Several products of the same activations, in one parallel step: `(w_i, out_i)` pairs with
/// `out_i` of shape (x.n, w_i.rows). `scratch` holds `pool.n_threads() × max cols` floats.
pub fn matmul(
    pool: &mut Pool,
    k: &Kernels,
    x: &Acts,
    jobs: &mut [(&Matrix, &mut [f32])],
    scratch: &mut [f32],
) {
    let nt = pool.n_threads();
    let cols = x.cols;
    assert!(scratch.len() >= nt * cols, "matmul scratch too small");
    let mut shards: heapless::Vec<(Matrix, Shards<f32>), 4> = heapless::Vec::new();
    for (w, out) in jobs.iter_mut() {
        assert!(out.len() >= x.n * w.rows, "matmul output too small");
        assert_eq!(w.cols, cols, "matmul shapes disagree");
        if shards.push((**w, Shards::new(out))).is_err() {
            panic!("at most 4 products per step");
        }
    }
    let scratch = Shards::new(scratch);
    // Each product is cut into 2 pieces a thread, which the threads claim in turn as they
    // finish: a thread that the system stalls (a busy VM, a little core beside big ones)
    // delays the step by one piece, not by its whole share.
    let pieces = if nt == 1 { 1 } else { 2 * nt };
    pool.run(shards.len() * pieces, &|i, tid| {
        // SAFETY: thread `tid` alone uses scratch row `tid`.
        let s = unsafe { scratch.part(tid * cols, cols) };
        let (w, out) = &shards[i / pieces];
        let rows = split(w.rows, i % pieces, pieces, 8);
        matmul_rows(k, w, x, rows, out, s);
    });
}
