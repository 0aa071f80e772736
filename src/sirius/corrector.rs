//! The corrector's window, written against a narrow model interface ([`SiriusModel`]) so it
//! can be tested with a scripted fake and reused by every backend and runtime: draft K - 1
//! tokens after x0 with the sparse model (a chain, or a tree of W beams), verify them in one
//! full pass that rewrites their K/V, accept the likely prefix, roll back the rest, and hand
//! back the accepted drafts and the full model's next token. The request loop around it
//! (budgets, stop ids, text) is the engine's, shared with plain generation.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::sirius::adaptive::{PeriodPlanner, WindowOutcome};
use crate::sirius::config::SiriusConfig;
use crate::sirius::stats::CorrectionStats;
use crate::sirius::window::{SiriusModel, Verdict};

/// How a window is drafted and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Chain,
    Tree,
}

/// Runs correction windows over a [`SiriusModel`] and keeps their statistics.
pub struct Corrector {
    config: SiriusConfig,
    kind: WindowKind,
    /// Ids the tree never drafts (with W > 1, EOS would end a beam's text).
    stop_ids: Vec<u32>,
    /// Chooses each window's K with `--period auto`.
    planner: Option<PeriodPlanner>,
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
            planner: config.adaptive.then(|| PeriodPlanner::new(config.period)),
            stats: CorrectionStats::default(),
        })
    }

    /// Tree windows whatever the width (with width 1 the tree is a chain and must give
    /// exactly the chain's output; tests hold it to that).
    pub fn with_tree_windows(mut self) -> Self {
        self.kind = WindowKind::Tree;
        self
    }

    /// The ids that end a request (at a verification boundary).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn config(&self) -> &SiriusConfig {
        &self.config
    }

    /// With `--period auto`: predicted seconds of a window per length (see
    /// [`PeriodPlanner::prime`]); nothing for a fixed K.
    pub fn prime_windows(&mut self, predicted: &[(usize, f64)]) {
        if let Some(planner) = self.planner.as_mut() {
            planner.prime(predicted);
        }
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
        let wanted = match &mut self.planner {
            Some(planner) => planner.next_period(),
            None => self.config.period,
        };
        let k = wanted.min(fits).min(budget + 1).max(1);
        let (drafting, verifying) = (self.stats.draft_seconds, self.stats.verify_seconds);
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
        self.stats.window_tokens += k;
        if let Some(planner) = &mut self.planner {
            let outcome = WindowOutcome {
                period: k,
                accepted: verdict.accepted.len(),
                draft_seconds: self.stats.draft_seconds - drafting,
                verify_seconds: self.stats.verify_seconds - verifying,
            };
            planner.observe(&outcome);
            tracing::debug!(
                ?outcome,
                acceptance = planner.acceptance(),
                best = planner.best_period(),
                "adaptive window"
            );
        }
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
        // A greedy draft needs only the argmax (picked where the logits are).
        let next = model.draft_argmax(*window.last().unwrap_or(&x0))?;
        window.push(next);
    }
    stats.draft_seconds += t.elapsed().as_secs_f64();
    stats.drafted += k - 1;
    // Verify: the full model rewrites the window's K/V entries.
    model.truncate(start)?;
    let t = Instant::now();
    let (n, next) = verify_chain(model, &window, opts)?;
    stats.verify_seconds += t.elapsed().as_secs_f64();
    stats.verifications += 1;
    // Keep x0, d1..dn; the full model's token after them starts the next window.
    model.truncate(start + n + 1)?;
    stats.rollback_tokens += k - 1 - n;
    stats.advanced += n + 1;
    Ok(Verdict {
        accepted: window[1..=n].to_vec(),
        next,
    })
}

/// The full pass over a chain window: how many drafts it accepts and its token after them.
/// Without drafts (K = 1) that token is all it decides, so only the argmax is asked for;
/// acceptance needs each row's argmax and the probability of the draft after it (the
/// model computes both where its logits are: a GPU sends back a few numbers per row).
fn verify_chain(
    model: &mut dyn SiriusModel,
    window: &[u32],
    opts: &SiriusConfig,
) -> Result<(usize, u32)> {
    if window.len() == 1 {
        let ids = model.verify_argmax(window)?;
        if ids.len() != 1 {
            return Err(Error::InvalidArgument(format!(
                "verify returned {} rows for 1 token",
                ids.len()
            )));
        }
        return Ok((0, ids[0]));
    }
    let verdicts = model.verify_verdicts(window, opts.accept_temperature)?;
    if verdicts.len() != window.len() {
        return Err(Error::InvalidArgument(format!(
            "verify returned {} rows for {} tokens",
            verdicts.len(),
            window.len()
        )));
    }
    let threshold = opts.threshold as f64;
    // Row i judges draft i + 1 (path[0] is x0), as `accepted_prefix` does over logits.
    let n = verdicts
        .iter()
        .take_while(|v| v.probability.is_some_and(|p| p >= threshold))
        .count();
    Ok((n, verdicts[n].argmax))
}
