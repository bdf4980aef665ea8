//! SentencePiece vocabularies (`tokenizer.ggml.model` = "llama": Llama 1/2, Gemma, ...),
//! encoded as llama.cpp's `llm_tokenizer_spm` does, with the `tokenizers` crate.
//!
//! llama.cpp first cuts the text at special tokens (user-defined ones always, control and
//! unknown ones only when special tokens are parsed); in each remaining text fragment every
//! space becomes "▁" (U+2581), with one more "▁" in front when the vocabulary asks for a
//! space prefix and the fragment starts the text or follows a special token. The fragment is
//! split into characters, and adjacent symbols whose concatenation is a vocabulary entry
//! are merged, the highest-scoring entry first. A character outside the vocabulary becomes
//! its UTF-8 bytes as `<0xNN>` tokens.
//!
//! Here the same steps are done with the `tokenizers` crate:
//!
//! * the cut at special tokens with two [`AddedVocabulary`] matchers (all special tokens, or
//!   the user-defined ones only), which find tokens leftmost-longest;
//! * the merging with a [`BPE`] model with `byte_fallback`, whose merges are derived from the
//!   vocabulary and `tokenizer.ggml.scores` as Hugging Face's SentencePiece converter does:
//!   every split `a` + `b` of an entry `ab` where `a` and `b` are entries too, ranked by the
//!   score of `ab` (highest first).
//!
//! Where the two can differ, and why that does not happen for the vocabularies checked
//! (Gemma 3's, token for token against llama.cpp; see `runtime/tests/gemma3_tokenizer.rs`):
//!
//! * llama.cpp matches special tokens longest token first, the crate leftmost-longest. These
//!   agree unless a special token's end overlaps another's start; Gemma's have no such pair.
//! * Merges of equal score: llama.cpp takes the leftmost, a BPE model the lower rank, and two
//!   splits of one entry (`ab`+`c`, `a`+`bc`) get different ranks. They agree unless two such
//!   splits are pending at once and the order matters. No such text turned up: Gemma 3's
//!   encoding equalled llama.cpp's for 27,000 random strings and character runs and 600
//!   chunks of real text (source, prose, the GPL), besides the test fixture.
//! * A character outside the vocabulary never merges here; llama.cpp would merge it with a
//!   neighbour if their concatenation were an entry (no entry of Gemma's has such a
//!   character).
//! * A character whose bytes lack `<0xNN>` tokens becomes the unknown token here; llama.cpp
//!   fails to tokenize (Gemma has all 256).
//! * Entries longer than [`MAX_MERGED_TOKEN_BYTES`] are never formed by merging, which
//!   bounds the work a malformed vocabulary can ask for (real entries are under 64 bytes).

use super::{TokenType, TokenizerError};
use rayon::prelude::*;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{
    AddedToken, AddedVocabulary, Model, NormalizerWrapper, OffsetReferential, OffsetType,
};

/// The character that stands for a space in SentencePiece vocabularies.
pub const SPACE_MARK: char = '\u{2581}';

/// The longest entry (in bytes) that merging can form; longer ones are only reachable as
/// special tokens. Bounds the cost of deriving merges to this many hash lookups per byte of
/// vocabulary.
pub const MAX_MERGED_TOKEN_BYTES: usize = 1024;

/// What the SentencePiece encoder is built from: the vocabulary as read and checked by
/// [`super::Tokenizer::from_config`].
pub(crate) struct SpmVocab<'a> {
    /// The token strings, indexed by id.
    pub tokens: &'a [String],
    /// One score per token (higher merges first).
    pub scores: &'a [f32],
    /// One type per token.
    pub types: &'a [TokenType],
    /// Each distinct token string's first id.
    pub ids: &'a Vocab,
    /// The unknown token, used for a character whose bytes have no `<0xNN>` token.
    pub unk_id: Option<u32>,
    /// Whether a text fragment at the start or after a special token gets a leading "▁".
    pub add_space_prefix: bool,
}

