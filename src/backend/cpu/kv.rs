//! The CPU engine's KV cache: for every layer, the keys (after RoPE) and values of `n_ctx`
//! positions, allocated once at load. Stored as f16 (the default, as llama.cpp's), f32, or q8_0
//! blocks (ggml's 8-bit type: 32 values and one f16 scale in 34 bytes, 3.8× smaller than f32),
//! chosen by `model.kv_type`.
//!
//! Rows are laid out `(layer, position, kv_dim)`, position-major, so that a window slide moves
//! one contiguous range per layer and a session snapshot copies one prefix per layer.

use crate::backend::KvType;
use crate::kernels::pool::{Pool, Shards};
use crate::kernels::quant::{
    block_bytes, dequant_q8_0, f16_to_f32, f32_to_f16, quantize_q8_0_into, BlockQ8_0, QK,
};

/// Keys and values of one layer, for attention to read.
#[derive(Clone, Copy)]
pub enum LayerKv<'a> {
    F32 {
        k: &'a [f32],
        v: &'a [f32],
    },
    /// f16 bits.
    F16 {
        k: &'a [u16],
        v: &'a [u16],
    },
    Q8 {
        k: &'a [BlockQ8_0],
        v: &'a [BlockQ8_0],
    },
}

enum Store {
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    F16 {
        k: Vec<u16>,
        v: Vec<u16>,
    },
    Q8 {
        k: Vec<BlockQ8_0>,
        v: Vec<BlockQ8_0>,
    },
}

pub struct KvCache {
    store: Store,
    n_layer: usize,
    n_ctx: usize,
    kv_dim: usize,
}

impl KvCache {
    /// Bytes the cache takes, without allocating it (the start-up memory budget).
    pub fn bytes(ty: KvType, n_layer: usize, n_ctx: usize, kv_dim: usize) -> u64 {
        2 * (n_layer * n_ctx) as u64 * ty.row_bytes(kv_dim) as u64
    }

    /// `kv_dim` must be a multiple of 32 for q8_0 (checked by the backend at load).
    pub fn new(ty: KvType, n_layer: usize, n_ctx: usize, kv_dim: usize) -> KvCache {
        let n = n_layer * n_ctx * kv_dim;
        let store = match ty {
            KvType::F32 => Store::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
            KvType::F16 => Store::F16 {
                k: vec![0; n],
                v: vec![0; n],
            },
            KvType::Q8_0 => Store::Q8 {
                k: vec![BlockQ8_0::default(); n / QK],
                v: vec![BlockQ8_0::default(); n / QK],
            },
        };
        KvCache {
            store,
            n_layer,
            n_ctx,
            kv_dim,
        }
    }

    pub fn ty(&self) -> KvType {
        match self.store {
            Store::F32 { .. } => KvType::F32,
            Store::F16 { .. } => KvType::F16,
            Store::Q8 { .. } => KvType::Q8_0,
        }
    }

    pub fn byte_len(&self) -> u64 {
        KvCache::bytes(self.ty(), self.n_layer, self.n_ctx, self.kv_dim)
    }

    /// Elements of one layer's rows `a..b` in the flat store (`per_row` elements a row).
    fn span(&self, layer: usize, a: usize, b: usize, per_row: usize) -> std::ops::Range<usize> {
        let base = layer * self.n_ctx * per_row;
        base + a * per_row..base + b * per_row
    }

