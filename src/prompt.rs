//! Prompt assembly as `Blip2Processor` + `generate()` build it, for both checkpoint layouts, and
//! detokenisation as `batch_decode(skip_special_tokens=True)` does it.
//!
//! Newer layout (`image_token_index` set): the processor tokenises the prompt (OPT's tokenizer
//! prepends BOS `</s>`, T5's appends `</s>`) and prepends Q `<image>` ids that the model then
//! overwrites with the projected queries. Legacy layout: the prompt ids alone, with the query
//! embeddings concatenated in front by the model. Either way the language model sees
//! `[queries][text]`, so the engine works on the text ids and the query count.

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::model::config::Blip2Config;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(
        "the prompt may not contain the image token (id {0}); the image is added by the server"
    )]
    ImageTokenInPrompt(u32),
}

#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    clean_up_tokenization_spaces: Option<bool>,
}

/// One request's prompt, tokenised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The ids the language model sees after the query embeddings (BOS / EOS included as the
    /// tokenizer adds them).
    pub text_ids: Vec<u32>,
}

#[derive(Clone)]
pub struct PromptBuilder {
    tokenizer: Tokenizer,
    image_token_index: Option<u32>,
    num_query_tokens: usize,
    bos_token_id: Option<u32>,
    clean_up_spaces: bool,
}

impl PromptBuilder {
    pub fn new(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        config: &Blip2Config,
    ) -> Result<Self, PromptError> {
        let mut tokenizer = Tokenizer::from_file(tokenizer_json)
            .map_err(|e| PromptError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        // transformers calls the tokenizer without truncation or padding unless asked.
        tokenizer
            .with_truncation(None)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        let tc: TokenizerConfig = match tokenizer_config {
            Some(p) => std::fs::read_to_string(p)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default(),
            None => TokenizerConfig::default(),
        };
        Ok(Self {
            tokenizer,
            image_token_index: config.image_token_index,
            num_query_tokens: config.num_query_tokens,
            bos_token_id: config.text.bos_token_id(),
            clean_up_spaces: tc.clean_up_tokenization_spaces.unwrap_or(false),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenises `prompt`; `None` is the reference's no-prompt start, `[text_config.bos_token_id]`
    /// (a T5 config without one falls back to the tokenisation of "", i.e. `</s>`, where the
    /// reference itself would fail).
    pub fn build(&self, prompt: Option<&str>) -> Result<Prompt, PromptError> {
        let text_ids = match (prompt, self.bos_token_id) {
            (None, Some(bos)) => vec![bos],
            (prompt, _) => self
                .tokenizer
                .encode(prompt.unwrap_or(""), true)
                .map_err(|e| PromptError::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec(),
        };
        if let Some(img) = self.image_token_index.filter(|id| text_ids.contains(id)) {
            return Err(PromptError::ImageTokenInPrompt(img));
        }
        Ok(Prompt { text_ids })
    }

    /// The full `input_ids` the reference's processor produces for this prompt (image ids first
    /// in the newer layout); used to check our assembly against it.
    pub fn reference_input_ids(&self, prompt: &Prompt) -> Vec<u32> {
        match self.image_token_index {
            Some(img) => std::iter::repeat_n(img, self.num_query_tokens)
                .chain(prompt.text_ids.iter().copied())
                .collect(),
            None => prompt.text_ids.clone(),
        }
    }

    /// `decode(ids, skip_special_tokens=True)`, with transformers' space clean-up when the
    /// tokenizer config asks for it.
    pub fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        let text = self
            .tokenizer
            .decode(ids, true)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }
}

/// transformers' `clean_up_tokenization`.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
