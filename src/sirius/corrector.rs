//! The corrector's window, written against a narrow model interface ([`SiriusModel`]) so it
//! can be tested with a scripted fake and reused by every backend and runtime: draft K - 1
//! tokens after x0 with the sparse model (a chain, or a tree of W beams), verify them in one
//! full pass that rewrites their K/V, accept the likely prefix, roll back the rest, and hand
//! back the accepted drafts and the full model's next token. The request loop around it
//! (budgets, stop ids, text) is the engine's, shared with plain generation.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::sampler::argmax;
use crate::tensor::TreeMask;

/// What the corrector needs from a model: one KV cache shared by a sparse (draft) and a full
/// (verify) forward, and rollback.
pub trait SiriusModel {
    /// Tokens in the cache.
    fn cache_len(&self) -> usize;
    /// Room left in the cache.
    fn cache_room(&self) -> usize;
    /// Drops cache entries past `len`.
    fn truncate(&mut self, len: usize) -> Result<()>;
    /// Sparse model: appends `token` to the cache, returns the next-token logits.
    fn draft(&mut self, token: u32) -> Result<Vec<f32>>;
    /// Full model: appends `tokens` to the cache in one pass (writing its own K/V), returns
    /// the logits after each of them.
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>>;

    // ---- Trees (width > 1); a model without them refuses --width > 1. ----

    /// Sparse model over the last nodes of a token tree (`mask` says where they hang):
    /// appends them to the cache, returns each one's next-token logits.
    fn draft_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        let _ = (tokens, mask);
        Err(no_trees())
    }
    /// Full model over a whole tree in one pass (writing its own K/V).
    fn verify_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        let _ = (tokens, mask);
        Err(no_trees())
    }
    /// Keeps, of the cache rows from `start` on, only `rows` (ascending), compacted to
    /// `start..`: the accepted path.
    fn keep_rows(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        let _ = (start, rows);
        Err(no_trees())
    }
}

fn no_trees() -> Error {
    Error::InvalidArgument("this model has no tree drafting: use --width 1".into())
}

/// Widest tree accepted: the paper tunes W in {1, 2, 4, 6, 8}; wider trees make the
/// verification pass ((K - 1) * W + 1 tokens) cost more than they gain.
pub const MAX_WIDTH: usize = 16;
/// Longest window accepted (the paper uses K = 16): the verification pass holds logits for
/// every window token, so an absurd K would only ask for absurd memory.
pub const MAX_PERIOD: usize = 256;

/// The corrector's settings (`--period --threshold --accept-temperature --width`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiriusConfig {
    /// Window (kernel) size K: K - 1 drafted tokens per verification.
    pub period: usize,
    /// Acceptance threshold on the full model's probability of a drafted token.
    pub threshold: f32,
    /// Temperature of that probability (T = 0.6 in the paper).
    pub accept_temperature: f32,
    /// Tree width W: 1 is the chain; W > 1 drafts W beams verified as one tree of
    /// (K - 1) * W + 1 tokens.
    pub width: usize,
}

impl Default for SiriusConfig {
    /// The paper's accuracy settings: K = 16, threshold 0.1, T = 0.6, the chain.
    fn default() -> Self {
        SiriusConfig {
            period: 16,
            threshold: 0.1,
            accept_temperature: 0.6,
            width: 1,
        }
    }
}