    /// Stores the keys and values of rows `pos..pos + n` of `layer` (`k`, `v`: n × kv_dim).
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let n = k.len() / self.kv_dim;
        let rf = self.span_f32(layer, pos, pos + n);
        let rq = self.span(layer, pos, pos + n, self.kv_dim / QK);
        match &mut self.store {
            Store::F32 { k: kc, v: vc } => {
                kc[rf.clone()].copy_from_slice(k);
                vc[rf].copy_from_slice(v);
            }
            Store::F16 { k: kc, v: vc } => {
                to_f16(k, &mut kc[rf.clone()]);
                to_f16(v, &mut vc[rf]);
            }
            Store::Q8 { k: kc, v: vc } => {
                let r = rq;
                quantize_q8_0_into(k, &mut kc[r.clone()]);
                quantize_q8_0_into(v, &mut vc[r]);
            }
        }
    }

    fn span_f32(&self, layer: usize, a: usize, b: usize) -> std::ops::Range<usize> {
        self.span(layer, a, b, self.kv_dim)
    }

    /// The whole of one layer (attention reads rows `0..=pos` of it).
    pub fn layer(&self, layer: usize) -> LayerKv<'_> {
        match &self.store {
            Store::F32 { k, v } => {
                let r = self.span_f32(layer, 0, self.n_ctx);
                LayerKv::F32 {
                    k: &k[r.clone()],
                    v: &v[r],
                }
            }
            Store::F16 { k, v } => {
                let r = self.span_f32(layer, 0, self.n_ctx);
                LayerKv::F16 {
                    k: &k[r.clone()],
                    v: &v[r],
                }
            }
            Store::Q8 { k, v } => {
                let r = self.span(layer, 0, self.n_ctx, self.kv_dim / QK);
                LayerKv::Q8 {
                    k: &k[r.clone()],
                    v: &v[r],
                }
            }
        }
    }

    /// Moves rows `from..from + n` of every layer to `to..to + n` (`to < from`) and passes each
    /// moved key row to `rekey` (one row of kv_dim f32 a call; q8_0 rows are dequantized for it
    /// and quantized again after). The layers' keys and values are shared out over the pool;
    /// `scratch` holds a row of at least kv_dim floats for each of its threads.
    pub fn move_rows(
        &mut self,
        pool: &mut Pool,
        from: usize,
        to: usize,
        n: usize,
        scratch: &mut [f32],
        rekey: &(dyn Fn(&mut [f32]) + Sync),
    ) {
        let kvd = self.kv_dim;
        let (n_layer, n_ctx) = (self.n_layer, self.n_ctx);
        let per_thread = scratch.len() / pool.n_threads();
        assert!(to < from && from + n <= n_ctx && per_thread >= kvd);
        let scratch = Shards::new(scratch);
        // One unit: the keys (units 0..n_layer) or the values (the rest) of one layer, taken in
        // turn by the threads, so each has its share of the keys, the costlier half. Keys move
        // row by row, each re-keyed while it is in cache; values move in one copy.
        #[allow(clippy::too_many_arguments)]
        fn run<T: Copy + Send>(
            pool: &mut Pool,
            k: &mut [T],
            v: &mut [T],
            n_layer: usize,
            layer_len: usize,
            row: usize,
            (from, to, n): (usize, usize, usize),
            rekey_row: &(dyn Fn(&mut [T], usize) + Sync),
        ) {
            let (ks, vs) = (Shards::new(k), Shards::new(v));
            pool.run(2 * n_layer, &|unit, tid| {
                let (layer, keys) = (unit % n_layer, unit < n_layer);
                let store = if keys { ks } else { vs };
                // SAFETY: unit `unit` alone touches this layer's keys (or values).
                let span = unsafe { store.part(layer * layer_len, layer_len) };
                if keys {
                    for i in 0..n {
                        let (src, dst) = ((from + i) * row, (to + i) * row);
                        span.copy_within(src..src + row, dst);
                        rekey_row(&mut span[dst..dst + row], tid);
                    }
                } else {
                    span.copy_within(from * row..(from + n) * row, to * row);
                }
            });
        }
        match &mut self.store {
            Store::F32 { k, v } => run(
                pool,
                k,
                v,
                n_layer,
                n_ctx * kvd,
                kvd,
                (from, to, n),
                &|r, _| rekey(r),
            ),
            Store::F16 { k, v } => run(
                pool,
                k,
                v,
                n_layer,
                n_ctx * kvd,
                kvd,
                (from, to, n),
                &|r, tid| {
                    // SAFETY: thread `tid` alone uses scratch row `tid`.
                    let row = unsafe { scratch.part(tid * per_thread, kvd) };
                    for (x, &h) in row.iter_mut().zip(r.iter()) {
                        *x = f16_to_f32(h);
                    }
                    rekey(row);
                    to_f16(row, r);
                },
            ),
            Store::Q8 { k, v } => {
                let per = kvd / QK;
                run(
                    pool,
                    k,
                    v,
                    n_layer,
                    n_ctx * per,
                    per,
                    (from, to, n),
                    &|r, tid| {
                        // SAFETY: thread `tid` alone uses scratch row `tid`.
                        let row = unsafe { scratch.part(tid * per_thread, kvd) };
                        dequant_q8_0(r, row);
                        rekey(row);
                        quantize_q8_0_into(row, r);
                    },
                )
            }
        }
    }

    /// Bytes [`KvCache::save`] writes for `len` positions.
    pub fn saved_bytes(&self, len: usize) -> usize {
        2 * self.n_layer * len * self.ty().row_bytes(self.kv_dim)
    }

    /// Appends rows `0..len` of every layer, keys then values, to `out`.
    pub fn save(&self, len: usize, out: &mut Vec<u8>) {
        out.reserve(self.saved_bytes(len));
        for layer in 0..self.n_layer {
            match &self.store {
                Store::F32 { k, v } => {
                    let r = self.span_f32(layer, 0, len);
                    out.extend_from_slice(block_bytes(&k[r.clone()]));
                    out.extend_from_slice(block_bytes(&v[r]));
                }
                Store::F16 { k, v } => {
                    let r = self.span_f32(layer, 0, len);
                    out.extend_from_slice(block_bytes(&k[r.clone()]));
                    out.extend_from_slice(block_bytes(&v[r]));
                }
                Store::Q8 { k, v } => {
                    let r = self.span(layer, 0, len, self.kv_dim / QK);
                    out.extend_from_slice(block_bytes(&k[r.clone()]));
                    out.extend_from_slice(block_bytes(&v[r]));
                }
            }
        }
    }

    /// Replaces rows `0..len` with what [`KvCache::save`] wrote for `len`. `data` must be
    /// exactly [`KvCache::saved_bytes`] long.
    pub fn load(&mut self, len: usize, data: &[u8]) {
        let half = self.ty().row_bytes(self.kv_dim) * len;
        let (n_ctx, kvd) = (self.n_ctx, self.kv_dim);
        for (layer, chunk) in data.chunks_exact(2 * half).enumerate() {
            let (kb, vb) = chunk.split_at(half);
            match &mut self.store {
                Store::F32 { k, v } => {
                    let base = layer * n_ctx * kvd;
                    fill(&mut k[base..base + len * kvd], kb);
                    fill(&mut v[base..base + len * kvd], vb);
                }
                Store::F16 { k, v } => {
                    let base = layer * n_ctx * kvd;
                    fill_f16(&mut k[base..base + len * kvd], kb);
                    fill_f16(&mut v[base..base + len * kvd], vb);
                }
                Store::Q8 { k, v } => {
                    let per = kvd / QK;
                    let base = layer * n_ctx * per;
                    fill_q8(&mut k[base..base + len * per], kb);
                    fill_q8(&mut v[base..base + len * per], vb);
                }
            }
        }
    }
}

fn fill(dst: &mut [f32], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
    }
}

fn fill_f16(dst: &mut [u16], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = u16::from_ne_bytes([s[0], s[1]]);
    }
}

fn to_f16(src: &[f32], dst: &mut [u16]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = f32_to_f16(x);
    }
}

fn fill_q8(dst: &mut [BlockQ8_0], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(34)) {
        d.d = u16::from_ne_bytes([s[0], s[1]]);
        for (q, &b) in d.qs.iter_mut().zip(&s[2..]) {
            *q = b as i8;
        }
    }
}
