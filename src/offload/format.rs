//! Weight formats the planner reasons about, and what a tensor costs in each.
//!
//! The quantized formats are ggml's block formats with their true sizes: Q8_0, Q4_0 and Q4_1
//! in blocks of 32 weights (34, 18 and 20 bytes: one f16 scale, plus an f16 minimum for
//! Q4_1), and the K-quants in super-blocks of 256 (Q4K 144, Q5K 176, Q6K 210 bytes).
//! Blocks never span rows, so a row's bytes are rounded up on their own
//! ([`WeightFormat::row_bytes`]); for rows whose length is a whole number of blocks (every
//! real model here) this is exactly `params * bits / 8`.
//!
//! Vectors (norm weights, biases) are always f32 in this project's backends, whatever the
//! matrices' format: see [`VECTOR_BYTES`].

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::tensor::DType;

/// Bytes per element of a vector (norm weight, bias): f32 in every backend.
pub const VECTOR_BYTES: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    Bf16,
    F16,
    #[value(name = "q8_0", alias = "q8")]
    Q8_0,
    #[value(name = "q6_k")]
    #[serde(rename = "q6_k")]
    Q6K,
    #[value(name = "q5_k")]
    #[serde(rename = "q5_k")]
    Q5K,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_k")]
    #[serde(rename = "q4_k")]
    Q4K,
    #[value(name = "q4_0", alias = "q4")]
    Q4_0,
}

impl WeightFormat {
    /// From the largest to the smallest: the order in which the planner looks for one that
    /// fits (Q4K before Q4_0: the same bits, better quality).
    pub const ALL: [WeightFormat; 8] = [
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q6K,
        WeightFormat::Q5K,
        WeightFormat::Q4_1,
        WeightFormat::Q4K,
        WeightFormat::Q4_0,
    ];

    /// The tensor type that stores this format.
    pub fn dtype(self) -> DType {
        match self {
            WeightFormat::Bf16 => DType::BF16,
            WeightFormat::F16 => DType::F16,
            WeightFormat::Q8_0 => DType::Q8_0,
            WeightFormat::Q6K => DType::Q6K,
            WeightFormat::Q5K => DType::Q5K,
            WeightFormat::Q4_1 => DType::Q4_1,
            WeightFormat::Q4K => DType::Q4K,
            WeightFormat::Q4_0 => DType::Q4_0,
        }
    }

    /// The format of matrices of `dtype` (`None`: f32, which the planner does not place).
    pub fn of(dtype: DType) -> Option<WeightFormat> {
        WeightFormat::ALL.into_iter().find(|w| w.dtype() == dtype)
    }

    /// Whether weights are stored in blocks with scales (not one float per weight).
    pub fn is_quantized(self) -> bool {
        self.dtype().is_quantized()
    }

    /// Average bits per weight, block scales (and minima) included.
    pub fn bits_per_weight(self) -> f64 {
        let (n, bytes) = self.dtype().block();
        bytes as f64 * 8.0 / n as f64
    }

    /// Bytes of `params` weights laid out as whole blocks: `ceil(params / block)` blocks.
    pub fn bytes(self, params: u64) -> u64 {
        let (n, bytes) = self.dtype().block();
        params.div_ceil(n as u64).saturating_mul(bytes as u64)
    }

    /// Bytes of one row of `cols` weights (groups do not span rows).
    pub fn row_bytes(self, cols: usize) -> u64 {
        self.bytes(cols as u64)
    }

    /// Bytes of a `rows x cols` matrix.
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> u64 {
        self.row_bytes(cols).saturating_mul(rows as u64)
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Bf16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q6K => "q6_k",
            WeightFormat::Q5K => "q5_k",
            WeightFormat::Q4_1 => "q4_1",
            WeightFormat::Q4K => "q4_k",
            WeightFormat::Q4_0 => "q4_0",
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let alias = match s.to_ascii_lowercase().as_str() {
            "q8" => Some(WeightFormat::Q8_0),
            "q4" => Some(WeightFormat::Q4_0),
            _ => None,
        };
        let names: Vec<&str> = WeightFormat::ALL.iter().map(|w| w.name()).collect();
        alias
            .or_else(|| (WeightFormat::ALL.into_iter()).find(|w| w.name().eq_ignore_ascii_case(s)))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown weight format `{s}`: expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_include_group_scales() {
        for w in WeightFormat::ALL {
            // 3 * 256 * 25 weights: whole blocks of every format, so bytes are exactly
            // params * bits / 8.
            let n = 3 * 256 * 25;
            assert_eq!(w.bytes(n) as f64, n as f64 * w.bits_per_weight() / 8.0);
            assert_eq!(WeightFormat::of(w.dtype()), Some(w));
            // JSON reports name formats as the CLI does.
            assert_eq!(serde_json::to_value(w).unwrap(), w.name());
        }
        assert_eq!(WeightFormat::Q4_0.bytes(1), 18);
        assert_eq!(WeightFormat::Q8_0.bytes(33), 68);
        assert_eq!(WeightFormat::Q4_1.bytes(64), 40);
        // K-quants: super-blocks of 256 weights.
        assert_eq!(WeightFormat::Q4K.bytes(256), 144);
        assert_eq!(WeightFormat::Q6K.bytes(257), 420);
        assert_eq!(WeightFormat::Q5K.bits_per_weight(), 5.5);
        assert_eq!(WeightFormat::Bf16.matrix_bytes(576, 192), 576 * 192 * 2);
    }

    #[test]
    fn names_round_trip() {
        for w in WeightFormat::ALL {
            assert_eq!(w.name().parse::<WeightFormat>().unwrap(), w);
        }
        assert_eq!("q4".parse::<WeightFormat>().unwrap(), WeightFormat::Q4_0);
        assert_eq!("Q8".parse::<WeightFormat>().unwrap(), WeightFormat::Q8_0);
        let err = "q3".parse::<WeightFormat>().unwrap_err().to_string();
        assert!(err.contains("q4_k"), "{err}");
    }
}
