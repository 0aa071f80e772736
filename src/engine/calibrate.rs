//! CATS threshold calibration (`sirius-offload calibrate`): the dense model runs over sample
//! text while `sparsity::calibrate::GateHistograms` records every layer's |SiLU(gate)|; per
//! layer, the threshold that keeps the target fraction is read off the histograms.

use std::path::Path;

use crate::backend::offload::OffloadBackend;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::{Logits, Pass, Scratch};
use crate::progress::progress_bar;
use crate::sparsity::calibrate::GateHistograms;
use crate::sparsity::cats::{CatsThresholds, ModelShape};
use crate::sparsity::validate_keep;

/// Runs the dense model over `tokens` in independent sequences of `seq_len` tokens and
/// returns per-layer thresholds keeping `keep` of the neurons (`text_name`: where the text
/// came from, recorded in the file).
pub fn calibrate<B: OffloadBackend>(
    engine: &Engine<B>,
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
    let model = &engine.model;
    let seq_len = seq_len.clamp(1, model.config.max_position_embeddings.max(1));
    let mut hist = GateHistograms::new(model.config.num_layers);
    let chunk = seq_len.min(256);
    let mut scratch = Scratch::with_logit_rows(model, chunk, 1)?;
    let bar = progress_bar(tokens.len() as u64, "calibrating");
    for seq in tokens.chunks(seq_len) {
        let mut cache = model.new_cache(seq.len())?;
        for piece in seq.chunks(chunk) {
            let pass = Pass::new(piece, Logits::None, &mut hist);
            model.forward(pass, &mut cache, &mut scratch)?;
            bar.inc(piece.len() as u64);
        }
    }
    bar.finish_and_clear();
    let (thresholds, kept) = hist.thresholds(keep as f64);
    Ok(CatsThresholds {
        model: ModelShape::of(&model.config),
        keep,
        thresholds,
        calibration_kept: kept,
        calibration_tokens: tokens.len(),
        calibration_text: text_name.display().to_string(),
    })
}
