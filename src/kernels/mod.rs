//! Compute kernels of the int4 CPU engine.
//!
//! - [`quant`]: ggml block formats, reference dequantizers and quantizers.
//! - [`generic`]: scalar kernels, the reference twin of every SIMD kernel.
//! - `avx2` (x86_64) and `neon` (aarch64, with a `dotprod` variant): the same operations.
//! - [`pool`]: the worker pool, started once, that splits rows across threads.
//! - [`packed`]: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights repacked at load in groups of eight
//!   rows, for the x86 tiles.
//! - [`matmul`]: matrix × activations over a range of rows, on top of the table.
//!
//! [`Kernels`] is the one dispatch point: a table of function pointers chosen once at start from
//! what the CPU has (or what `--kernels` asks for). Everything above it calls through the table.

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod generic;
pub mod matmul;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod packed;
pub mod pool;
pub mod quant;

#[cfg(test)]
mod tests;

use packed::{PTile, P4_0, P4_1, P5_0, P5_1, P8_0};
use quant::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8, BlockQ8_0,
};

/// Which kernels the config or the command line asks for (`model.kernels`, `--kernels`):
/// `auto`, the fastest this CPU runs, or one [`KernelKind`].
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum KernelChoice {
    #[default]
    Auto,
    Reference,
    Scalar,
    Avx2,
    AvxVnni,
    Avx512Vnni,
    Neon,
    NeonDotprod,
}

impl KernelChoice {
    /// `None` for `auto`.
    pub fn kind(self) -> Option<KernelKind> {
        match self {
            KernelChoice::Auto => None,
            KernelChoice::Reference => Some(KernelKind::Reference),
            KernelChoice::Scalar => Some(KernelKind::Scalar),
            KernelChoice::Avx2 => Some(KernelKind::Avx2),
            KernelChoice::AvxVnni => Some(KernelKind::AvxVnni),
            KernelChoice::Avx512Vnni => Some(KernelKind::Avx512Vnni),
            KernelChoice::Neon => Some(KernelKind::Neon),
            KernelChoice::NeonDotprod => Some(KernelKind::NeonDotprod),
        }
    }

    /// The kernels this choice runs on this CPU.
    pub fn resolve(self) -> KernelKind {
        self.kind().unwrap_or_else(KernelKind::best)
    }
}

