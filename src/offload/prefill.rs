//! How many prompt tokens one prefill pass takes in an offloaded run.
//!
//! Every prefill pass streams every weight that is not resident (no neurons are chosen yet,
//! so each layer's whole FFN crosses the link), so a prompt in `n` chunks streams the model
//! `n` times. A longer chunk costs only activations (and, on a GPU, the backend's GEMM
//! scratch, which follows the rows of a pass). Those bytes come first from what the
//! placement leaves unused, then, where it pays, from the resident FFN complements (read
//! only at verification, once per window): the chunk is the one whose request streams the
//! fewest bytes in all, its prefill passes plus the decode's windows until the cache is
//! full. Attention and the sparse set never pay for it: they are what every drafted token
//! reads, and the keep is the request's. In bytes, not seconds, so that the choice does not
//! depend on the link and compute speeds `plan` and `run` may assume differently.
//!
//! Pure: the caller says what a request prefilled in chunks of `c` books
//! (`input_for(c)`), this module says which `c`.

use crate::error::{Error, Result};
use crate::offload::placement::placed_units;
use crate::offload::sizes::{LayerPlacement, PlanInput, Sizes};

/// Prompt tokens per prefill pass unless a request says otherwise (bounds scratch memory;
/// long enough that the weights are read once per chunk, not per token). An offloaded
/// request takes longer chunks where its budget has bytes to spare, never shorter ones.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// Chunks grow in steps of this many tokens (whole GEMM tiles; a few sizes, so that a
/// runtime planned for one prompt often holds the next).
pub const PREFILL_CHUNK_STEP: usize = 64;

/// What a request prefilled in chunks of the given length books: its planner input.
pub type InputFor<'a> = dyn FnMut(usize) -> Result<PlanInput> + 'a;

/// Prompt tokens per prefill pass, as a request asks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillChunk {
    /// This many in memory; offloaded, at least this many, longer where the budget pays
    /// for it ([`prefill_chunk`]).
    Grow(usize),
    /// Exactly this many (the last pass may be shorter), offloaded or not.
    Fixed(usize),
}

impl PrefillChunk {
    /// The tokens asked for: a fixed chunk, or the shortest a growing one takes.
    pub fn tokens(self) -> usize {
        match self {
            PrefillChunk::Grow(n) | PrefillChunk::Fixed(n) => n,
        }
    }
}

/// The prefill chunk for a prompt of `prompt_tokens`. A fixed one is taken as asked, or
/// refused naming `--prefill-chunk` and the longest that fits where the budget cannot hold
/// its activations (with a warning where it pushes attention or the sparse set out of the
/// budget that a default chunk keeps). A growing one from `base`: of the
/// chunks that keep the placement's attention and sparse set (each the shortest of its
/// number of passes: a multiple of [`PREFILL_CHUNK_STEP`], or the whole prompt, never below
/// `base`), the one whose request streams the fewest bytes ([`request_bytes`]); the shorter
/// on a tie. Where the budget does not hold the request at `base`, `base`: the planner then
/// says why.
pub fn prefill_chunk(
    asked: PrefillChunk,
    prompt_tokens: usize,
    input_for: &mut InputFor<'_>,
) -> Result<usize> {
    let prompt = prompt_tokens.max(1);
    let base = match asked {
        PrefillChunk::Fixed(n) => return fixed_chunk(n, prompt, input_for),
        PrefillChunk::Grow(n) => n.clamp(1, prompt),
    };
    let first = input_for(base)?;
    let sizes = Sizes::new(&first);
    let Some(placed) = placed_units(&sizes, first.budget) else {
        return Ok(base);
    };
    // Units past attention and the sparse set are complements: only those may go.
    let floor = placed.min(2 * sizes.layers);
    let mut best = (request_bytes(&first, &sizes, placed, base), base);
    // Fewer passes, longer chunks: once one no longer holds the floor, none longer does.
    for passes in (1..prefill_passes(prompt, base)).rev() {
        let chunk = chunk_of_passes(base, prompt, passes);
        let input = input_for(chunk)?;
        let sizes = Sizes::new(&input);
        let Some(placed) = placed_units(&sizes, input.budget).filter(|&m| m >= floor) else {
            break;
        };
        let bytes = request_bytes(&input, &sizes, placed, chunk);
        if bytes < best.0 {
            best = (bytes, chunk);
        }
    }
    Ok(best.1)
}

