//! Matrix × activations for a batch of tokens, split over the pool by output rows.
//!
//! Integer types (Q4_0, Q4_1, Q5_0, Q8_0) dot their blocks with the activations quantized to 8
//! bits; the other types (F32, F16, Q4_K, Q6_K), and every type in exact mode, dequantize each
//! weight row once into a per-thread scratch row and dot it in f32 with every token of the batch.

use super::pool::{split, Pool, Shards};
use super::quant::{as_blocks, dequantize_row, BlockQ8, GgmlType, QK};
use super::Kernels;

/// A weight matrix in place in the mapping: `rows` rows of `cols` elements of type `ty`.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> Matrix<'a> {
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.ty.row_bytes(self.cols);
        &self.data[r * rb..(r + 1) * rb]
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
    !k.exact() && matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0)
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
    // Tiles of rows keep a few weight rows in L1 while every token of the batch passes over them.
    const TILE: usize = 16;
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + TILE).min(rows.end);
        for t in 0..x.n {
            // SAFETY: each thread writes only its own rows of each token's output row; row
            // ranges from `split` are disjoint.
            let o = unsafe { out.part(t * w.rows + r0, r1 - r0) };
            if uses_q8(k, w.ty) {
                let xq = x.q_row(t);
                for (r, o) in (r0..r1).zip(o.iter_mut()) {
                    *o = dot_q(k, w.ty, w.row(r), xq);
                }
            } else {
                let xf = x.f_row(t);
                for (r, o) in (r0..r1).zip(o.iter_mut()) {
                    if w.ty == GgmlType::F32 && !k.exact() {
                        // No copy needed for f32 rows that are aligned in the mapping.
                        if let Some(row) = as_blocks::<f32>(w.row(r)) {
                            *o = (k.dot_f32)(row, xf);
                            continue;
                        }
                    }
                    dequantize_row(w.ty, w.row(r), &mut scratch[..w.cols]);
                    *o = (k.dot_f32)(&scratch[..w.cols], xf);
                }
            }
        }
        r0 = r1;
    }
}

#[inline]
fn dot_q(k: &Kernels, ty: GgmlType, row: &[u8], x: &[BlockQ8]) -> f32 {
    // Rows were checked for size and alignment when the model was loaded.
    match ty {
        GgmlType::Q4_0 => (k.dot_q4_0)(blocks(row), x),
        GgmlType::Q4_1 => (k.dot_q4_1)(blocks(row), x),
        GgmlType::Q5_0 => (k.dot_q5_0)(blocks(row), x),
        GgmlType::Q8_0 => (k.dot_q8_0)(blocks(row), x),
        other => unreachable!("no integer kernel for {}", other.name()),
    }
}

fn blocks<T: super::quant::Block>(row: &[u8]) -> &[T] {
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
    pool.run(&|tid, nt| {
        // SAFETY: thread `tid` alone uses scratch row `tid`.
        let s = unsafe { scratch.part(tid * cols, cols) };
        for (w, out) in shards.iter() {
            let rows = split(w.rows, tid, nt, 8);
            matmul_rows(k, w, x, rows, out, s);
        }
    });
}