impl SiriusConfig {
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_PERIOD).contains(&self.period) {
            return Err(Error::InvalidArgument(format!(
                "--period must be between 1 and {MAX_PERIOD}, got {}",
                self.period
            )));
        }
        if !self.threshold.is_finite() || self.threshold < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "--threshold must be finite and >= 0, got {}",
                self.threshold
            )));
        }
        if !(1..=MAX_WIDTH).contains(&self.width) {
            return Err(Error::InvalidArgument(format!(
                "--width must be between 1 and {MAX_WIDTH}, got {}",
                self.width
            )));
        }
        if !(self.accept_temperature.is_finite() && self.accept_temperature > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "--accept-temperature must be positive, got {}",
                self.accept_temperature
            )));
        }
        Ok(())
    }

    /// Cache rows a request needs beyond plain decoding's: the last window's full-model
    /// token (plain decoding never feeds its final token back), plus a tree's pruned
    /// branches until the verification compacts them away (their positions are depths, so
    /// they never pass the context). Without these the last windows would shrink.
    pub fn extra_cache_rows(&self) -> usize {
        1 + (self.period - 1) * (self.width - 1)
    }

    /// Rows of the draft batch (one per beam) and of the verification window, for a cache
    /// of `capacity` rows (a window never holds more tokens than the cache has rows).
    pub fn batch_rows(&self, capacity: usize) -> (usize, usize) {
        let width = self.width.clamp(1, capacity.max(1));
        let window = ((self.period.max(1) - 1) * width + 1).min(capacity.max(1));
        (width, window)
    }
}

/// AAL and friends (SIRIUS.md, "Metrics").
#[derive(Debug, Clone, Default, Serialize)]
pub struct CorrectionStats {
    pub verifications: usize,
    /// Sum over verifications of the accepted drafts plus the full model's token (n + 1).
    pub advanced: usize,
    /// Drafted tokens thrown away by rollbacks.
    pub rollback_tokens: usize,
    pub drafted: usize,
    /// Seconds in sparse draft steps and in full verification passes.
    pub draft_seconds: f64,
    pub verify_seconds: f64,
}

impl CorrectionStats {
    /// Average advance length per verification.
    pub fn aal(&self) -> f64 {
        if self.verifications == 0 {
            0.0
        } else {
            self.advanced as f64 / self.verifications as f64
        }
    }

    /// ((K - 1) * D_sparse + 1) / AAL.
    pub fn effective_density(&self, period: usize, sparse_density: f64) -> f64 {
        effective_density(period, sparse_density, self.aal())
    }
}

/// ((K - 1) * density + 1) / AAL (SIRIUS.md, "Metrics"): the fraction of the parameters read
/// per produced token; 1 without verifications.
pub fn effective_density(period: usize, density: f64, aal: f64) -> f64 {
    if aal > 0.0 {
        ((period as f64 - 1.0) * density + 1.0) / aal
    } else {
        1.0
    }
}

/// `softmax(z / t)[token]`, computed stably in f64.
pub fn token_probability(z: &[f32], t: f32, token: u32) -> f64 {
    let max = z
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return 0.0;
    }
    let t = t as f64;
    let sum: f64 = z
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| ((v as f64 - max) / t).exp())
        .sum();
    match z.get(token as usize) {
        Some(&v) if !v.is_nan() => ((v as f64 - max) / t).exp() / sum,
        _ => 0.0,
    }
}

/// How a window is drafted and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Chain,
    Tree,
}

/// What one verification decided: the accepted drafts and the full model's next token.
pub(crate) struct Verdict {
    pub accepted: Vec<u32>,
    pub next: u32,
}

/// Runs correction windows over a [`SiriusModel`] and keeps their statistics.
pub struct Corrector {
    config: SiriusConfig,
    kind: WindowKind,
    /// Ids the tree never drafts (with W > 1, EOS would end a beam's text).
    stop_ids: Vec<u32>,
    pub stats: CorrectionStats,
}

impl Corrector {
    /// A corrector of `config`: the chain for width 1, the tree for wider.
    pub fn new(config: SiriusConfig, stop_ids: &[u32]) -> Result<Self> {
        config.validate()?;
        let kind = match config.width {
            1 => WindowKind::Chain,
            _ => WindowKind::Tree,
        };
        Ok(Corrector {
            config,
            kind,
            stop_ids: stop_ids.to_vec(),
            stats: CorrectionStats::default(),
        })
    }