/// Which kernels compute the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// Exact mode: weights dequantized to f32, activations kept in f32, f32 arithmetic.
    Reference,
    /// Integer dot products on 8-bit activations, scalar code (any CPU).
    Scalar,
    /// x86_64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 with the AVX-VNNI dot-product instruction (Alder Lake, Sapphire Rapids, Zen 5).
    AvxVnni,
    /// AVX2 with the same dot product in its AVX-512 encoding (AVX512-VNNI + VL, on 256-bit
    /// vectors): Ice Lake, Sapphire Rapids, Zen 4.
    Avx512Vnni,
    /// aarch64 NEON without the dot-product extension.
    Neon,
    /// aarch64 NEON with `sdot` (ARMv8.2 dotprod).
    NeonDotprod,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Reference => "reference",
            KernelKind::Scalar => "scalar",
            KernelKind::Avx2 => "avx2",
            KernelKind::AvxVnni => "avx-vnni",
            KernelKind::Avx512Vnni => "avx512-vnni",
            KernelKind::Neon => "neon",
            KernelKind::NeonDotprod => "neon-dotprod",
        }
    }

    pub const ALL: [KernelKind; 7] = [
        KernelKind::Reference,
        KernelKind::Scalar,
        KernelKind::Avx2,
        KernelKind::AvxVnni,
        KernelKind::Avx512Vnni,
        KernelKind::Neon,
        KernelKind::NeonDotprod,
    ];

    /// Whether this CPU can run these kernels.
    pub fn available(self) -> bool {
        match self {
            KernelKind::Reference | KernelKind::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            KernelKind::AvxVnni => {
                KernelKind::Avx2.available() && is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512Vnni => {
                KernelKind::Avx2.available()
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            KernelKind::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            KernelKind::NeonDotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest integer kernels this CPU has.
    pub fn best() -> KernelKind {
        [
            KernelKind::NeonDotprod,
            KernelKind::Neon,
            KernelKind::AvxVnni,
            KernelKind::Avx512Vnni,
            KernelKind::Avx2,
            KernelKind::Scalar,
        ]
        .into_iter()
        .find(|k| k.available())
        .unwrap_or(KernelKind::Scalar)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    #[error("kernels {0:?} are not available on this CPU")]
    Unavailable(&'static str),
}

/// The kernel table: one entry per operation, all with the scalar twin's signature.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub kind: KernelKind,
    pub quantize_q8: fn(&[f32], &mut [BlockQ8]),
    pub dot_q4_0: fn(&[BlockQ4_0], &[BlockQ8]) -> f32,
    pub dot_q4_1: fn(&[BlockQ4_1], &[BlockQ8]) -> f32,
    pub dot_q5_0: fn(&[BlockQ5_0], &[BlockQ8]) -> f32,
    pub dot_q8_0: fn(&[BlockQ8_0], &[BlockQ8]) -> f32,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    /// Attention: scores of a query head against key rows, `exp(s − max)` with its sum, and
    /// the probability-weighted sum of value rows (f32, f16 or q8_0 cache). See `generic`.
    pub scores_f32: fn(&[f32], &[f32], usize, &mut [f32]),
    pub scores_f16: fn(&[f32], &[u16], usize, &mut [f32]),
    pub exp_sum: fn(&mut [f32], f32) -> f32,
    pub acc_f32: fn(&[f32], &[f32], usize, &mut [f32]),
    pub acc_f16: fn(&[f32], &[u16], usize, &mut [f32]),
    pub acc_q8_0: fn(&[f32], &[BlockQ8_0], usize, &mut [f32]),
    /// Tiles of R rows × C tokens: `out[r * C + c] = dot(w[r], x[c])`.
    pub tile_q4_0: Tile<BlockQ4_0>,
    pub tile_q4_1: Tile<BlockQ4_1>,
    pub tile_q5_0: Tile<BlockQ5_0>,
    pub tile_q5_1: Tile<BlockQ5_1>,
    pub tile_q8_0: Tile<BlockQ8_0>,
    /// K-quant rows are whole blocks of 256, each meeting eight activation blocks.
    pub tile_q4k: Tile<BlockQ4K>,
    pub tile_q5k: Tile<BlockQ5K>,
    pub tile_q6k: Tile<BlockQ6K>,
    /// Whether the loader repacks Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 matrices into eight-row
    /// groups for the `ptile_*` entries (x86 only: the NEON tiles read ggml's layout).
    pub packs: bool,
    /// Tiles of one packed group of 8 rows × C tokens: `out[8c + i] = dot(row i, x[c])`.
    pub ptile_q4_0: PTile<P4_0>,
    pub ptile_q4_1: PTile<P4_1>,
    pub ptile_q5_0: PTile<P5_0>,
    pub ptile_q5_1: PTile<P5_1>,
    pub ptile_q8_0: PTile<P8_0>,
}

pub type Tile<B> = fn(&[&[B]], &[&[BlockQ8]], &mut [f32]);

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind.name())
    }
}

impl Kernels {
    /// The table for `kind`, or an error when this CPU lacks the instructions.
    pub fn new(kind: KernelKind) -> Result<Kernels, KernelError> {
        if !kind.available() {
            return Err(KernelError::Unavailable(kind.name()));
        }
        let scalar = Kernels {
            kind,
            quantize_q8: generic::quantize_q8,
            dot_q4_0: generic::dot_q4_0,
            dot_q4_1: generic::dot_q4_1,
            dot_q5_0: generic::dot_q5_0,
            dot_q8_0: generic::dot_q8_0,
            dot_f32: generic::dot_f32,
            scores_f32: generic::scores_f32,
            scores_f16: generic::scores_f16,
            exp_sum: generic::exp_sum,
            acc_f32: generic::acc_f32,
            acc_f16: generic::acc_f16,
            acc_q8_0: generic::acc_q8_0,
            tile_q4_0: generic::tile_q4_0,
            tile_q4_1: generic::tile_q4_1,
            tile_q5_0: generic::tile_q5_0,
            tile_q5_1: generic::tile_q5_1,
            tile_q8_0: generic::tile_q8_0,
            tile_q4k: generic::tile_q4k,
            tile_q5k: generic::tile_q5k,
            tile_q6k: generic::tile_q6k,
            packs: false,
            ptile_q4_0: packed::tile_q4_0,
            ptile_q4_1: packed::tile_q4_1,
            ptile_q5_0: packed::tile_q5_0,
            ptile_q5_1: packed::tile_q5_1,
            ptile_q8_0: packed::tile_q8_0,
        };
        Ok(match kind {
            KernelKind::Scalar => scalar,
            // Exact mode is defined by its arithmetic (f32 on dequantized weights), not by its
            // speed: it takes the fastest f32 dot product this CPU has, which sums in eight
            // lanes of four accumulators as ggml's f32 dot does.
            KernelKind::Reference => Kernels {
                dot_f32: Kernels::new(KernelKind::best())?.dot_f32,
                ..scalar
            },
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx2 => Kernels {
                kind,
                quantize_q8: avx2::quantize_q8,
                dot_q4_0: avx2::dot_q4_0,
                dot_q4_1: avx2::dot_q4_1,
                dot_q5_0: avx2::dot_q5_0,
                dot_q8_0: avx2::dot_q8_0,
                dot_f32: avx2::dot_f32,
                scores_f32: avx2::scores_f32,
                scores_f16: avx2::scores_f16,
                exp_sum: avx2::exp_sum,
                acc_f32: avx2::acc_f32,
                acc_f16: avx2::acc_f16,
                acc_q8_0: avx2::acc_q8_0,
                tile_q4_0: avx2::tile_q4_0,
                tile_q4_1: avx2::tile_q4_1,
                tile_q5_0: avx2::tile_q5_0,
                tile_q5_1: avx2::tile_q5_1,
                tile_q8_0: avx2::tile_q8_0,
                tile_q4k: avx2::tile_q4k,
                tile_q5k: avx2::tile_q5k,
                tile_q6k: avx2::tile_q6k,
                packs: true,
                ptile_q4_0: avx2::ptile_q4_0,
                ptile_q4_1: avx2::ptile_q4_1,
                ptile_q5_0: avx2::ptile_q5_0,
                ptile_q5_1: avx2::ptile_q5_1,
                ptile_q8_0: avx2::ptile_q8_0,
            },
            #[cfg(target_arch = "x86_64")]
            // The AVX2 table with the tiles, where the time goes, on the VNNI instruction.
            KernelKind::AvxVnni => Kernels {
                kind,
                tile_q4_0: avx2::tile_q4_0_vnni,
                tile_q4_1: avx2::tile_q4_1_vnni,
                tile_q5_0: avx2::tile_q5_0_vnni,
                tile_q5_1: avx2::tile_q5_1_vnni,
                tile_q8_0: avx2::tile_q8_0_vnni,
                tile_q4k: avx2::tile_q4k_vnni,
                tile_q5k: avx2::tile_q5k_vnni,
                tile_q6k: avx2::tile_q6k_vnni,
                ptile_q4_0: avx2::ptile_q4_0_vnni,
                ptile_q4_1: avx2::ptile_q4_1_vnni,
                ptile_q5_0: avx2::ptile_q5_0_vnni,
                ptile_q5_1: avx2::ptile_q5_1_vnni,
                ptile_q8_0: avx2::ptile_q8_0_vnni,
                ..Kernels::new(KernelKind::Avx2)?
            },
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512Vnni => Kernels {
                kind,
                tile_q4_0: avx2::tile_q4_0_v512,
                tile_q4_1: avx2::tile_q4_1_v512,
                tile_q5_0: avx2::tile_q5_0_v512,
                tile_q5_1: avx2::tile_q5_1_v512,
                tile_q8_0: avx2::tile_q8_0_v512,
                tile_q4k: avx2::tile_q4k_v512,
                tile_q5k: avx2::tile_q5k_v512,
                tile_q6k: avx2::tile_q6k_v512,
                ptile_q4_0: avx2::ptile_q4_0_v512,
                ptile_q4_1: avx2::ptile_q4_1_v512,
                ptile_q5_0: avx2::ptile_q5_0_v512,
                ptile_q5_1: avx2::ptile_q5_1_v512,
                ptile_q8_0: avx2::ptile_q8_0_v512,
                ..Kernels::new(KernelKind::Avx2)?
            },
            #[cfg(target_arch = "aarch64")]
            KernelKind::Neon => Kernels {
                kind,
                quantize_q8: neon::quantize_q8,
                dot_q4_0: neon::dot_q4_0,
                dot_q4_1: neon::dot_q4_1,
                dot_q5_0: neon::dot_q5_0,
                dot_q8_0: neon::dot_q8_0,
                dot_f32: neon::dot_f32,
                scores_f32: neon::scores_f32,
                scores_f16: neon::scores_f16,
                exp_sum: neon::exp_sum,
                acc_f32: neon::acc_f32,
                acc_f16: neon::acc_f16,
                acc_q8_0: neon::acc_q8_0,
                tile_q4_0: neon::tile_q4_0,
                tile_q4_1: neon::tile_q4_1,
                tile_q5_0: neon::tile_q5_0,
                tile_q5_1: neon::tile_q5_1,
                tile_q8_0: neon::tile_q8_0,
                tile_q4k: neon::tile_q4k,
                tile_q5k: neon::tile_q5k,
                tile_q6k: neon::tile_q6k,
                ..scalar
            },
            #[cfg(target_arch = "aarch64")]
            KernelKind::NeonDotprod => Kernels {
                kind,
                quantize_q8: neon::quantize_q8,
                dot_q4_0: neon::dot_q4_0_dotprod,
                dot_q4_1: neon::dot_q4_1_dotprod,
                dot_q5_0: neon::dot_q5_0_dotprod,
                dot_q8_0: neon::dot_q8_0_dotprod,
                dot_f32: neon::dot_f32,
                scores_f32: neon::scores_f32,
                scores_f16: neon::scores_f16,
                exp_sum: neon::exp_sum,
                acc_f32: neon::acc_f32,
                acc_f16: neon::acc_f16,
                acc_q8_0: neon::acc_q8_0,
                tile_q4_0: neon::tile_q4_0_dotprod,
                tile_q4_1: neon::tile_q4_1_dotprod,
                tile_q5_0: neon::tile_q5_0_dotprod,
                tile_q5_1: neon::tile_q5_1_dotprod,
                tile_q8_0: neon::tile_q8_0_dotprod,
                tile_q4k: neon::tile_q4k_dotprod,
                tile_q5k: neon::tile_q5k_dotprod,
                tile_q6k: neon::tile_q6k_dotprod,
                ..scalar
            },
            #[allow(unreachable_patterns)]
            _ => return Err(KernelError::Unavailable(kind.name())),
        })
    }

    /// `auto` (None) picks the fastest available.
    pub fn select(kind: Option<KernelKind>) -> Result<Kernels, KernelError> {
        Kernels::new(kind.unwrap_or_else(KernelKind::best))
    }

    /// Exact mode computes in f32 on dequantized weights.
    pub fn exact(&self) -> bool {
        self.kind == KernelKind::Reference
    }
}

/// Panics unless rows `0..rows` of `len` elements, `stride` apart, lie inside `have`: the raw
/// pointer loops of the SIMD attention kernels rely on it.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn check_rows(rows: usize, stride: usize, len: usize, have: usize) {
    assert!(
        rows == 0 || (rows - 1) * stride + len <= have,
        "attention rows out of bounds"
    );
}