/// A SentencePiece encoder: text (no BOS / EOS) to token ids.
#[derive(Clone)]
pub(crate) struct SpmEncoder {
    model: BPE,
    /// Matches control, unknown and user-defined tokens.
    special: AddedVocabulary,
    /// Matches user-defined tokens only (special-token parsing off).
    user_defined: AddedVocabulary,
    add_space_prefix: bool,
}

/// A run of text between special tokens, or a special token.
#[derive(Debug, PartialEq, Eq)]
enum Fragment {
    Text(String),
    Token(u32),
}

impl SpmEncoder {
    /// Build the encoder: derive the merges, the BPE model and the special-token matchers.
    pub(crate) fn new(v: &SpmVocab<'_>) -> Result<Self, TokenizerError> {
        // The model takes its own copy of the vocabulary, made while the merges are derived.
        let (vocab, merges) = rayon::join(
            || v.ids.clone(),
            || derive_merges(v.tokens, v.scores, v.ids),
        );
        let unk = v.unk_id.and_then(|id| v.tokens.get(id as usize)).cloned();
        let model = build_model(vocab, merges, unk)?;
        let (special, user_defined) = special_matchers(&model, v);
        Ok(Self {
            model,
            special,
            user_defined,
            add_space_prefix: v.add_space_prefix,
        })
    }

    /// Token ids for `text`; with `parse_special`, control tokens written in it are
    /// recognised (user-defined ones always are).
    pub(crate) fn encode(
        &self,
        text: &str,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut frags = Vec::new();
        self.split_special(text, parse_special, &mut frags);
        self.encode_fragments(frags)
    }

    /// Token ids for texts in a row, each `(text, parse_special)`: the texts' special tokens
    /// are found separately, but text that meets across a boundary is encoded as one run,
    /// so the ids are those of the whole text as long as no special token spans a boundary.
    pub(crate) fn encode_parts<'t>(
        &self,
        parts: impl IntoIterator<Item = (&'t str, bool)>,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut frags = Vec::new();
        for (text, parse_special) in parts {
            self.split_special(text, parse_special, &mut frags);
        }
        self.encode_fragments(frags)
    }

    /// Cut `text` at special tokens, appending to `out`; text joins a text fragment that
    /// `out` already ends with.
    fn split_special(&self, text: &str, parse_special: bool, out: &mut Vec<Fragment>) {
        let matcher = if parse_special {
            &self.special
        } else {
            &self.user_defined
        };
        let split = matcher.extract_and_normalize(None::<&NormalizerWrapper>, text);
        for (piece, _, tokens) in split.get_splits(OffsetReferential::Original, OffsetType::None) {
            match tokens {
                Some(tokens) => out.extend(tokens.iter().map(|t| Fragment::Token(t.id))),
                None if piece.is_empty() => {}
                None => match out.last_mut() {
                    Some(Fragment::Text(prev)) => prev.push_str(piece),
                    _ => out.push(Fragment::Text(piece.to_string())),
                },
            }
        }
    }

    /// Ids of fragments: special tokens as they are, text through the BPE model.
    fn encode_fragments(&self, frags: Vec<Fragment>) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        let mut after_special = true;
        for frag in frags {
            match frag {
                Fragment::Token(id) => {
                    ids.push(id);
                    after_special = true;
                }
                Fragment::Text(text) => {
                    let prefix = self.add_space_prefix && after_special;
                    self.encode_text(&text, prefix, &mut ids)?;
                    after_special = false;
                }
            }
        }
        Ok(ids)
    }

    /// Append the ids of one text fragment: spaces as "▁" (and one in front with
    /// `prefix`), then merged.
    fn encode_text(
        &self,
        text: &str,
        prefix: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut escaped = String::with_capacity(text.len() + 3);
        if prefix {
            escaped.push(SPACE_MARK);
        }
        for c in text.chars() {
            escaped.push(if c == ' ' { SPACE_MARK } else { c });
        }
        let tokens = self
            .model
            .tokenize(&escaped)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        out.extend(tokens.iter().map(|t| t.id));
        Ok(())
    }
}

