//! Calibrated quantization: GPTQ (Frantar et al., 2022) with a weighted scale search per block.
//!
//! A matrix `W` (rows × n, one row per output) is used as `y = W x`. Over the calibration text,
//! `H = Σ x xᵀ` is the second moment of its input; the output error of a quantized row `q` is
//! `(w − q)ᵀ H (w − q)`. GPTQ quantizes the columns one at a time and spreads each column's
//! rounding error over the columns not yet quantized, in the proportions that minimise that
//! error (through the upper Cholesky factor `U` of `H⁻¹`: `Uᵀ U = H⁻¹`). Each block's scale (and
//! minimum) is chosen when GPTQ reaches the block, from the weights as they are then, by a
//! search over candidate scales weighted by `diag(H)` (the importance matrix's role). Every row
//! keeps whichever of GPTQ and plain rounding has the smaller error, so a calibrated file is
//! never worse than a plain one on the calibration data.
//!
//! Why GPTQ rather than AWQ: AWQ scales input channels and folds the inverse into the preceding
//! RMSNorm, which leaves `o`'s and `down`'s inputs (no norm before them) and a tied LM head (its
//! input scaling would change the embeddings) out; GPTQ treats every matrix alike, needs no change
//! to the graph, and works from the full `H` rather than its diagonal.
//!
//! `H` is kept as diagonal blocks of at most [`MAX_BLOCK`] columns (the whole matrix on models up
//! to that width; Qwen2.5-0.5B's 4,864-wide `down` gets three blocks): the error is compensated
//! within a block, which bounds memory and time at `n × MAX_BLOCK` instead of `n²`.

use std::collections::BTreeMap;

use crate::backend::cpu::Site;
use crate::kernels::quant::{
    block_bytes, dequantize_row, f16_to_f32, f32_to_f16, pack_k_scales, pack_q5, q4k_block,
    q5k_block, q6k_block, quantize, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0,
    GgmlType, QK_K,
};

/// The widest block of `H` kept whole.
pub const MAX_BLOCK: usize = 2048;
/// Added to `H`'s diagonal, as a fraction of its mean (GPTQ's damping).
const DAMP: f64 = 0.01;
/// GPTQ's lazy batch: columns quantized before the rest of the row is updated at once.
const LAZY: usize = 32;

// ---------------------------------------------------------------------------------------------
// The second moments.

/// `Σ x xᵀ` of one matrix input over the calibration rows, as diagonal blocks.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub n: usize,
    /// `(start, width)` of each block.
    pub blocks: Vec<(usize, usize)>,
    /// Each block's `width × width` sum (upper triangle until [`Hessian::finish`]).
    acc: Vec<Vec<f64>>,
    /// The same in f32 (after [`Hessian::finish`]), for the error products; before it, the
    /// batch's scratch.
    scratch: Vec<Vec<f32>>,
    pub rows: u64,
}

impl Hessian {
    pub fn new(n: usize) -> Hessian {
        let blocks = blocks_for(n);
        Hessian {
            n,
            acc: blocks.iter().map(|&(_, w)| vec![0f64; w * w]).collect(),
            scratch: Vec::new(),
            blocks,
            rows: 0,
        }
    }

    /// Adds the rows of `x` (`rows × n`, row-major).
    pub fn add(&mut self, x: &[f32]) {
        let n = self.n;
        let rows = x.len() / n;
        if rows == 0 {
            return;
        }
        if self.scratch.len() != self.blocks.len() {
            self.scratch = self
                .blocks
                .iter()
                .map(|&(_, w)| vec![0f32; w * w])
                .collect();
        }
        for ((&(c0, w), acc), t) in self
            .blocks
            .iter()
            .zip(self.acc.iter_mut())
            .zip(self.scratch.iter_mut())
        {
            t.fill(0.0);
            // t[i][j] = Σ_r x[r][c0+i] x[r][c0+j], upper tiles only, split over the threads.
            let a = &x[c0..];
            syrk_upper(w, rows, a, n, t);
            for (s, &v) in acc.iter_mut().zip(t.iter()) {
                *s += v as f64;
            }
        }
        self.rows += rows as u64;
    }

    /// Fills the lower triangles from the upper ones.
    pub fn finish(&mut self) {
        for (&(_, w), acc) in self.blocks.iter().zip(self.acc.iter_mut()) {
            for i in 0..w {
                for j in 0..i {
                    acc[i * w + j] = acc[j * w + i];
                }
            }
        }
        self.scratch = self
            .acc
            .iter()
            .map(|a| a.iter().map(|&v| v as f32).collect())
            .collect();
    }

    /// Block `b`'s matrix (`width × width`, after [`Hessian::finish`]).
    pub fn block(&self, b: usize) -> &[f64] {
        &self.acc[b]
    }

