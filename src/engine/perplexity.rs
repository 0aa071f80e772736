//! Perplexity of a sparse FFN on a text, measured the way the sparse model is used: the dense
//! model reads a prompt (Griffin picks its neurons there), then the sparse model continues.
//!
//! The token sequence is cut into non-overlapping windows of `window` tokens. In each window the
//! first `prefix` tokens run through the dense model as a prompt; the rest are scored with
//! teacher forcing by the sparse model in one batched forward pass. Token `prefix` is predicted
//! by the dense prefill's last logits and every later token by the sparse pass, so every mode
//! scores exactly the same tokens and dense (`none`) is the reference.

use std::time::Instant;

use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::{KvCache, Logits, Pass, Scratch};
use crate::sparsity::{density, SparseRequest, SparsityMode};

/// Window geometry.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Tokens per window, lead tokens included.
    pub window: usize,
    /// Tokens of each window that run dense as the prompt, lead tokens included.
    pub prefix: usize,
}

impl Windows {
    /// Checks the geometry against the model's context and the tokens the tokenizer puts
    /// before a prompt (`lead`, e.g. BOS).
    pub fn validate(&self, lead: usize, context: usize) -> Result<()> {
        let Windows { window, prefix } = *self;
        if window < 3 {
            return Err(Error::InvalidArgument(format!(
                "--window {window} is too short: a window needs a prompt token, a scored token and its target"
            )));
        }
        if prefix == 0 {
            return Err(Error::InvalidArgument(
                "--prefix must be at least 1 (the dense prompt of each window)".into(),
            ));
        }
        if prefix > window - 2 {
            return Err(Error::InvalidArgument(format!(
                "--prefix {prefix} must be at most --window {window} minus 2, so that the sparse model scores tokens"
            )));
        }
        if prefix <= lead {
            return Err(Error::InvalidArgument(format!(
                "--prefix {prefix} must be larger than the {lead} token(s) the tokenizer puts before a text"
            )));
        }
        if window > context {
            return Err(Error::InvalidArgument(format!(
                "--window {window} is larger than the model's context of {context} tokens"
            )));
        }
        Ok(())
    }

    /// Text tokens per window (the window less the lead tokens).
    pub fn body(&self, lead: usize) -> usize {
        self.window - lead
    }
}

/// The perplexity of one sparsity mode.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityResult {
    pub sparsity: SparsityMode,
    /// Neuron fraction kept (1 for dense; for calibrated CATS the calibration target).
    pub keep: f32,
    /// Parameters read per sparse token / all parameters (see `sparsity::density`).
    pub density: f64,
    /// Mean fraction of FFN neurons kept per layer over the sparse tokens (empty for dense).
    pub kept_per_layer: Vec<f64>,
    /// exp(mean_nll).
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub seconds: f64,
    /// Window tokens (dense and sparse) processed per second.
    pub tokens_per_s: f64,
}

