//! The chain corrector, written against a narrow model interface ([`SiriusModel`]) so it can
//! be tested with a scripted fake and reused by every backend.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::Serialize;

use crate::backend::TreeMask;
use crate::error::{Error, Result};
use crate::model::sampler::argmax;

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

#[derive(Debug, Clone, Copy)]
pub struct CorrectorOptions {
    /// Window (kernel) size K: K - 1 drafted tokens per verification.
    pub period: usize,
    /// Acceptance threshold on the full model's probability of a drafted token.
    pub threshold: f32,
    /// Temperature of that probability (T = 0.6 in the paper).
    pub accept_temperature: f32,
    /// Tree width W (1 = the chain).
    pub width: usize,
    pub max_tokens: usize,
}

impl CorrectorOptions {
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

/// Greedy Sirius generation after a prompt already in the model's cache. `first` is the
/// full model's token after the prompt (x0 of the first window, not yet in the cache).
/// Returns the produced tokens (`first` included), stopping after `max_tokens`, at the
/// first stop id (not included) found at a verification boundary, or when the cache is full.
pub fn correct(
    model: &mut dyn SiriusModel,
    first: u32,
    stop_ids: &[u32],
    opts: &CorrectorOptions,
) -> Result<(Vec<u32>, CorrectionStats)> {
    correct_streaming(model, first, stop_ids, opts, &mut |_| {
        ControlFlow::Continue(())
    })
}

/// [`correct`] that hands each verification boundary's new tokens to `on_tokens`, which
/// returns `Break(n)` to stop after the first `n` of them (a stop string, a consumer gone
/// away): the output then ends there. Width 1 runs the chain, wider the tree
/// ([`crate::sirius::tree`]).
pub fn correct_streaming(
    model: &mut dyn SiriusModel,
    first: u32,
    stop_ids: &[u32],
    opts: &CorrectorOptions,
    on_tokens: &mut dyn FnMut(&[u32]) -> ControlFlow<usize>,
) -> Result<(Vec<u32>, CorrectionStats)> {
    let kind = if opts.width == 1 {
        WindowKind::Chain
    } else {
        WindowKind::Tree
    };
    run_windows(model, first, stop_ids, opts, on_tokens, kind)
}

/// How a window is drafted and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowKind {
    Chain,
    Tree,
}

/// What one verification decided: the accepted drafts and the full model's next token.
pub(crate) struct Verdict {
    pub accepted: Vec<u32>,
    pub next: u32,
}

/// The corrector loop, shared by the chain and the tree: window after window until the
/// budget, a stop id at a verification boundary, a full cache or `on_tokens` says stop.
pub(crate) fn run_windows(
    model: &mut dyn SiriusModel,
    first: u32,
    stop_ids: &[u32],
    opts: &CorrectorOptions,
    on_tokens: &mut dyn FnMut(&[u32]) -> ControlFlow<usize>,
    kind: WindowKind,
) -> Result<(Vec<u32>, CorrectionStats)> {
    opts.validate()?;
    let mut out = Vec::new();
    let mut stats = CorrectionStats::default();
    let mut x0 = first;
    loop {
        if stop_ids.contains(&x0) || out.len() >= opts.max_tokens {
            break;
        }
        out.push(x0);
        if let ControlFlow::Break(n) = on_tokens(&[x0]) {
            out.truncate(out.len() - 1 + n.min(1));
            break;
        }
        if out.len() >= opts.max_tokens || model.cache_room() == 0 {
            break;
        }
        // K - 1 drafts after x0, fewer near the cache end or the token budget.
        let budget = opts.max_tokens - out.len();
        let room = model.cache_room();
        let fits = match kind {
            WindowKind::Chain => room,
            // A tree of K - 1 levels of W nodes under x0.
            WindowKind::Tree => (room - 1) / opts.width + 1,
        };
        let k = opts.period.min(fits).min(budget + 1).max(1);
        let verdict = match kind {
            WindowKind::Chain => chain_window(model, x0, k, opts, &mut stats)?,
            WindowKind::Tree => {
                crate::sirius::tree::tree_window(model, x0, k, opts, stop_ids, &mut stats)?
            }
        };
        let mut stopped = false;
        let before = out.len();
        for &d in &verdict.accepted {
            if stop_ids.contains(&d) || out.len() >= opts.max_tokens {
                stopped = true;
                break;
            }
            out.push(d);
        }
        if let ControlFlow::Break(n) = on_tokens(&out[before..]) {
            out.truncate(before + n.min(out.len() - before));
            break;
        }
        if stopped {
            break;
        }
        x0 = verdict.next;
    }
    Ok((out, stats))
}

/// One chain window: K - 1 greedy drafts after x0 (already produced, not yet in the cache),
/// one full pass over the K tokens that rewrites their K/V, acceptance, rollback.
fn chain_window(
    model: &mut dyn SiriusModel,
    x0: u32,
    k: usize,
    opts: &CorrectorOptions,
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
    opts: &CorrectorOptions,
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
