//! Weight formats the planner reasons about, and what a tensor costs in each.
//!
//! The quantized formats follow llama.cpp's Q8_0 / Q4_0: weights in groups of 32 along a row,
//! each group carrying one f16 scale, so the scale adds 16/32 = 0.5 bit per weight:
//! q8 = 8 + 0.5 = 8.5 bits, q4 = 4 + 0.5 = 4.5 bits per weight. Groups never span rows, so a
//! row's bytes are rounded up on their own ([`WeightFormat::row_bytes`]); for rows whose length
//! is a multiple of 32 (every real model here) this is exactly `params * bits / 8`.
//!
//! Vectors (norm weights, biases) are always f32 in this project's backends, whatever the
//! matrices' format: see [`VECTOR_BYTES`].

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// Bytes per element of a vector (norm weight, bias): f32 in every backend.
pub const VECTOR_BYTES: u64 = 4;

/// Weights per quantization group (one f16 scale each) in q8 and q4.
pub const GROUP: u64 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    Bf16,
    F16,
    Q8,
    Q4,
}

impl WeightFormat {
    /// From the largest to the smallest: the order in which the planner looks for one that fits.
    pub const ALL: [WeightFormat; 4] = [
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::Q8,
        WeightFormat::Q4,
    ];

    /// Average bits per weight, group scales included.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            WeightFormat::Bf16 | WeightFormat::F16 => 16.0,
            WeightFormat::Q8 => 8.5,
            WeightFormat::Q4 => 4.5,
        }
    }

    /// Bytes of `params` weights laid out as whole groups: `ceil(params / 32)` groups of
    /// 32 quantized weights plus a 2-byte scale for q8/q4, `2 * params` for bf16/f16.
    pub fn bytes(self, params: u64) -> u64 {
        let groups = params.div_ceil(GROUP);
        match self {
            WeightFormat::Bf16 | WeightFormat::F16 => params.saturating_mul(2),
            // 32 one-byte weights + one f16 scale = 34 bytes per group.
            WeightFormat::Q8 => groups.saturating_mul(GROUP + 2),
            // 32 half-byte weights + one f16 scale = 18 bytes per group.
            WeightFormat::Q4 => groups.saturating_mul(GROUP / 2 + 2),
        }
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
            WeightFormat::Q8 => "q8",
            WeightFormat::Q4 => "q4",
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
        WeightFormat::ALL
            .into_iter()
            .find(|w| w.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown weight format `{s}`: expected bf16, f16, q8 or q4"
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
            // 3200 weights = 100 whole groups: bytes are exactly params * bits / 8.
            assert_eq!(w.bytes(3200) as f64, 3200.0 * w.bits_per_weight() / 8.0);
        }
        assert_eq!(WeightFormat::Q4.bytes(1), 18);
        assert_eq!(WeightFormat::Q8.bytes(33), 68);
        assert_eq!(WeightFormat::Bf16.matrix_bytes(576, 192), 576 * 192 * 2);
    }

    #[test]
    fn names_round_trip() {
        for w in WeightFormat::ALL {
            assert_eq!(w.name().parse::<WeightFormat>().unwrap(), w);
        }
        assert!("q3".parse::<WeightFormat>().is_err());
    }
}