    /// The diagonal, as f32.
    pub fn diagonal(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.n];
        for (&(c0, w), acc) in self.blocks.iter().zip(&self.acc) {
            for i in 0..w {
                d[c0 + i] = acc[i * w + i] as f32;
            }
        }
        d
    }

    /// `eᵀ H e` for each row of `e` (`rows × n`), after [`Hessian::finish`].
    pub fn errors(&self, e: &[f32]) -> Vec<f64> {
        let n = self.n;
        let rows = e.len() / n;
        let mut total = vec![0f64; rows];
        for (&(c0, w), hb) in self.blocks.iter().zip(&self.scratch) {
            let mut m = vec![0f32; rows * w];
            gemm(rows, w, w, &e[c0..], (n, 1), hb, w, &mut m, w, 1.0, None);
            for (r, t) in total.iter_mut().enumerate() {
                let er = &e[r * n + c0..r * n + c0 + w];
                *t += m[r * w..(r + 1) * w]
                    .iter()
                    .zip(er)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>();
            }
        }
        total
    }
}

/// The column blocks of a width-`n` input: one if `n ≤ MAX_BLOCK`, else equal parts rounded up
/// to a multiple of 256 (a K-quant super-block never straddles two).
pub fn blocks_for(n: usize) -> Vec<(usize, usize)> {
    if n <= MAX_BLOCK {
        return vec![(0, n)];
    }
    let parts = n.div_ceil(MAX_BLOCK);
    let w = n.div_ceil(parts).div_ceil(QK_K) * QK_K;
    (0..n).step_by(w).map(|c0| (c0, w.min(n - c0))).collect()
}

