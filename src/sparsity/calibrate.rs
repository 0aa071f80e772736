//! CATS threshold calibration: the dense model runs over sample text (`engine::calibrate`)
//! while these histograms record every layer's |SiLU(gate)|; per layer, the threshold that
//! keeps the target fraction is then read off them.
//!
//! Values go into bins (64 per octave, so a threshold lands within 1.6% of the exact
//! quantile) instead of being stored: memory stays ~130 KiB per layer whatever the text
//! length. The threshold is a bin edge, so the kept fraction it gives on the calibration text
//! is known exactly and reported.

use crate::backend::Backend;
use crate::error::Result;
use crate::sparsity::ffn::{DenseTap, FfnStep, FfnStrategy};

/// A magnitude's bin is its f32 bit pattern without the sign and the low 17 mantissa bits:
/// the exponent and the top 6 mantissa bits, i.e. 64 bins per octave (a threshold lands within
/// 1.6% of the exact quantile). Binning is a shift, with no logarithm per value.
const SHIFT: u32 = 17;
const N_BINS: usize = 1 << (31 - SHIFT);

/// Histogram of magnitudes in the bins above.
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; N_BINS],
            total: 0,
        }
    }

    /// NaN counts as 0; +inf lands in the top bins.
    fn bin(m: f32) -> usize {
        if m.is_nan() {
            0
        } else {
            (m.abs().to_bits() >> SHIFT) as usize
        }
    }

    /// Lower edge of bin `b`: every value in it is >= the edge (exactly: positive floats
    /// order like their bit patterns).
    fn edge(b: usize) -> f32 {
        f32::from_bits((b as u32) << SHIFT)
    }

    fn add(&mut self, m: f32) {
        self.counts[Self::bin(m)] += 1;
        self.total += 1;
    }

    /// The largest bin edge keeping at least `keep` of the values, and the fraction it keeps.
    fn threshold(&self, keep: f64) -> (f32, f64) {
        let want = (keep * self.total as f64).ceil() as u64;
        let mut above = 0u64;
        for b in (0..N_BINS).rev() {
            above += self.counts[b];
            if above >= want {
                return (Self::edge(b), above as f64 / self.total.max(1) as f64);
            }
        }
        (0.0, 1.0)
    }
}

/// Per-layer histograms of |SiLU(gate)|: as an [`FfnStrategy`] they run the dense FFN and
/// record every layer's activations (`engine::calibrate` drives them over a text).
pub struct GateHistograms {
    layers: Vec<Histogram>,
}

impl GateHistograms {
    pub fn new(layers: usize) -> Self {
        GateHistograms {
            layers: vec![Histogram::new(); layers],
        }
    }

    /// Adds one layer's SiLU(gate) rows.
    pub fn record(&mut self, layer: usize, act: &[f32]) {
        if let Some(h) = self.layers.get_mut(layer) {
            act.iter().for_each(|v| h.add(v.abs()));
        }
    }

    /// Per layer: the largest bin edge keeping at least `keep` of the values recorded, and
    /// the fraction it keeps.
    pub fn thresholds(&self, keep: f64) -> (Vec<f32>, Vec<f64>) {
        self.layers.iter().map(|h| h.threshold(keep)).unzip()
    }
}

impl<B: Backend> FfnStrategy<B> for GateHistograms {
    fn apply(&mut self, mut step: FfnStep<'_, B>) -> Result<()> {
        step.dense(self)
    }
}

impl<B: Backend> DenseTap<B> for GateHistograms {
    fn gate(&mut self, step: &FfnStep<'_, B>) -> Result<()> {
        let mut act = vec![0f32; step.n_tokens * step.dims.neurons];
        step.backend.read(&step.scratch.gate, 0, &mut act)?;
        // Host memory: the CPU kernels' SIMD silu (a scalar exp per value made calibration
        // twice as slow as the forward pass).
        crate::backend::cpu::silu(&mut act);
        self.record(step.layer, &act);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_threshold_keeps_the_asked_fraction() {
        let mut h = Histogram::new();
        for i in 1..=1000 {
            h.add(i as f32 * 0.01);
        }
        h.add(0.0);
        let (t, kept) = h.threshold(0.3);
        let exact = (1..=1000).filter(|&i| i as f32 * 0.01 >= t).count() as f64 / 1001.0;
        assert!(
            (kept - exact).abs() < 1e-12,
            "reported {kept}, exact {exact}"
        );
        assert!((0.3..0.32).contains(&kept), "kept {kept}");
        // The edge is within one bin (1.6%) of the exact 70% quantile (7.0).
        assert!(t <= 7.01 && t > 6.9, "threshold {t}");
        assert_eq!(h.threshold(1.0).0, 0.0);
    }
}
