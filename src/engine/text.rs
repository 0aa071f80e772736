//! Generated ids to streamed text: a windowed detokenizer, stop strings (partial matches
//! held back until they are known not to be one) and the consumer's callback, which returns
//! false to stop.

use crate::engine::output::StopReason;
use crate::engine::stop::StopMatcher;
use crate::error::Result;
use crate::model::{TextStream, Tokenizer};

/// A request's text as it streams out.
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