/// Runs the engine's sparsity over `n_windows` windows of `tokens`, each preceded by `lead`.
/// `on_window` is called after every window (progress).
pub fn perplexity<B: OffloadBackend>(
    engine: &Engine<B>,
    lead: &[u32],
    tokens: &[u32],
    geometry: Windows,
    n_windows: usize,
    on_window: &mut dyn FnMut(),
) -> Result<PerplexityResult> {
    let Windows { window, prefix } = geometry;
    let body = geometry.body(lead.len());
    if n_windows == 0 || tokens.len() < n_windows * body {
        return Err(Error::InvalidArgument(format!(
            "{n_windows} windows of {body} text tokens need more than the {} tokens given",
            tokens.len()
        )));
    }
    let (model, sparsity) = (&engine.model, engine.sparsity());
    let c = &model.config;
    // The sparse pass feeds tokens prefix..window-1: the last token is only a target.
    let sparse_len = window - 1 - prefix;
    let mut scratch = Scratch::with_logit_rows(model, prefix.max(sparse_len), sparse_len)?;
    let mut cache = model.new_cache(window)?;
    let mut nll = 0.0f64;
    let mut scored = 0usize;
    // Neurons kept, summed as fraction x tokens per layer, and sparse tokens: the mean over
    // windows weights each window by its tokens.
    let mut kept_sum = vec![0.0f64; c.num_layers];
    let mut sparse_tokens = 0u64;
    let mut ids = Vec::with_capacity(window);
    let t0 = Instant::now();
    for w in 0..n_windows {
        ids.clear();
        ids.extend_from_slice(lead);
        ids.extend_from_slice(&tokens[w * body..(w + 1) * body]);
        cache.truncate(0);
        let mut req = SparseRequest::new(sparsity, &model.backend, model.ffn_dims())?;
        nll += score_window(engine, &mut req, &ids, prefix, &mut cache, &mut scratch)?;
        scored += window - prefix;
        let report = req.report(c);
        for (sum, k) in kept_sum.iter_mut().zip(&report.kept_per_layer) {
            *sum += k * report.sparse_tokens as f64;
        }
        sparse_tokens += report.sparse_tokens;
        on_window();
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mode = sparsity.mode();
    let kept_per_layer: Vec<f64> = if mode == SparsityMode::None || sparse_tokens == 0 {
        Vec::new()
    } else {
        kept_sum.iter().map(|s| s / sparse_tokens as f64).collect()
    };
    let mean_nll = nll / scored as f64;
    Ok(PerplexityResult {
        sparsity: mode,
        keep: sparsity.keep(),
        density: density(mode, &kept_per_layer, c),
        kept_per_layer,
        perplexity: mean_nll.exp(),
        mean_nll,
        tokens_scored: scored,
        windows: n_windows,
        seconds,
        tokens_per_s: if seconds > 0.0 {
            (n_windows * (window - 1)) as f64 / seconds
        } else {
            0.0
        },
    })
}

/// The summed negative log-likelihood of window `ids` after its dense prompt `..prefix`:
/// the prompt's last logits predict token `prefix`, one sparse pass the rest.
fn score_window<B: OffloadBackend>(
    engine: &Engine<B>,
    req: &mut SparseRequest<'_, B>,
    ids: &[u32],
    prefix: usize,
    cache: &mut KvCache<B>,
    scratch: &mut Scratch<B>,
) -> Result<f64> {
    let model = &engine.model;
    let vocab = model.config.vocab_size;
    let pass = Pass::new(&ids[..prefix], Logits::Last, req.prefill_ffn());
    let last = model.forward(pass, cache, scratch)?;
    req.finish_prefill(&model.backend)?;
    let mut nll = token_nll(&last, ids[prefix], vocab)?;
    let fed = &ids[prefix..ids.len() - 1];
    let pass = Pass::new(fed, Logits::All, req.decode_ffn()?);
    let logits = model.forward(pass, cache, scratch)?;
    req.count_decode(fed.len());
    for (row, &target) in logits.chunks_exact(vocab).zip(&ids[prefix + 1..]) {
        nll += token_nll(row, target, vocab)?;
    }
    Ok(nll)
}

/// -log softmax(logits)[target], in f64 so long vocabularies sum without loss.
pub fn token_nll(logits: &[f32], target: u32, vocab: usize) -> Result<f64> {
    let row = logits.get(..vocab).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "a logits row of {} values, expected {vocab}",
            logits.len()
        ))
    })?;
    let x = *row
        .get(target as usize)
        .ok_or(Error::TokenOutOfRange { id: target, vocab })? as f64;
    // A NaN would otherwise turn into a NaN perplexity with no hint of where it came from.
    if row.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(
            "the model produced non-finite logits".into(),
        ));
    }
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    Ok(max + sum.ln() - x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_a_stable_log_softmax() {
        // Uniform logits: -log(1/4).
        let nll = token_nll(&[3.0, 3.0, 3.0, 3.0], 2, 4).unwrap();
        assert!((nll - 4f64.ln()).abs() < 1e-12);
        // Huge logits do not overflow.
        let nll = token_nll(&[1000.0, 0.0], 0, 2).unwrap();
        assert!((0.0..1e-12).contains(&nll));
        assert!(token_nll(&[0.0, 1.0], 5, 2).is_err());
        assert!(token_nll(&[f32::NAN, 1.0], 1, 2).is_err());
    }

    #[test]
    fn window_geometry_errors() {
        // (window, prefix, lead tokens, context) -> valid?
        let cases = [
            (16, 8, 1, 64, true),
            (16, 0, 0, 64, false),
            (16, 15, 0, 64, false),
            (16, 16, 0, 64, false),
            (16, 1, 1, 64, false),
            (128, 8, 0, 64, false),
        ];
        for (window, prefix, lead, context, valid) in cases {
            let w = Windows { window, prefix };
            assert_eq!(
                w.validate(lead, context).is_ok(),
                valid,
                "window {window}, prefix {prefix}, lead {lead}, context {context}"
            );
        }
    }
}
