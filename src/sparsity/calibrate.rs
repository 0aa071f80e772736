//! CATS threshold calibration: run the dense model over sample text, histogram every layer's
//! |SiLU(gate)| and pick per layer the threshold that keeps the target fraction.
//!
//! Values go into bins (64 per octave, so a threshold lands within 1.6% of the exact
//! quantile) instead of being stored: memory stays ~130 KiB per layer whatever the text
//! length. The threshold is a bin edge, so the kept fraction it gives on the calibration text
//! is known exactly and reported.

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::llama::Ffn;
use crate::model::{Llama, Logits, Scratch};
use crate::progress::progress_bar;
use crate::sparsity::cats::{CatsThresholds, ModelShape};
use crate::sparsity::validate_keep;

/// Receives each layer's SiLU(gate) rows (`[n_tokens, d_ff]`) during a dense forward.
pub trait GateRecorder {
    fn record(&mut self, layer: usize, act: &[f32]);
}

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

/// Per-layer histograms of |SiLU(gate)|.
pub struct GateHistograms {
    layers: Vec<Histogram>,
}

impl GateHistograms {
    pub fn new(layers: usize) -> Self {
        GateHistograms {
            layers: vec![Histogram::new(); layers],
        }
    }
}

impl GateRecorder for GateHistograms {
    fn record(&mut self, layer: usize, act: &[f32]) {
        if let Some(h) = self.layers.get_mut(layer) {
            act.iter().for_each(|v| h.add(v.abs()));
        }
    }
}

/// Runs the dense model over `tokens` in independent sequences of `seq_len` tokens and
/// returns per-layer thresholds keeping `keep` of the neurons.
pub fn calibrate<B: Backend>(
    model: &Llama<B>,
    tokens: &[u32],
    keep: f32,
    seq_len: usize,
    text_name: &Path,
) -> Result<CatsThresholds> {
    let keep = validate_keep(keep)?;
    if tokens.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: the calibration text has no tokens",
            text_name.display()
        )));
    }
    let seq_len = seq_len.clamp(1, model.config.max_position_embeddings.max(1));
    let mut hist = GateHistograms::new(model.config.num_layers);
    let chunk = seq_len.min(256);
    let mut scratch = Scratch::with_logit_rows(model, chunk, 1)?;
    let bar = progress_bar(tokens.len() as u64, "calibrating");
    for seq in tokens.chunks(seq_len) {
        let mut cache = model.new_cache(seq.len())?;
        for piece in seq.chunks(chunk) {
            model.forward_with(
                piece,
                &mut cache,
                &mut scratch,
                Logits::None,
                &mut Ffn::DenseRecording(&mut hist),
            )?;
            bar.inc(piece.len() as u64);
        }
    }
    bar.finish_and_clear();
    let (thresholds, kept): (Vec<f32>, Vec<f64>) =
        hist.layers.iter().map(|h| h.threshold(keep as f64)).unzip();
    Ok(CatsThresholds {
        model: ModelShape::of(&model.config),
        keep,
        thresholds,
        calibration_kept: kept,
        calibration_tokens: tokens.len(),
        calibration_text: text_name.display().to_string(),
    })
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
