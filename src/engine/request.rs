//! The parts of a request that plain and Sirius generation share: checking the prompt against
//! the context, the chunked dense prefill, and turning generated ids into streamed text with
//! stop strings.

use crate::backend::Backend;
use crate::engine::generate::{effective_context, GenerateOptions, StopReason};
use crate::engine::stop::StopMatcher;
use crate::error::{Error, Result};
use crate::model::{KvCache, Llama, Logits, Scratch, TextStream, Tokenizer};
use crate::progress::progress_bar;
use crate::sparsity::SparseRequest;

/// Checks the prompt and returns the KV cache rows the request needs: the prompt plus
/// `max_tokens - 1` (the last generated token is never fed back), capped by the context.
pub(crate) fn cache_capacity<B: Backend>(
    model: &Llama<B>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
) -> Result<usize> {
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt is empty after tokenization".into(),
        ));
    }
    let context = effective_context(model, opts.context);
    // The prompt may fill the context: its last logits still give one token.
    if prompt_ids.len() > context {
        return Err(Error::PromptTooLong {
            prompt_tokens: prompt_ids.len(),
            context,
        });
    }
    Ok(context.min(
        prompt_ids
            .len()
            .saturating_add(opts.max_tokens.saturating_sub(1)),
    ))
}

/// Runs the prompt through the dense model in chunks of `chunk` tokens (Griffin scores its
/// neurons here) and returns the last token's logits. Long prompts show a progress bar.
pub(crate) fn prefill<B: Backend>(
    model: &Llama<B>,
    request: &mut SparseRequest<'_, B>,
    cache: &mut KvCache<B>,
    prompt_ids: &[u32],
    chunk: usize,
    show_progress: bool,
) -> Result<Vec<f32>> {
    let chunk = chunk.max(1).min(prompt_ids.len().max(1));
    let mut scratch = Scratch::with_logit_rows(model, chunk, 1)?;
    prefill_chunks(prompt_ids, chunk, show_progress, &mut |piece, want| {
        model.forward_with(piece, cache, &mut scratch, want, &mut request.prefill_ffn())
    })
}

/// One prefill chunk: tokens and which logits to return.
pub(crate) type PrefillStep<'a> = dyn FnMut(&[u32], Logits) -> Result<Vec<f32>> + 'a;

/// Feeds the prompt to `step` in chunks of `chunk` tokens, asking logits of the last one
/// only, with a progress bar for long prompts; returns the last chunk's logits.
pub(crate) fn prefill_chunks(
    prompt_ids: &[u32],
    chunk: usize,
    show_progress: bool,
    step: &mut PrefillStep<'_>,
) -> Result<Vec<f32>> {
    let chunks: Vec<&[u32]> = prompt_ids.chunks(chunk.max(1)).collect();
    // indicatif hides the bar when stderr is not a terminal.
    let bar = (show_progress && chunks.len() > 1)
        .then(|| progress_bar(prompt_ids.len() as u64, "prefill"));
    let mut logits = Vec::new();
    for (i, piece) in chunks.iter().enumerate() {
        // Every chunk but the last needs no logits.
        let want = if i + 1 == chunks.len() {
            Logits::Last
        } else {
            Logits::None
        };
        logits = step(piece, want)?;
        if let Some(bar) = &bar {
            bar.inc(piece.len() as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(logits)
}

/// Generated ids to streamed text: a windowed detokenizer, stop strings (partial matches
/// held back) and the consumer's callback, which returns false to stop.
pub(crate) struct TextOutput<'a> {
    stream: TextStream<'a>,
    stops: StopMatcher,
    on_text: &'a mut dyn FnMut(&str) -> bool,
    pub text: String,
}

impl<'a> TextOutput<'a> {
    pub fn new(
        tokenizer: &'a Tokenizer,
        prompt_ids: &[u32],
        stop_strings: &[String],
        on_text: &'a mut dyn FnMut(&str) -> bool,
    ) -> Self {
        // A few prompt tokens give the detokenizer the context it needs for the first word's
        // leading space (SentencePiece-style decoders drop it at the start of a sequence).
        TextOutput {
            stream: TextStream::with_context(
                tokenizer,
                &prompt_ids[prompt_ids.len().saturating_sub(4)..],
            ),
            stops: StopMatcher::new(stop_strings.to_vec()),
            on_text,
            text: String::new(),
        }
    }

    /// Adds one generated id; `Some(reason)` when generation must stop here.
    pub fn push(&mut self, id: u32) -> Result<Option<StopReason>> {
        let Some(piece) = self.stream.push(id)? else {
            return Ok(None);
        };
        let check = self.stops.feed(&piece);
        let listening = self.emit(&check.emit);
        Ok(if check.stopped {
            Some(StopReason::StopString)
        } else if !listening {
            Some(StopReason::Cancelled)
        } else {
            None
        })
    }

    /// Emits what is still held back, unless generation ended on a stop string or a
    /// consumer that stopped listening.
    pub fn finish(&mut self, reason: StopReason) -> Result<()> {
        if matches!(reason, StopReason::StopString | StopReason::Cancelled) {
            return Ok(());
        }
        if let Some(rest) = self.stream.finish()? {
            let check = self.stops.feed(&rest);
            self.emit(&check.emit);
        }
        let rest = self.stops.flush();
        self.emit(&rest);
        Ok(())
    }

    /// Returns false when the consumer wants no more text.
    fn emit(&mut self, piece: &str) -> bool {
        if piece.is_empty() {
            return true;
        }
        self.text.push_str(piece);
        (self.on_text)(piece)
    }
}

/// Tokens per second (0 for no time).
pub(crate) fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}