/// `--prefill-chunk n` for a prompt of `prompt` tokens (see [`prefill_chunk`]).
fn fixed_chunk(n: usize, prompt: usize, input_for: &mut InputFor<'_>) -> Result<usize> {
    let chunk = n.clamp(1, prompt);
    let layers = Sizes::new(&input_for(chunk)?).layers;
    let mut placed = |c: usize| -> Result<Option<usize>> {
        let input = input_for(c)?;
        Ok(placed_units(&Sizes::new(&input), input.budget))
    };
    let Some(at_chunk) = placed(chunk)? else {
        // The longest that fits (more tokens, more activations: one search); where not even
        // one token does, the planner's own error says what the budget lacks.
        let (mut lo, mut hi) = (0, chunk);
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            match placed(mid)? {
                Some(_) => lo = mid,
                None => hi = mid,
            }
        }
        if lo == 0 {
            return Ok(chunk);
        }
        return Err(Error::InvalidArgument(format!(
            "--prefill-chunk {n}: the activations of a {chunk}-token pass do not fit in the \
             budget beside what must stay resident; at most {lo} tokens per pass fit (or give \
             auto)"
        )));
    };
    let reference = chunk.min(DEFAULT_PREFILL_CHUNK);
    if let Some(kept) = placed(reference)? {
        if at_chunk < kept.min(2 * layers) {
            tracing::warn!(
                "--prefill-chunk {n} takes resident bytes from attention or the sparse FFN \
                 (a {reference}-token pass keeps them): every decoded token streams more; auto \
                 picks the chunk the budget pays for"
            );
        }
    }
    Ok(chunk)
}

/// The shortest chunk that prefills `prompt` tokens in `passes` passes or fewer, a multiple
/// of the step (or the prompt), at least `base`.
fn chunk_of_passes(base: usize, prompt: usize, passes: usize) -> usize {
    (prompt.div_ceil(passes.max(1)))
        .next_multiple_of(PREFILL_CHUNK_STEP)
        .clamp(base, prompt)
}

/// Bytes a request of `input` with the first `placed` units resident streams: its prefill
/// in chunks of `chunk`, then one window per `period` tokens (K - 1 drafts, one
/// verification) until its cache is full. Windows that accept fewer than K tokens, or an
/// early stop, change both sides alike.
pub fn request_bytes(input: &PlanInput, sizes: &Sizes, placed: usize, chunk: usize) -> u64 {
    let layers = sizes.layers_with(placed);
    let sum = |bytes: fn(&Sizes, &LayerPlacement) -> u64| -> u64 {
        layers.iter().map(|p| bytes(sizes, p)).sum()
    };
    let period = input.period.max(1) as u64;
    let decoded = input.context.saturating_sub(input.prompt_tokens) as u64;
    let window = sum(Sizes::verify_stream_bytes)
        .saturating_add((period - 1).saturating_mul(sum(Sizes::draft_stream_bytes)));
    let prefill = prefill_passes(input.prompt_tokens, chunk) as u64;
    prefill
        .saturating_mul(sum(Sizes::prefill_stream_bytes))
        .saturating_add(decoded.div_ceil(period).saturating_mul(window))
}

/// Prefill passes a prompt of `prompt_tokens` takes in chunks of `chunk`.
pub fn prefill_passes(prompt_tokens: usize, chunk: usize) -> usize {
    prompt_tokens.max(1).div_ceil(chunk.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_of_passes_takes_its_shortest_chunk() {
        // 1000 tokens in two passes: 500 each, rounded up to 512.
        assert_eq!(chunk_of_passes(256, 1000, 2), 512);
        // The whole prompt in one pass is the prompt, not a step multiple above it.
        assert_eq!(chunk_of_passes(256, 1000, 1), 1000);
        // Two passes of 150 would go below the floor.
        assert_eq!(chunk_of_passes(256, 300, 2), 256);
        // A floor off the step: the prompt in one pass.
        assert_eq!(chunk_of_passes(16, 20, 1), 20);
        for (prompt, passes) in [(1000, 2), (5000, 4), (4097, 2), (700, 3), (4096, 16)] {
            let chunk = chunk_of_passes(256, prompt, passes);
            assert!(prefill_passes(prompt, chunk) <= passes, "{prompt} {passes}");
            assert!(chunk.is_multiple_of(PREFILL_CHUNK_STEP) || chunk == prompt);
        }
        assert_eq!(prefill_passes(1000, 256), 4);
        assert_eq!(prefill_passes(1024, 256), 4);
        assert_eq!(prefill_passes(0, 256), 1);
    }
}