/// The merges of a SentencePiece vocabulary, best first: every split `a` + `b` (at a
/// character boundary) of an entry where both halves are entries, ordered by the entry's
/// score (highest first), then its id, then the halves' ids (the order Hugging Face's
/// converter gives). Entries that are a later duplicate or longer than
/// [`MAX_MERGED_TOKEN_BYTES`] get none.
fn derive_merges(tokens: &[String], scores: &[f32], ids: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, u32)> = tokens
        .par_iter()
        .enumerate()
        .flat_map_iter(|(i, t)| {
            let id = i as u32;
            let wanted = t.len() <= MAX_MERGED_TOKEN_BYTES && ids.get(t.as_str()) == Some(&id);
            let splits = t.char_indices().skip(1).filter(move |_| wanted);
            splits.filter_map(move |(k, _)| {
                let (a, b) = t.split_at(k);
                let a = *ids.get(a)?;
                let b = *ids.get(b)?;
                Some((scores[i], id, a, b))
            })
        })
        .collect();
    // Scores are checked to be numbers, so partial_cmp is total here (and -0.0 == 0.0, as
    // llama.cpp compares them).
    ranked.par_sort_unstable_by(|x, y| {
        y.0.partial_cmp(&x.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
            .then(x.3.cmp(&y.3))
    });
    ranked
        .par_iter()
        .map(|&(_, _, a, b)| (tokens[a as usize].clone(), tokens[b as usize].clone()))
        .collect()
}

/// The BPE model: the vocabulary, the derived merges, byte fallback to `<0xNN>` tokens,
/// and `unk` for characters whose bytes lack one.
fn build_model(
    vocab: Vocab,
    merges: Vec<(String, String)>,
    unk: Option<String>,
) -> Result<BPE, TokenizerError> {
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    builder
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))
}

