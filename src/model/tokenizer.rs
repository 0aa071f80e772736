//! Tokenizer (HF tokenizer.json through the `tokenizers` crate) and streaming detokenization.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What [`Tokenizer::from_json`] parses itself before the tokenizers crate sees the text:
/// the parts that crate panics on instead of returning an error.
#[derive(serde::Deserialize)]
struct TokenizerFile {
    #[serde(rename = "decoder")]
    _decoder: Option<serde_json::Value>,
    model: Option<TokenizerModel>,
}

#[derive(serde::Deserialize)]
struct TokenizerModel {
    continuing_subword_prefix: Option<String>,
    merges: Option<serde_json::Value>,
}

/// A BPE merge's second token is cut after the `continuing_subword_prefix` (panicking when
/// it is shorter or the cut splits a character), so each must start with the prefix.
fn check_merges(model: &TokenizerModel) -> std::result::Result<(), String> {
    let Some(prefix) = model
        .continuing_subword_prefix
        .as_deref()
        .filter(|p| !p.is_empty())
    else {
        return Ok(());
    };
    let merges = model.merges.as_ref().and_then(|m| m.as_array());
    for merge in merges.into_iter().flatten() {
        let second = match merge {
            serde_json::Value::String(s) => s.split_once(' ').map(|(_, b)| b),
            serde_json::Value::Array(pair) => pair.get(1).and_then(|b| b.as_str()),
            _ => None,
        };
        if let Some(b) = second.filter(|b| !b.starts_with(prefix)) {
            return Err(format!(
                "merge {merge} joins `{b}`, which does not start with the continuing_subword_prefix `{prefix}`"
            ));
        }
    }
    Ok(())
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                msg: "file not found".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// A tokenizer from `tokenizer.json` text (`path` names its source in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Tokenizer> {
        // The tokenizers crate panics (`expect("Helper")`) when the `decoder` object does not
        // parse as JSON (cut short, a number out of range): the whole text's syntax and the
        // decoder's values are checked here first.
        let pre: TokenizerFile = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let fail = |msg: String| Error::tokenizer(path, msg);
        pre.model
            .as_ref()
            .map_or(Ok(()), check_merges)
            .map_err(fail)?;
        // Any other panic of the tokenizers crate on a malformed file is an error too.
        let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| fail("the tokenizers library failed on this file (it panicked): the file is malformed".into()))?;
        let inner = parsed.map_err(|e| fail(e.to_string()))?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Encodes raw text. Special tokens written in the text (`<|im_start|>`) are recognised;
    /// `add_special` applies the tokenizer's post-processor (e.g. a BOS token), which chat
    /// prompts must not get twice since the template already writes it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.err(e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::tokenizer(&self.path, e.to_string())
    }
}

/// Turns a stream of token ids into text deltas that are always whole UTF-8 characters, even
/// when a character is split over several byte-level BPE tokens.
///
/// It decodes a short window of recent tokens twice (without and with the new ones) and emits
/// the difference, so decoders that treat the first token specially (leading spaces) stay
/// consistent, and it holds text back while it ends in an incomplete character.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self::with_context(tokenizer, &[])
    }

    /// A stream whose text starts after `context` (e.g. the prompt's last few tokens), which
    /// is decoded for spacing but never emitted.
    pub fn with_context(tokenizer: &'a Tokenizer, context: &[u32]) -> Self {
        TextStream {
            tokenizer,
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// The decoded window without and with the tokens not yet emitted: their difference is
    /// the new text (decoding a window keeps the spaces and byte sequences that depend on
    /// earlier tokens right).
    fn window_text(&self) -> Result<(String, String)> {
        let window = &self.ids[self.prefix_offset..];
        let before = self
            .tokenizer
            .decode(&window[..self.read_offset - self.prefix_offset], true)?;
        let after = self.tokenizer.decode(window, true)?;
        Ok((before, after))
    }

    /// Adds a token; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (before, after) = self.window_text()?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            if let Some(delta) = after.get(before.len()..) {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(Some(delta));
            }
        }
        if after == before {
            // The token decodes to nothing (e.g. a special token): move past it so the
            // decoded window does not grow without bound.
            self.read_offset = self.ids.len();
        }
        Ok(None)
    }

    /// Text held back at the end of the stream (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let (before, after) = self.window_text()?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(after
            .get(before.len()..)
            .filter(|d| !d.is_empty())
            .map(str::to_string))
    }
}
