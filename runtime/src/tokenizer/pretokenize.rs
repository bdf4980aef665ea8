//! Choice of the pre-tokenizer (how text is cut into words before BPE) from the GGUF key
//! `tokenizer.ggml.pre`, and its construction with the `tokenizers` crate.

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

/// The Llama-3 split regex: contractions, letter runs with one leading non-letter, numbers
/// in groups of at most three digits, punctuation runs, newlines, other whitespace.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 split regex: the Llama-3 one with single digits.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizers this runtime implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PreTokenizerKind {
    /// The plain GPT-2 byte-level regex (`default`, `gpt2`).
    Gpt2,
    /// Every digit on its own, then the GPT-2 regex (`smollm`, `starcoder`, `refact`, ...).
    SmolLm,
    /// The Llama-3 regex, numbers in groups of up to three digits (`llama-bpe`, `llama3`).
    Llama3,
    /// The Llama-3 regex with single digits (`qwen2`).
    Qwen2,
    /// No pre-tokenizer: SentencePiece vocabularies merge each run of text between special
    /// tokens whole. Never chosen by name.
    NoSplit,
}

impl PreTokenizerKind {
    /// The kind for a `tokenizer.ggml.pre` value, or `None` if this runtime does not know it.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" | "gpt2" | "gpt-2" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone"
            | "minerva" => Self::SmolLm,
            "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            _ => return None,
        })
    }

    /// The kind for an optional `tokenizer.ggml.pre` value: an absent or unknown value falls
    /// back to [`PreTokenizerKind::Gpt2`] with a warning (as llama.cpp does).
    pub fn select(name: Option<&str>) -> Self {
        match name {
            None => {
                tracing::warn!("GGUF has no tokenizer.ggml.pre; using the default GPT-2 pre-tokenizer");
                Self::Gpt2
            }
            Some(n) => Self::from_gguf_name(n).unwrap_or_else(|| {
                tracing::warn!(
                    pre = n,
                    "unknown tokenizer.ggml.pre; using the default GPT-2 pre-tokenizer, tokenization may differ from the model's"
                );
                Self::Gpt2
            }),
        }
    }

    /// Whether a word found whole in the vocabulary is taken as one token without applying
    /// merges (Llama-3's tokenizer does this).
    pub fn ignore_merges(self) -> bool {
        matches!(self, Self::Llama3)
    }

    /// The `tokenizers` pre-tokenizer for this kind.
    pub fn build(self) -> Result<PreTokenizerWrapper, String> {
        // ByteLevel(add_prefix_space=false, trim_offsets=false, use_regex) maps bytes to
        // the byte-level alphabet (and, with use_regex, splits with the GPT-2 regex first).
        let byte_level = |use_regex: bool| -> PreTokenizerWrapper {
            ByteLevel::new(false, false, use_regex).into()
        };
        let split = |re: &str| -> Result<PreTokenizerWrapper, String> {
            Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| format!("bad pre-tokenizer regex: {e}"))
        };
        Ok(match self {
            Self::Gpt2 => byte_level(true),
            Self::SmolLm => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            Self::Llama3 => Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]).into(),
            Self::Qwen2 => Sequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]).into(),
            Self::NoSplit => Sequence::new(Vec::new()).into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            PreTokenizerKind::from_gguf_name("smollm"),
            Some(PreTokenizerKind::SmolLm)
        );
        assert_eq!(
            PreTokenizerKind::from_gguf_name("llama-bpe"),
            Some(PreTokenizerKind::Llama3)
        );
        assert_eq!(
            PreTokenizerKind::from_gguf_name("qwen2"),
            Some(PreTokenizerKind::Qwen2)
        );
        assert_eq!(
            PreTokenizerKind::from_gguf_name("default"),
            Some(PreTokenizerKind::Gpt2)
        );
        assert_eq!(PreTokenizerKind::from_gguf_name("nonsense"), None);
        assert_eq!(
            PreTokenizerKind::select(Some("nonsense")),
            PreTokenizerKind::Gpt2
        );
        assert_eq!(PreTokenizerKind::select(None), PreTokenizerKind::Gpt2);
    }

    #[test]
    fn all_build() {
        for k in [
            PreTokenizerKind::Gpt2,
            PreTokenizerKind::SmolLm,
            PreTokenizerKind::Llama3,
            PreTokenizerKind::Qwen2,
            PreTokenizerKind::NoSplit,
        ] {
            k.build().unwrap();
        }
    }
}
