//! What a correction window works with: the narrow model interface ([`SiriusModel`]), the
//! acceptance rule, and what a verification decides.

use crate::error::{Error, Result};
use crate::model::sampler::{argmax, RowVerdict};
use crate::model::DeviceCounts;
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

    /// Launches and allocations of the model's backend so far, where it counts them (a GPU).
    fn device_counts(&self) -> Option<DeviceCounts> {
        None
    }

    // ---- Greedy picks: where a decision needs only the argmax, a model may pick it where
    // its logits are (on a GPU) instead of reading them back. Each must equal `argmax` of
    // the logits the call above would return. ----

    /// As [`SiriusModel::draft`], returning the argmax of the logits.
    fn draft_argmax(&mut self, token: u32) -> Result<u32> {
        Ok(argmax(&self.draft(token)?))
    }
    /// As [`SiriusModel::verify`], returning the argmax of each row.
    fn verify_argmax(&mut self, tokens: &[u32]) -> Result<Vec<u32>> {
        Ok(self.verify(tokens)?.iter().map(|z| argmax(z)).collect())
    }
    /// As [`SiriusModel::verify`], returning what a chain's acceptance test reads of each
    /// row: its argmax, and under row `i < tokens.len() - 1` the probability of
    /// `tokens[i + 1]` at `temperature`.
    fn verify_verdicts(&mut self, tokens: &[u32], temperature: f32) -> Result<Vec<RowVerdict>> {
        let z = self.verify(tokens)?;
        check_rows(&z, tokens.len())?;
        Ok(z.iter()
            .enumerate()
            .map(|(i, row)| RowVerdict {
                argmax: argmax(row),
                probability: tokens
                    .get(i + 1)
                    .map(|&t| token_probability(row, temperature, t)),
            })
            .collect())
    }

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

/// A model borrowed for a run of windows ([`correct`](crate::engine::sirius::correct)
/// drives a `&mut dyn SiriusModel`).
impl<M: SiriusModel + ?Sized> SiriusModel for &mut M {
    fn cache_len(&self) -> usize {
        (**self).cache_len()
    }
    fn cache_room(&self) -> usize {
        (**self).cache_room()
    }
    fn truncate(&mut self, len: usize) -> Result<()> {
        (**self).truncate(len)
    }
    fn draft(&mut self, token: u32) -> Result<Vec<f32>> {
        (**self).draft(token)
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        (**self).verify(tokens)
    }
    fn device_counts(&self) -> Option<DeviceCounts> {
        (**self).device_counts()
    }
    fn draft_argmax(&mut self, token: u32) -> Result<u32> {
        (**self).draft_argmax(token)
    }
    fn verify_argmax(&mut self, tokens: &[u32]) -> Result<Vec<u32>> {
        (**self).verify_argmax(tokens)
    }
    fn verify_verdicts(&mut self, tokens: &[u32], temperature: f32) -> Result<Vec<RowVerdict>> {
        (**self).verify_verdicts(tokens, temperature)
    }
    fn draft_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        (**self).draft_tree(tokens, mask)
    }
    fn verify_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        (**self).verify_tree(tokens, mask)
    }
    fn keep_rows(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        (**self).keep_rows(start, rows)
    }
}

fn no_trees() -> Error {
    Error::InvalidArgument("this model has no tree drafting: use --width 1".into())
}

/// What one verification decided: the accepted drafts and the full model's next token.
pub(crate) struct Verdict {
    pub accepted: Vec<u32>,
    pub next: u32,
}

/// `softmax(z / t)[token]`, computed stably in f64 (the backends' rule, see
/// `backend::argmax`).
pub use crate::model::sampler::token_probability;

pub(crate) fn check_rows(z: &[Vec<f32>], tokens: usize) -> Result<()> {
    if z.len() != tokens {
        return Err(Error::InvalidArgument(format!(
            "verify returned {} rows for {tokens} tokens",
            z.len()
        )));
    }
    Ok(())
}