/// The sites whose input is a weight matrix's input, and the matrices each feeds.
pub fn input_site(name: &str, n_layer: usize, tied_head: bool) -> Option<(usize, Site)> {
    if name == "output.weight" || (tied_head && name == "token_embd.weight") {
        return Some((n_layer, Site::HeadIn));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let site = match tensor {
        "attn_q.weight" | "attn_k.weight" | "attn_v.weight" => Site::AttnIn,
        "attn_output.weight" => Site::AttnOut,
        "ffn_gate.weight" | "ffn_up.weight" => Site::FfnIn,
        "ffn_down.weight" => Site::FfnMid,
        _ => return None,
    };
    Some((layer, site))
}

/// Whether the observer needs `site`.
pub fn is_input(site: Site) -> bool {
    matches!(
        site,
        Site::AttnIn | Site::AttnOut | Site::FfnIn | Site::FfnMid | Site::HeadIn
    )
}

/// The second moments of every matrix input, keyed by `(layer, site)`.
pub type Hessians = BTreeMap<(usize, Site), Hessian>;

// ---------------------------------------------------------------------------------------------
// Dense kernels: a 4 × 16 register tile, written plainly so that the compiler vectorizes it
// (compiled a second time with AVX2 enabled on x86-64).

/// `c[r][j] += alpha · Σ_p a(r, p) · b[p][j]` for `r < m`, `j < n`, where
/// `a(r, p) = a[r·a_rs + p·a_cs]`. With `upper = Some(R)` (row `r` is row `R + r` of a
/// symmetric product whose columns start at `⌊R/16⌋·16`), tiles wholly below the diagonal are
/// skipped.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm_body(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    alpha: f32,
    upper: Option<usize>,
    fma: impl Fn(f32, f32, f32) -> f32,
) {
    const MR: usize = 4;
    const NR: usize = 16;
    let mut r0 = 0;
    while r0 < m {
        let mr = MR.min(m - r0);
        let mut j0 = match upper {
            Some(big_r) => ((r0 + big_r) / NR) * NR - (big_r / NR) * NR,
            None => 0,
        };
        while j0 < n {
            let nr = NR.min(n - j0);
            let mut acc = [[0f32; NR]; MR];
            if mr == MR && nr == NR {
                for p in 0..k {
                    let bp: &[f32; NR] = match b[p * ldb + j0..p * ldb + j0 + NR].try_into() {
                        Ok(v) => v,
                        Err(_) => unreachable!(),
                    };
                    for (r, row) in acc.iter_mut().enumerate() {
                        let ar = a[(r0 + r) * a_rs + p * a_cs];
                        for l in 0..NR {
                            row[l] = fma(ar, bp[l], row[l]);
                        }
                    }
                }
            } else {
                for p in 0..k {
                    for (r, row) in acc.iter_mut().enumerate().take(mr) {
                        let ar = a[(r0 + r) * a_rs + p * a_cs];
                        for l in 0..nr {
                            row[l] += ar * b[p * ldb + j0 + l];
                        }
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take(mr) {
                let out = &mut c[(r0 + r) * ldc + j0..(r0 + r) * ldc + j0 + nr];
                for (o, v) in out.iter_mut().zip(row) {
                    *o += alpha * v;
                }
            }
            j0 += NR;
        }
        r0 += MR;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    strides: (usize, usize),
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    alpha: f32,
    upper: Option<usize>,
) {
    gemm_body(
        m,
        n,
        k,
        a,
        strides,
        b,
        ldb,
        c,
        ldc,
        alpha,
        upper,
        f32::mul_add,
    )
}

#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    strides: (usize, usize),
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    alpha: f32,
    upper: Option<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the body is safe code.
        unsafe { gemm_avx2(m, n, k, a, strides, b, ldb, c, ldc, alpha, upper) };
        return;
    }
    // Without FMA instructions `mul_add` is a library call: multiply and add instead (aarch64
    // fuses them either way).
    #[cfg(target_arch = "aarch64")]
    let fma = f32::mul_add;
    #[cfg(not(target_arch = "aarch64"))]
    let fma = |a: f32, b: f32, c: f32| a * b + c;
    gemm_body(m, n, k, a, strides, b, ldb, c, ldc, alpha, upper, fma)
}

/// `t[i][j] += Σ_r x[r·ld + i] · x[r·ld + j]` for `i ≤ j < w` (and some below), the tile rows
/// split over the machine's threads.
fn syrk_upper(w: usize, rows: usize, x: &[f32], ld: usize, t: &mut [f32]) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(w / 64)
        .max(1);
    if threads == 1 {
        gemm(w, w, rows, x, (1, ld), x, ld, t, w, 1.0, Some(0));
        return;
    }
    // Contiguous bands of rows with about equal upper-triangle area each.
    let mut bounds = vec![0usize];
    let total = (w * w) as f64 / 2.0;
    for k in 1..threads {
        let area = total * k as f64 / threads as f64;
        // rows [0, r) of the upper triangle hold w·r − r²/2
        let r = w as f64 - ((w * w) as f64 - 2.0 * area).max(0.0).sqrt();
        bounds.push(((r as usize) / 4 * 4).clamp(*bounds.last().unwrap_or(&0), w));
    }
    bounds.push(w);
    std::thread::scope(|s| {
        let mut rest: &mut [f32] = t;
        let mut done = 0;
        for win in bounds.windows(2) {
            let (r0, r1) = (win[0], win[1]);
            let (band, tail) = rest.split_at_mut((r1 - done) * w);
            rest = tail;
            done = r1;
            if r1 == r0 {
                continue;
            }
            s.spawn(move || {
                // Rows r0..r1 of t, the tiles on and above the diagonal.
                let c0 = (r0 / 16) * 16;
                gemm(
                    r1 - r0,
                    w - c0,
                    rows,
                    &x[r0..],
                    (1, ld),
                    &x[c0..],
                    ld,
                    &mut band[c0..],
                    w,
                    1.0,
                    Some(r0),
                );
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// H's factor.

/// The upper triangular `U` with `Uᵀ U = (H + damping)⁻¹` (f32, `n × n`), for one block of `H`.
/// The damping grows tenfold until the factorization succeeds.
pub fn inverse_factor(h: &[f64], n: usize) -> Vec<f32> {
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let mean = if mean > 0.0 { mean } else { 1.0 };
    let mut damp = DAMP;
    loop {
        if let Some(u) = try_inverse_factor(h, n, mean * damp) {
            return u;
        }
        damp *= 10.0;
    }
}

fn try_inverse_factor(h: &[f64], n: usize, damp: f64) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the body is safe code.
        return unsafe { inverse_factor_avx2(h, n, damp) };
    }
    inverse_factor_body(h, n, damp)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn inverse_factor_avx2(h: &[f64], n: usize, damp: f64) -> Option<Vec<f32>> {
    inverse_factor_body(h, n, damp)
}

/// `Σ a·b` in eight running sums (so that it vectorizes; the order is fixed, so the result is
/// the same on every run).
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn inverse_factor_body(h: &[f64], n: usize, damp: f64) -> Option<Vec<f32>> {
    // H = Ũ Ũᵀ with Ũ upper (Cholesky from the last row up); then (H)⁻¹ = Ũ⁻ᵀ Ũ⁻¹, so U = Ũ⁻¹.
    let mut t = vec![0f64; n * n];
    for j in (0..n).rev() {
        let hjj = h[j * n + j] + damp + if h[j * n + j] <= 0.0 { 1.0 } else { 0.0 };
        let tail_j: Vec<f64> = t[j * n + j + 1..(j + 1) * n].to_vec();
        let s = hjj - dot(&tail_j, &tail_j);
        if s.is_nan() || s <= 0.0 || !s.is_finite() {
            return None;
        }
        let d = s.sqrt();
        t[j * n + j] = d;
        for i in 0..j {
            let tail_i = &t[i * n + j + 1..(i + 1) * n];
            t[i * n + j] = (h[i * n + j] - dot(tail_i, &tail_j)) / d;
        }
    }
    // U = Ũ⁻¹, row by row from the last: U[i] = (e_i − Σ_{k>i} Ũ[i][k] U[k]) / Ũ[i][i].
    let mut u = vec![0f64; n * n];
    for i in (0..n).rev() {
        let mut row = vec![0f64; n];
        row[i] = 1.0;
        for k in i + 1..n {
            let f = t[i * n + k];
            if f != 0.0 {
                let uk = &u[k * n + k..(k + 1) * n];
                for (r, &v) in row[k..].iter_mut().zip(uk) {
                    *r -= f * v;
                }
            }
        }
        let d = t[i * n + i];
        for (o, r) in u[i * n..(i + 1) * n].iter_mut().zip(&row) {
            *o = r / d;
        }
    }
    if u.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(u.iter().map(|&v| v as f32).collect())
}

/// What GPTQ needs of one input's `H`, shared by the matrices that read it: per block, the
/// order its columns are quantized in and the factor of `H` in that order.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub perms: Vec<Vec<usize>>,
    pub factors: Vec<Vec<f32>>,
    /// Columns by decreasing `H` diagonal ("act-order"), with each block's scale chosen up front.
    pub act_order: bool,
}

/// The factors of `h`'s blocks, columns in their order or (with `act_order`) the loudest first.
pub fn prepare(h: &Hessian, act_order: bool) -> Prepared {
    let mut perms = Vec::new();
    let mut factors = Vec::new();
    for (b, &(_, bw)) in h.blocks.iter().enumerate() {
        let hb = h.block(b);
        let mut perm: Vec<usize> = (0..bw).collect();
        if act_order {
            perm.sort_by(|&i, &j| hb[j * bw + j].total_cmp(&hb[i * bw + i]).then(i.cmp(&j)));
        }
        let mut hp = vec![0f64; bw * bw];
        for (i, &pi) in perm.iter().enumerate() {
            for (j, &pj) in perm.iter().enumerate() {
                hp[i * bw + j] = hb[pi * bw + pj];
            }
        }
        factors.push(inverse_factor(&hp, bw));
        perms.push(perm);
    }
    Prepared {
        perms,
        factors,
        act_order,
    }
}

// ---------------------------------------------------------------------------------------------
// Formats: levels, blocks and the scale search.

/// How a type stores a row: `value = scale[sub] · level + offset[sub]`, levels `lo..=hi`,
/// parameters fixed per `group` columns (the block, or a K-quant's super-block) in
/// sub-blocks of `sub`.
#[derive(Debug, Clone, Copy)]
struct Format {
    ty: GgmlType,
    group: usize,
    sub: usize,
    lo: i32,
    hi: i32,
    /// A free offset (min) per sub-block; `Some(true)`: it must be ≤ 0 (K-quants store −min).
    offset: Option<bool>,
}

fn format(ty: GgmlType) -> Option<Format> {
    let f = |group, sub, lo, hi, offset| {
        Some(Format {
            ty,
            group,
            sub,
            lo,
            hi,
            offset,
        })
    };
    match ty {
        GgmlType::Q4_0 => f(32, 32, -8, 7, None),
        GgmlType::Q5_0 => f(32, 32, -16, 15, None),
        GgmlType::Q8_0 => f(32, 32, -127, 127, None),
        GgmlType::Q4_1 => f(32, 32, 0, 15, Some(false)),
        GgmlType::Q5_1 => f(32, 32, 0, 31, Some(false)),
        GgmlType::Q4K => f(256, 32, 0, 15, Some(true)),
        GgmlType::Q5K => f(256, 32, 0, 31, Some(true)),
        GgmlType::Q6K => f(256, 16, -32, 31, None),
        _ => None,
    }
}

/// Whether calibrated quantization writes `ty`.
pub fn supports(ty: GgmlType) -> bool {
    format(ty).is_some()
}

/// One group's parameters: as stored (f16 and six-bit fields) and as values per sub-block.
#[derive(Debug, Clone, Copy, Default)]
struct Group {
    d: u16,
    m: u16,
    ls: [u8; 16],
    lm: [u8; 8],
    scale: [f32; 16],
    offset: [f32; 16],
}

/// The scale of a symmetric block that minimises `Σ w (x − s·q)²` over candidate steps (the
/// extreme value mapped near either end of the levels, then the scale refitted).
fn search_symmetric(x: &[f32], w: &[f32], lo: i32, hi: i32) -> f32 {
    let mut m = 0f32;
    for &v in x {
        if v.abs() > m.abs() {
            m = v;
        }
    }
    if m == 0.0 {
        return 0.0;
    }
    let (mut best, mut best_s) = (-1f64, m / lo as f32);
    for end in [lo, hi] {
        for t in -10..=10 {
            let v = end as f32 + 0.1 * t as f32;
            if v.abs() < 0.5 {
                continue;
            }
            let is = v / m;
            let (mut sxq, mut sqq) = (0f64, 0f64);
            for (&xi, &wi) in x.iter().zip(w) {
                let q = (xi * is).round().clamp(lo as f32, hi as f32) as f64;
                sxq += (wi * xi) as f64 * q;
                sqq += wi as f64 * q * q;
            }
            if sqq > 0.0 && sxq * sxq / sqq > best {
                best = sxq * sxq / sqq;
                best_s = (sxq / sqq) as f32;
            }
        }
    }
    best_s
}

/// Scale and offset of an affine block (levels `0..=hi`) minimising `Σ w (x − s·q − o)²`.
fn search_affine(x: &[f32], w: &[f32], hi: i32, offset_le_zero: bool) -> (f32, f32) {
    let mut min = x.iter().cloned().fold(f32::INFINITY, f32::min);
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if offset_le_zero {
        min = min.min(0.0);
    }
    if max <= min {
        return (0.0, min);
    }
    let mut best = (f64::INFINITY, (max - min) / hi as f32, min);
    for t in -10..=10 {
        let is = (hi as f32 + 0.1 * t as f32) / (max - min);
        let (mut a, mut b, mut c, mut d, mut e) = (0f64, 0f64, 0f64, 0f64, 0f64);
        let q: Vec<f32> = x
            .iter()
            .map(|&xi| ((xi - min) * is).round().clamp(0.0, hi as f32))
            .collect();
        for ((&xi, &wi), &qi) in x.iter().zip(w).zip(&q) {
            let (wi, xi, qi) = (wi as f64, xi as f64, qi as f64);
            a += wi * qi * qi;
            b += wi * qi;
            c += wi;
            d += wi * xi * qi;
            e += wi * xi;
        }
        let det = a * c - b * b;
        if det <= 0.0 || a <= 0.0 {
            continue;
        }
        let (mut s, mut o) = ((c * d - b * e) / det, (a * e - b * d) / det);
        if offset_le_zero && o > 0.0 {
            o = 0.0;
            s = d / a;
        }
        if s <= 0.0 {
            continue;
        }
        let err: f64 = x
            .iter()
            .zip(w)
            .zip(&q)
            .map(|((&xi, &wi), &qi)| {
                let r = xi as f64 - s * qi as f64 - o;
                wi as f64 * r * r
            })
            .sum();
        if err < best.0 {
            best = (err, s as f32, o as f32);
        }
    }
    (best.1, best.2)
}

impl Format {
    /// The parameters of the group starting at `x[0]`, weighted by `w`.
    fn fit(&self, x: &[f32], w: &[f32]) -> Group {
        let mut g = Group::default();
        let subs = self.group / self.sub;
        let mut s = [0f32; 16];
        let mut o = [0f32; 16];
        for j in 0..subs {
            let (xs, ws) = (
                &x[j * self.sub..(j + 1) * self.sub],
                &w[j * self.sub..(j + 1) * self.sub],
            );
            match self.offset {
                None => s[j] = search_symmetric(xs, ws, self.lo, self.hi),
                Some(le_zero) => (s[j], o[j]) = search_affine(xs, ws, self.hi, le_zero),
            }
        }
        match self.ty {
            GgmlType::Q4K | GgmlType::Q5K => {
                let max_s = s[..8].iter().cloned().fold(0f32, f32::max);
                let max_m = o[..8].iter().fold(0f32, |a, &v| a.max(-v));
                g.d = f32_to_f16(max_s / 63.0);
                g.m = f32_to_f16(max_m / 63.0);
                let (d, dm) = (f16_to_f32(g.d), f16_to_f32(g.m));
                for j in 0..8 {
                    g.ls[j] = if d > 0.0 {
                        (s[j] / d).round().clamp(0.0, 63.0) as u8
                    } else {
                        0
                    };
                    g.lm[j] = if dm > 0.0 {
                        (-o[j] / dm).round().clamp(0.0, 63.0) as u8
                    } else {
                        0
                    };
                    g.scale[j] = d * g.ls[j] as f32;
                    g.offset[j] = -dm * g.lm[j] as f32;
                }
            }
            GgmlType::Q6K => {
                let max_s = s.iter().fold(0f32, |a, &v| a.max(v.abs()));
                g.d = f32_to_f16(max_s / 127.0);
                let d = f16_to_f32(g.d);
                for (j, &sj) in s.iter().enumerate() {
                    let l = if d > 0.0 {
                        (sj / d).round().clamp(-128.0, 127.0) as i8
                    } else {
                        0
                    };
                    g.ls[j] = l as u8;
                    g.scale[j] = d * l as f32;
                }
            }
            _ => {
                g.d = f32_to_f16(s[0]);
                g.m = f32_to_f16(o[0]);
                g.scale[0] = f16_to_f32(g.d);
                g.offset[0] = if self.offset.is_some() {
                    f16_to_f32(g.m)
                } else {
                    0.0
                };
            }
        }
        g
    }

    /// The level nearest `x` in sub-block `sub` of `g`, and its value.
    #[inline]
    fn round(&self, g: &Group, sub: usize, x: f32) -> (i32, f32) {
        let (s, o) = (g.scale[sub], g.offset[sub]);
        let q = if s != 0.0 {
            ((x - o) / s).round().clamp(self.lo as f32, self.hi as f32) as i32
        } else {
            0.clamp(self.lo, self.hi)
        };
        (q, s * q as f32 + o)
    }

    /// One group's bytes from its parameters and levels.
    fn pack(&self, g: &Group, q: &[i32], out: &mut Vec<u8>) {
        let code = |v: i32| (v - self.lo) as u8;
        match self.ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let mut qs = [0u8; 16];
                for j in 0..16 {
                    qs[j] = code(q[j]) | (code(q[j + 16]) << 4);
                }
                if self.ty == GgmlType::Q4_0 {
                    out.extend_from_slice(block_bytes(&[BlockQ4_0 { d: g.d, qs }]));
                } else {
                    out.extend_from_slice(block_bytes(&[BlockQ4_1 { d: g.d, m: g.m, qs }]));
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let mut c = [0u8; 32];
                for (cj, &v) in c.iter_mut().zip(q) {
                    *cj = code(v);
                }
                let (qs, qh) = pack_q5(&c);
                if self.ty == GgmlType::Q5_0 {
                    out.extend_from_slice(block_bytes(&[BlockQ5_0 { d: g.d, qh, qs }]));
                } else {
                    out.extend_from_slice(block_bytes(&[BlockQ5_1 {
                        d: g.d,
                        m: g.m,
                        qh,
                        qs,
                    }]));
                }
            }
            GgmlType::Q8_0 => {
                let mut qs = [0i8; 32];
                for (o, &v) in qs.iter_mut().zip(q) {
                    *o = v as i8;
                }
                out.extend_from_slice(block_bytes(&[BlockQ8_0 { d: g.d, qs }]));
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
                let mut c = [0u8; QK_K];
                for (cj, &v) in c.iter_mut().zip(q) {
                    *cj = code(v);
                }
                if self.ty == GgmlType::Q6K {
                    let mut sc = [0i8; 16];
                    for (o, &l) in sc.iter_mut().zip(&g.ls) {
                        *o = l as i8;
                    }
                    out.extend_from_slice(block_bytes(&[q6k_block(g.d, sc, &c)]));
                } else {
                    let mut ls = [0u8; 8];
                    ls.copy_from_slice(&g.ls[..8]);
                    let sc = pack_k_scales(&ls, &g.lm);
                    if self.ty == GgmlType::Q4K {
                        out.extend_from_slice(block_bytes(&[q4k_block(g.d, g.m, sc, &c)]));
                    } else {
                        out.extend_from_slice(block_bytes(&[q5k_block(g.d, g.m, sc, &c)]));
                    }
                }
            }
            _ => unreachable!("no format for {}", self.ty.name()),
        }
    }
}

/// One row as `ty` without calibration: ggml's round to nearest for the 32-blocks (what
/// `llama-quantize` writes without an importance matrix), the scale search with equal weights
/// for the K-quants.
pub fn quantize_plain(ty: GgmlType, row: &[f32]) -> Vec<u8> {
    match (ty, format(ty)) {
        (GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K, Some(f)) => {
            let ones = vec![1f32; f.group];
            let mut out = Vec::with_capacity(ty.row_bytes(row.len()));
            let mut q = vec![0i32; f.group];
            for x in row.chunks_exact(f.group) {
                let g = f.fit(x, &ones);
                for (i, (qi, &xi)) in q.iter_mut().zip(x).enumerate() {
                    *qi = f.round(&g, i / f.sub, xi).0;
                }
                f.pack(&g, &q, &mut out);
            }
            out
        }
        _ => quantize(ty, row),
    }
}

// ---------------------------------------------------------------------------------------------
// GPTQ.

/// What [`gptq`] did to one matrix.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MatrixReport {
    /// Σ over rows of `eᵀ H e` for the rows written, and for plain rounding.
    pub error: f64,
    pub plain_error: f64,
    /// Rows where plain rounding was kept (its error was smaller).
    pub plain_rows: usize,
}

/// `ty`'s bytes for `w` (`rows × n`, f32, row-major) quantized against `h` with GPTQ; `prep` is
/// [`prepare`] of `h` (shared by the matrices of one input).
pub fn gptq(
    ty: GgmlType,
    w: &[f32],
    n: usize,
    h: &Hessian,
    prep: &Prepared,
) -> (Vec<u8>, MatrixReport) {
    let f = match format(ty) {
        Some(f) if n.is_multiple_of(f.group) => f,
        _ => {
            let bytes = w
                .chunks_exact(n)
                .flat_map(|r| quantize_plain(ty, r))
                .collect();
            return (bytes, MatrixReport::default());
        }
    };
    let rows = w.len() / n;
    let imp = h.diagonal();
    let mean = imp.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    // Columns never active still get some weight, so their blocks stay sensible.
    let imp: Vec<f32> = imp.iter().map(|&v| v + (1e-6 * mean) as f32).collect();
    let rb = ty.row_bytes(n);
    let mut out = vec![0u8; rb * rows];
    let mut report = MatrixReport::default();
    // Rows are independent: bands of rows, one per thread.
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(rows.div_ceil(64))
        .max(1);
    let band = rows.div_ceil(threads);
    let reports: Vec<MatrixReport> = std::thread::scope(|s| {
        let handles: Vec<_> = w
            .chunks(band * n)
            .zip(out.chunks_mut(band * rb))
            .map(|(wb, ob)| {
                let imp = &imp;
                s.spawn(move || gptq_rows(&f, wb, n, h, prep, imp, ob))
            })
            .collect();
        // A band that panicked would leave its rows empty: pass the panic on instead.
        handles
            .into_iter()
            .map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for r in reports {
        report.error += r.error;
        report.plain_error += r.plain_error;
        report.plain_rows += r.plain_rows;
    }
    (out, report)
}

fn gptq_rows(
    f: &Format,
    w0: &[f32],
    n: usize,
    h: &Hessian,
    prep: &Prepared,
    imp: &[f32],
    out: &mut [u8],
) -> MatrixReport {
    let rows = w0.len() / n;
    // The weights in the order they are quantized (within each block).
    let mut w = vec![0f32; w0.len()];
    for (&(c0, bw), perm) in h.blocks.iter().zip(&prep.perms) {
        for (wr, r0) in w.chunks_exact_mut(n).zip(w0.chunks_exact(n)) {
            for (o, &p) in wr[c0..c0 + bw].iter_mut().zip(perm) {
                *o = r0[c0 + p];
            }
        }
    }
    let mut levels = vec![0i32; w.len()];
    let groups_per_row = n / f.group;
    let mut params = vec![Group::default(); rows * groups_per_row];
    if prep.act_order {
        for (r, row0) in w0.chunks_exact(n).enumerate() {
            for (gi, (x, im)) in row0
                .chunks_exact(f.group)
                .zip(imp.chunks_exact(f.group))
                .enumerate()
            {
                params[r * groups_per_row + gi] = f.fit(x, im);
            }
        }
    }
    let mut err = vec![0f32; rows * LAZY];
    for ((&(c0, bw), u), perm) in h.blocks.iter().zip(&prep.factors).zip(&prep.perms) {
        let mut b = 0;
        while b < bw {
            let lw = LAZY.min(bw - b);
            for r in 0..rows {
                let wr = &mut w[r * n..(r + 1) * n];
                for i in b..b + lw {
                    let col = c0 + i;
                    let orig = c0 + perm[i];
                    let gi = orig / f.group;
                    if !prep.act_order && orig % f.group == 0 {
                        // In order: the block's scale from the weights as GPTQ left them.
                        let end = col + f.group;
                        params[r * groups_per_row + gi] = f.fit(&wr[col..end], &imp[orig..end]);
                    }
                    let g = &params[r * groups_per_row + gi];
                    let sub = (orig % f.group) / f.sub;
                    let x = wr[col];
                    let (q, v) = f.round(g, sub, x);
                    levels[r * n + orig] = q;
                    let e = (x - v) / u[i * bw + i];
                    err[r * LAZY + (i - b)] = e;
                    let urow = &u[i * bw + i + 1..i * bw + b + lw];
                    for (wj, &uj) in wr[col + 1..c0 + b + lw].iter_mut().zip(urow) {
                        *wj -= e * uj;
                    }
                }
            }
            // The rest of the block: W[:, b+lw..] −= Err · U[b..b+lw, b+lw..].
            let rest = bw - (b + lw);
            if rest > 0 {
                gemm(
                    rows,
                    rest,
                    lw,
                    &err,
                    (LAZY, 1),
                    &u[b * bw + b + lw..],
                    bw,
                    &mut w[c0 + b + lw..],
                    n,
                    -1.0,
                    None,
                );
            }
            b += lw;
        }
    }
    // Pack both, and keep plain rounding for any row where its error is smaller.
    let rb = f.ty.row_bytes(n);
    let mut packed = vec![0u8; rows * rb];
    let mut plain = vec![0u8; rows * rb];
    let mut bytes = Vec::with_capacity(rb);
    for r in 0..rows {
        bytes.clear();
        for gi in 0..groups_per_row {
            let q = &levels[r * n + gi * f.group..r * n + (gi + 1) * f.group];
            f.pack(&params[r * groups_per_row + gi], q, &mut bytes);
        }
        packed[r * rb..(r + 1) * rb].copy_from_slice(&bytes);
        plain[r * rb..(r + 1) * rb].copy_from_slice(&quantize_plain(f.ty, &w0[r * n..(r + 1) * n]));
    }
    let errors = |bytes: &[u8]| {
        let mut e = vec![0f32; rows * n];
        for ((row0, p), er) in w0
            .chunks_exact(n)
            .zip(bytes.chunks_exact(rb))
            .zip(e.chunks_exact_mut(n))
        {
            dequantize_row(f.ty, p, er);
            for (ei, &a) in er.iter_mut().zip(row0) {
                *ei = a - *ei;
            }
        }
        h.errors(&e)
    };
    let (gptq_err, plain_err) = (errors(&packed), errors(&plain));
    let mut report = MatrixReport::default();
    for r in 0..rows {
        let o = &mut out[r * rb..(r + 1) * rb];
        report.plain_error += plain_err[r];
        if plain_err[r] < gptq_err[r] {
            o.copy_from_slice(&plain[r * rb..(r + 1) * rb]);
            report.error += plain_err[r];
            report.plain_rows += 1;
        } else {
            o.copy_from_slice(&packed[r * rb..(r + 1) * rb]);
            report.error += gptq_err[r];
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::Rng;

    /// A seeded value in [-1, 1).
    fn uniform(rng: &mut Rng) -> f32 {
        rng.next_f32() * 2.0 - 1.0
    }

    /// Correlated inputs with a few loud channels, as a transformer's are.
    fn inputs(rows: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut x = vec![0f32; rows * n];
        for r in 0..rows {
            let common = uniform(&mut rng);
            for j in 0..n {
                let loud = if j % 37 == 3 { 8.0 } else { 1.0 };
                x[r * n + j] = loud * (uniform(&mut rng) + 0.7 * common * ((j % 5) as f32 - 2.0));
            }
        }
        x
    }

    fn hessian(x: &[f32], n: usize) -> Hessian {
        let mut h = Hessian::new(n);
        for batch in x.chunks(64 * n) {
            h.add(batch);
        }
        h.finish();
        h
    }

    fn true_errors(ty: GgmlType, w: &[f32], n: usize, bytes: &[u8], h: &Hessian) -> Vec<f64> {
        let rb = ty.row_bytes(n);
        let mut e = vec![0f32; w.len()];
        for ((row, b), er) in w
            .chunks_exact(n)
            .zip(bytes.chunks_exact(rb))
            .zip(e.chunks_exact_mut(n))
        {
            dequantize_row(ty, b, er);
            for (x, &v) in er.iter_mut().zip(row) {
                *x = v - *x;
            }
        }
        h.errors(&e)
    }

    #[test]
    fn the_hessian_is_the_sum_of_outer_products() {
        // Wide enough that the product is split between threads.
        let (rows, n) = (100, 256);
        let x = inputs(rows, n, 7);
        let h = hessian(&x, n);
        let hb = h.block(0);
        for (i, j) in [
            (0, 0),
            (3, 200),
            (200, 3),
            (255, 255),
            (17, 80),
            (130, 140),
            (140, 130),
        ] {
            let want: f64 = (0..rows)
                .map(|r| x[r * n + i] as f64 * x[r * n + j] as f64)
                .sum();
            assert!(
                (hb[i * n + j] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{i},{j}"
            );
        }
        assert_eq!(h.rows, rows as u64);
    }

    #[test]
    fn the_factor_is_the_upper_cholesky_factor_of_the_inverse() {
        let n = 64;
        let h = hessian(&inputs(300, n, 3), n);
        let u = inverse_factor(h.block(0), n);
        // (Uᵀ U)(H + damping) = I
        let hb = h.block(0);
        let mean = (0..n).map(|i| hb[i * n + i]).sum::<f64>() / n as f64;
        for i in [0, 5, 63] {
            for j in [0, 5, 40, 63] {
                let mut s = 0f64;
                for k in 0..n {
                    let uu: f64 = (0..n)
                        .map(|l| u[l * n + i] as f64 * u[l * n + k] as f64)
                        .sum();
                    let hd = hb[k * n + j] + if k == j { DAMP * mean } else { 0.0 };
                    s += uu * hd;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-3, "({i},{j}) = {s}");
            }
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
    }

    #[test]
    fn block_partition_keeps_super_blocks_whole() {
        assert_eq!(blocks_for(576), vec![(0, 576)]);
        assert_eq!(
            blocks_for(4864),
            vec![(0, 1792), (1792, 1792), (3584, 1280)]
        );
        for (c0, w) in blocks_for(8192) {
            assert!(c0 % 256 == 0 && w <= MAX_BLOCK);
        }
    }

    #[test]
    fn gptq_is_never_worse_than_rounding_and_reports_its_error() {
        for (ty, act_order) in [
            (GgmlType::Q4_0, true),
            (GgmlType::Q4_0, false),
            (GgmlType::Q4_1, true),
            (GgmlType::Q5_0, true),
            (GgmlType::Q8_0, true),
            (GgmlType::Q4K, true),
            (GgmlType::Q4K, false),
            (GgmlType::Q6K, true),
        ] {
            let (rows, n) = (40, 512);
            let h = hessian(&inputs(600, n, 11), n);
            let mut rng = Rng::new(5);
            let w: Vec<f32> = (0..rows * n).map(|_| 0.05 * uniform(&mut rng)).collect();
            let prep = prepare(&h, act_order);
            let (bytes, report) = gptq(ty, &w, n, &h, &prep);
            let plain: Vec<u8> = w
                .chunks_exact(n)
                .flat_map(|r| quantize_plain(ty, r))
                .collect();
            let got = true_errors(ty, &w, n, &bytes, &h);
            let base = true_errors(ty, &w, n, &plain, &h);
            for (r, (g, b)) in got.iter().zip(&base).enumerate() {
                assert!(g <= b, "{}: row {r}: {g} > {b}", ty.name());
            }
            let (g, b): (f64, f64) = (got.iter().sum(), base.iter().sum());
            assert!(g < 0.7 * b, "{}: {g} vs {b}", ty.name());
            // The reported error is the error of what was written.
            assert!(
                (report.error - g).abs() <= 1e-3 * g,
                "{}: {} vs {g}",
                ty.name(),
                report.error
            );
            assert!((report.plain_error - b).abs() <= 1e-3 * b);
            // Deterministic.
            assert_eq!(gptq(ty, &w, n, &h, &prep).0, bytes);
        }
    }
}
