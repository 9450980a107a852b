//! Incremental detokenisation for streaming: yields the text each new token adds, holding back
//! while the tail is an incomplete UTF-8 character (byte-level BPE splits characters across
//! tokens; decoding them alone gives U+FFFD). Decoding a window that starts a few tokens back
//! keeps tokenizers' space handling (leading-space stripping, Metaspace) correct.

use crate::prompt::{PromptBuilder, PromptError};

#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, token: u32, tok: &PromptBuilder) -> Result<Option<String>, PromptError> {
        self.tokens.push(token);
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.tokens[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(piece) = full.get(prefix.len()..) {
                let piece = piece.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.tokens.len();
                return Ok(Some(piece));
            }
        }
        Ok(None)
    }

    /// Whatever text is still held back (an incomplete character at the end).
    pub fn flush(&mut self, tok: &PromptBuilder) -> Result<Option<String>, PromptError> {
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(full
            .get(prefix.len()..)
            .filter(|p| !p.is_empty())
            .map(str::to_string))
    }
}