/// The special-token matchers: (control + unknown + user-defined, user-defined only).
/// Only a string's first id can be matched; empty strings never are.
fn special_matchers(model: &BPE, v: &SpmVocab<'_>) -> (AddedVocabulary, AddedVocabulary) {
    let mut control = Vec::new();
    let mut user = Vec::new();
    for (i, (t, ty)) in v.tokens.iter().zip(v.types).enumerate() {
        if t.is_empty() || v.ids.get(t.as_str()) != Some(&(i as u32)) {
            continue;
        }
        match ty {
            TokenType::Control | TokenType::Unknown => {
                control.push(AddedToken::from(t.clone(), true).normalized(false))
            }
            TokenType::UserDefined => {
                user.push(AddedToken::from(t.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    let mut user_defined = AddedVocabulary::new();
    user_defined.add_tokens(&user, model, None::<&NormalizerWrapper>);
    let mut special = user_defined.clone();
    special.add_special_tokens(&control, model, None::<&NormalizerWrapper>);
    (special, user_defined)
}

/// The byte a byte token's text stands for: `<0xNN>` with two hex digits.
pub fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The text a normal SentencePiece token stands for: its "▁" as spaces.
pub fn normal_piece(text: &str) -> Vec<u8> {
    text.replace(SPACE_MARK, " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestVocab {
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<TokenType>,
        ids: Vocab,
    }

    /// `(text, score, type)` entries in id order.
    fn vocab(entries: &[(&str, f32, TokenType)]) -> TestVocab {
        let tokens: Vec<String> = entries.iter().map(|e| e.0.to_string()).collect();
        let mut ids = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        TestVocab {
            scores: entries.iter().map(|e| e.1).collect(),
            types: entries.iter().map(|e| e.2).collect(),
            tokens,
            ids,
        }
    }

    fn encoder(v: &TestVocab, add_space_prefix: bool) -> SpmEncoder {
        SpmEncoder::new(&SpmVocab {
            tokens: &v.tokens,
            scores: &v.scores,
            types: &v.types,
            ids: &v.ids,
            unk_id: Some(0),
            add_space_prefix,
        })
        .unwrap()
    }

    use TokenType::{Byte, Control, Normal, Unknown, UserDefined};

    fn small() -> TestVocab {
        let mut e: Vec<(String, f32, TokenType)> = vec![
            ("<unk>".into(), 0.0, Unknown),
            ("<s>".into(), 0.0, Control),
            ("<x>".into(), 0.0, UserDefined),
        ];
        for b in 0..=255u8 {
            e.push((format!("<0x{b:02X}>"), 0.0, Byte));
        }
        for (t, s) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("c", -4.0),
            ("ab", -10.0),
            ("bc", -5.0),
            ("abc", -20.0),
            ("▁a", -6.0),
            ("é", -7.0),
        ] {
            e.push((t.into(), s, Normal));
        }
        let refs: Vec<(&str, f32, TokenType)> =
            e.iter().map(|(t, s, ty)| (t.as_str(), *s, *ty)).collect();
        vocab(&refs)
    }

    fn pieces(v: &TestVocab, enc: &SpmEncoder, text: &str, special: bool) -> Vec<String> {
        enc.encode(text, special)
            .unwrap()
            .into_iter()
            .map(|id| v.tokens[id as usize].clone())
            .collect()
    }

    #[test]
    fn highest_score_merges_first() {
        let v = small();
        let e = encoder(&v, false);
        // "bc" (-5) beats "ab" (-10), and then "a"+"bc" = "abc" (-20) is an entry.
        assert_eq!(pieces(&v, &e, "abc", false), ["abc"]);
        // "▁a" (-6) first, then no entry for "▁ab", so "b" stays.
        assert_eq!(pieces(&v, &e, " ab", false), ["▁a", "b"]);
        assert_eq!(pieces(&v, &e, "ab", false), ["ab"]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let v = small();
        let e = encoder(&v, false);
        assert_eq!(
            pieces(&v, &e, "a€é", false),
            ["a", "<0xE2>", "<0x82>", "<0xAC>", "é"]
        );
    }

    #[test]
    fn special_tokens_and_space_prefix() {
        let v = small();
        let e = encoder(&v, false);
        assert_eq!(
            pieces(&v, &e, "a<s>b<x>c", true),
            ["a", "<s>", "b", "<x>", "c"]
        );
        // Without special parsing the control token is text; user-defined ones still count.
        let plain = pieces(&v, &e, "<s><x>", false);
        assert_eq!(plain.last().map(String::as_str), Some("<x>"));
        assert!(!plain.contains(&"<s>".to_string()), "{plain:?}");
        let p = encoder(&v, true);
        // A "▁" in front of the text and after each special token, not after text.
        assert_eq!(pieces(&v, &p, "a<s>a", true), ["▁a", "<s>", "▁a"]);
        let parts = p
            .encode_parts([("a", true), ("b<s>", false), ("c", true)])
            .unwrap();
        let whole = p.encode("ab<s>c", false).unwrap();
        assert_eq!(parts, whole);
    }

    #[test]
    fn merges_follow_scores_and_skip_long_entries() {
        let long = "a".repeat(MAX_MERGED_TOKEN_BYTES + 1);
        let shorter = "a".repeat(MAX_MERGED_TOKEN_BYTES);
        let v = vocab(&[
            ("a", -1.0, Normal),
            ("b", -1.0, Normal),
            ("ab", -3.0, Normal),
            ("ba", -2.0, Normal),
            (&shorter, -4.0, Normal),
            (&long, -5.0, Normal),
        ]);
        let m = derive_merges(&v.tokens, &v.scores, &v.ids);
        let names: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(names[..2], [("b", "a"), ("a", "b")]);
        // The long run would be `shorter` + "a", but it is over the limit; `shorter` has no
        // split into two entries.
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn byte_token_values() {
        assert_eq!(byte_token_value("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_token_value("<0xff>"), Some(0xFF));
        assert_eq!(byte_token_value("<0x0>"), None);
        assert_eq!(byte_token_value("<0xZZ>"), None);
        assert_eq!(byte_token_value("0x41"), None);
        assert_eq!(normal_piece("▁Hello▁world"), b" Hello world");
    }
}