    /// Tree windows whatever the width (with width 1 the tree is a chain and must give
    /// exactly the chain's output; tests hold it to that).
    pub fn with_tree_windows(mut self) -> Self {
        self.kind = WindowKind::Tree;
        self
    }

    pub fn config(&self) -> &SiriusConfig {
        &self.config
    }

    /// One window after `x0` (produced, not yet in the model's cache): K - 1 drafts (fewer
    /// near the cache's end or the token `budget`), one verification, rollback. Returns the
    /// accepted drafts followed by the full model's next token (at most K tokens); every one
    /// but that last is in the cache. The model needs at least one free cache row.
    pub fn window(
        &mut self,
        model: &mut dyn SiriusModel,
        x0: u32,
        budget: usize,
    ) -> Result<Vec<u32>> {
        let room = model.cache_room();
        if room == 0 {
            return Err(Error::ContextFull {
                needed: model.cache_len() + 1,
                capacity: model.cache_len(),
            });
        }
        let fits = match self.kind {
            WindowKind::Chain => room,
            // A tree of K - 1 levels of W nodes under x0.
            WindowKind::Tree => (room - 1) / self.config.width + 1,
        };
        let k = self.config.period.min(fits).min(budget + 1).max(1);
        let verdict = match self.kind {
            WindowKind::Chain => chain_window(model, x0, k, &self.config, &mut self.stats)?,
            WindowKind::Tree => crate::sirius::tree::tree_window(
                model,
                x0,
                k,
                &self.config,
                &self.stop_ids,
                &mut self.stats,
            )?,
        };
        let mut tokens = verdict.accepted;
        tokens.push(verdict.next);
        Ok(tokens)
    }
}

/// One chain window: K - 1 greedy drafts after x0 (already produced, not yet in the cache),
/// one full pass over the K tokens that rewrites their K/V, acceptance, rollback.
fn chain_window(
    model: &mut dyn SiriusModel,
    x0: u32,
    k: usize,
    opts: &SiriusConfig,
    stats: &mut CorrectionStats,
) -> Result<Verdict> {
    let start = model.cache_len();
    let mut window = vec![x0];
    let t = Instant::now();
    for _ in 1..k {
        let logits = model.draft(*window.last().unwrap_or(&x0))?;
        window.push(argmax(&logits));
    }
    stats.draft_seconds += t.elapsed().as_secs_f64();
    stats.drafted += k - 1;
    // Verify: the full model rewrites the window's K/V entries.
    model.truncate(start)?;
    let t = Instant::now();
    let z = model.verify(&window)?;
    stats.verify_seconds += t.elapsed().as_secs_f64();
    check_rows(&z, window.len())?;
    stats.verifications += 1;
    let n = accepted_prefix(&window, |i| &z[i], opts);
    // Keep x0, d1..dn; the full model's token after them starts the next window.
    model.truncate(start + n + 1)?;
    stats.rollback_tokens += k - 1 - n;
    stats.advanced += n + 1;
    Ok(Verdict {
        accepted: window[1..=n].to_vec(),
        next: argmax(&z[n]),
    })
}

/// n: how many drafts of `path` (`path[0]` is x0) the full model accepts in a row, where
/// `logits(i)` is its prediction after `path[i]`.
pub(crate) fn accepted_prefix<'z>(
    path: &[u32],
    logits: impl Fn(usize) -> &'z [f32],
    opts: &SiriusConfig,
) -> usize {
    let mut n = 0;
    while n + 1 < path.len()
        && token_probability(logits(n), opts.accept_temperature, path[n + 1])
            >= opts.threshold as f64
    {
        n += 1;
    }
    n
}

pub(crate) fn check_rows(z: &[Vec<f32>], tokens: usize) -> Result<()> {
    if z.len() != tokens {
        return Err(Error::InvalidArgument(format!(
            "verify returned {} rows for {tokens} tokens",
            z.len()
        )));
    }
    Ok(())
}
