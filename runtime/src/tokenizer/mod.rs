//! The tokenizer, built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Two kinds of vocabulary, both implemented with the `tokenizers` crate:
//!
//! * Byte-level BPE (`tokenizer.ggml.model` = "gpt2"): a BPE model from
//!   `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the pre-tokenizer named by
//!   `tokenizer.ggml.pre` (see [`PreTokenizerKind`]), and the control / user-defined tokens
//!   of `tokenizer.ggml.token_type` as added tokens. Tokens are written in the GPT-2 byte
//!   alphabet ([`bytes`]).
//! * SentencePiece (`tokenizer.ggml.model` = "llama", e.g. Gemma): merges ranked by
//!   `tokenizer.ggml.scores`, "▁" for spaces and `<0xNN>` byte tokens; see [`spm`].
//!
//! Decoding (token ids to bytes to text) is done here from each token's bytes, and
//! [`StreamDecoder`] turns generated ids into complete UTF-8 text one token at a time.

pub mod bytes;
pub mod pretokenize;
pub mod spm;
pub mod stream;

pub use pretokenize::PreTokenizerKind;
pub use stream::{StreamDecoder, Utf8Stream};

use crate::chat::ChatPiece;
use crate::model::gguf::{GgufError, GgufFile, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::AddedToken;

/// Errors while building or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A missing or mistyped metadata key (the message names the key and the file).
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `tokenizer.ggml.model` names a tokenizer other than byte-level BPE or SentencePiece.
    #[error("tokenizer model '{model}' (tokenizer.ggml.model) is not supported; this build supports byte-level BPE ('gpt2') and SentencePiece ('llama')")]
    Unsupported {
        /// The tokenizer model named.
        model: String,
    },
    /// A metadata value is inconsistent (empty vocabulary, wrong number of token types or
    /// scores, a token id outside the vocabulary, a malformed byte token).
    #[error("bad tokenizer metadata '{key}': {msg}")]
    BadMetadata {
        /// The metadata key at fault.
        key: &'static str,
        /// What is wrong with it.
        msg: String,
    },
    /// The `tokenizers` crate refused to build the BPE model or pre-tokenizer.
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
    /// The `tokenizers` crate failed to encode a text.
    #[error("cannot tokenize the text: {0}")]
    Encode(String),
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Value 0, or any value not listed here; decodes to nothing.
    Undefined,
    /// Value 1: an ordinary vocabulary entry (in byte-level form for BPE, with "▁" for
    /// spaces for SentencePiece).
    Normal,
    /// Value 2: the unknown-token placeholder; handled like a control token.
    Unknown,
    /// Value 3: a control token such as `<|im_start|>`; decodes to nothing unless rendered.
    Control,
    /// Value 4: an added token matched verbatim in text and decoded as its text.
    UserDefined,
    /// Value 5: a reserved entry; decodes to nothing.
    Unused,
    /// Value 6: a token standing for one raw byte (`<0xNN>` in SentencePiece vocabularies).
    Byte,
}

impl TokenType {
    /// The type for a GGUF value; unknown values count as [`TokenType::Undefined`].
    pub fn from_gguf(v: i64) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

/// Names of control tokens that end generation when present.
pub const END_OF_GENERATION_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
];

/// The kinds of vocabulary this build encodes (`tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenizerModel {
    /// Byte-level BPE with merges and a pre-tokenizer ("gpt2").
    ByteLevelBpe,
    /// SentencePiece with scores, "▁" for spaces and byte fallback ("llama").
    SentencePiece,
}

impl TokenizerModel {
    /// The kind named by a `tokenizer.ggml.model` value, or `None` for other kinds.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" => Some(Self::ByteLevelBpe),
            "llama" => Some(Self::SentencePiece),
            _ => None,
        }
    }
}

/// Everything a tokenizer is built from: the `tokenizer.ggml.*` metadata, decoupled from the
/// file so that it can also be put together by hand.
#[derive(Clone, Debug, Default)]
pub struct TokenizerConfig {
    /// `tokenizer.ggml.model`, e.g. "gpt2" or "llama".
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. "smollm".
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the token strings, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges`: "left right" pairs, highest priority first (BPE only).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores`: one per token, higher merges first (SentencePiece only,
    /// where it is required; [`TokenizerConfig::from_gguf`] reads it only there).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type` (raw values); empty means all normal.
    pub token_types: Vec<i64>,
    /// `tokenizer.ggml.bos_token_id`: the beginning-of-sequence token.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`: the end-of-sequence token, which ends generation.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn), which also ends generation.
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.eom_token_id` (end of message), which also ends generation.
    pub eom_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`: stands for a character that has neither a token
    /// nor byte tokens (SentencePiece only; [`TokenizerConfig::from_gguf`] reads it only
    /// there).
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: whether encoding prepends BOS. When the key is absent,
    /// [`TokenizerConfig::from_gguf`] uses llama.cpp's default: true for SentencePiece,
    /// false otherwise.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token` (default false): whether encoding appends EOS.
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece only): whether text at the start or
    /// after a special token gets a leading space. When the key is absent,
    /// [`TokenizerConfig::from_gguf`] uses llama.cpp's default: true for SentencePiece.
    pub add_space_prefix: bool,
}

impl TokenizerConfig {
    /// Read the tokenizer metadata of `g`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let model = g.req_str("tokenizer.ggml.model")?.to_string();
        let pre = match g.get("tokenizer.ggml.pre") {
            None => None,
            Some(_) => Some(g.req_str("tokenizer.ggml.pre")?.to_string()),
        };
        let tokens = g
            .req_strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let merges = match g.get("tokenizer.ggml.merges") {
            None => Vec::new(),
            Some(_) => g
                .req_strings("tokenizer.ggml.merges")?
                .into_iter()
                .map(str::to_owned)
                .collect(),
        };
        let spm = model == "llama";
        let scores = if spm { read_scores(g)? } else { Vec::new() };
        let token_types = g.opt_ints("tokenizer.ggml.token_type")?.unwrap_or_default();
        let id = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
            g.opt_u64(key)?
                .map(|v| {
                    u32::try_from(v).map_err(|_| TokenizerError::BadMetadata {
                        key,
                        msg: format!("token id {v} is too large"),
                    })
                })
                .transpose()
        };
        Ok(Self {
            model,
            pre,
            tokens,
            merges,
            scores,
            token_types,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            eot_id: id("tokenizer.ggml.eot_token_id")?,
            eom_id: id("tokenizer.ggml.eom_token_id")?,
            unk_id: if spm {
                id("tokenizer.ggml.unknown_token_id")?
            } else {
                None
            },
            add_bos: g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(spm),
            add_eos: g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            add_space_prefix: g
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(spm),
        })
    }
}

/// `tokenizer.ggml.scores` of `g` (float or integer array), empty when absent.
fn read_scores(g: &GgufFile) -> Result<Vec<f32>, TokenizerError> {
    const KEY: &str = "tokenizer.ggml.scores";
    let Some(v) = g.get(KEY) else {
        return Ok(Vec::new());
    };
    let wrong = || GgufError::KeyType {
        path: g.path().to_path_buf(),
        key: KEY.into(),
        expected: "array of numbers",
    };
    let number = |x: &Value| -> Option<f32> {
        Some(match *x {
            Value::F32(f) => f,
            Value::F64(f) => f as f32,
            Value::I8(i) => f32::from(i),
            Value::I16(i) => f32::from(i),
            Value::I32(i) => i as f32,
            Value::I64(i) => i as f32,
            _ => x.as_u64()? as f32,
        })
    };
    v.as_array()
        .ok_or_else(wrong)?
        .iter()
        .map(|x| number(x).ok_or_else(wrong))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Into::into)
}

/// A tokenizer: text to token ids and back.
#[derive(Clone)]
pub struct Tokenizer {
    engine: Engine,
    pre: PreTokenizerKind,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    /// The bytes each token stands for; for control tokens, their text.
    pieces: Vec<Box<[u8]>>,
    /// Each distinct token string's first id.
    ids: Vocab,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Whether decoding drops one leading space of the first token (SentencePiece with a
    /// space prefix, as llama.cpp's detokenizer does).
    strip_first_space: bool,
    /// The most bytes of text one token can stand for (at least 4, a character that falls
    /// back to one unknown token).
    max_token_text: usize,
}

/// The encoder proper, by kind of vocabulary.
#[derive(Clone)]
enum Engine {
    /// Byte-level BPE.
    ByteLevel {
        /// Recognises special tokens in the text.
        special: Box<tokenizers::Tokenizer>,
        /// Treats special tokens' text as plain text.
        plain: Box<tokenizers::Tokenizer>,
    },
    /// SentencePiece.
    SentencePiece(Box<spm::SpmEncoder>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model())
            .field("vocab_size", &self.tokens.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// Checks `tokenizer.ggml.model`: Ok for byte-level BPE ("gpt2") and SentencePiece
/// ("llama"), else [`TokenizerError::Unsupported`].
pub fn check_model(model: &str) -> Result<(), TokenizerError> {
    model_kind(model).map(|_| ())
}

fn model_kind(model: &str) -> Result<TokenizerModel, TokenizerError> {
    TokenizerModel::from_gguf_name(model).ok_or_else(|| TokenizerError::Unsupported {
        model: model.to_string(),
    })
}

impl Tokenizer {
    /// Build the tokenizer described by `g`'s metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let model = g.req_str("tokenizer.ggml.model")?;
        // Fail on the model type before reading (possibly absent) model-specific keys.
        check_model(model)?;
        Self::from_config(TokenizerConfig::from_gguf(g)?)
    }

    /// Build a tokenizer from metadata put together by hand.
    pub fn from_config(cfg: TokenizerConfig) -> Result<Self, TokenizerError> {
        let kind = model_kind(&cfg.model)?;
        let n = check_vocab_size(&cfg.tokens)?;
        let types = token_types(&cfg.token_types, n)?;
        check_special_ids(&cfg, n)?;
        let ids = first_ids(&cfg.tokens);
        // The encoder and the decoding table are independent: build them side by side.
        let (engine, pieces) = rayon::join(
            || match kind {
                TokenizerModel::ByteLevelBpe => byte_level_engine(&cfg, &ids, &types),
                TokenizerModel::SentencePiece => {
                    sentencepiece_engine(&cfg, &ids, &types).map(|e| (e, PreTokenizerKind::NoSplit))
                }
            },
            || token_pieces(kind, &cfg.tokens, &types),
        );
        let (engine, pre) = engine?;
        let pieces = pieces?;
        let eog = eog_ids(&cfg, &ids, &types);
        let max_token_text = cfg
            .tokens
            .iter()
            .map(|t| t.len())
            .chain(pieces.iter().map(|p| p.len()))
            .max()
            .unwrap_or(0)
            .max(4);
        Ok(Self {
            max_token_text,
            engine,
            pre,
            types,
            pieces,
            ids,
            tokens: cfg.tokens,
            bos: cfg.bos_id,
            eos: cfg.eos_id,
            eog,
            add_bos: cfg.add_bos,
            add_eos: cfg.add_eos,
            strip_first_space: kind == TokenizerModel::SentencePiece && cfg.add_space_prefix,
        })
    }

    /// Token ids for `text`. With `parse_special`, control tokens written in the text (e.g.
    /// "<|im_start|>") become their ids; without, they are tokenized as plain text. BOS is
    /// prepended iff the model asks for it (`tokenizer.ggml.add_bos_token`), EOS appended
    /// iff `tokenizer.ggml.add_eos_token`.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.with_bos_eos(self.encode_raw(text, parse_special)?))
    }

    /// `body` with BOS before it and EOS after it, as the model asks.
    fn with_bos_eos(&self, body: Vec<u32>) -> Vec<u32> {
        let mut ids = Vec::with_capacity(body.len() + 2);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend(body);
        if let (true, Some(eos)) = (self.add_eos, self.eos) {
            ids.push(eos);
        }
        ids
    }

    /// Token ids for a chat prompt rendered in pieces (see
    /// [`crate::chat::ChatTemplate::render_pieces`]): the template's text with control
    /// tokens recognised, the messages' text as plain text, so that a message cannot
    /// write a control token. BOS and EOS as [`Tokenizer::encode`] adds them. For
    /// byte-level BPE, pieces meet where the pre-tokenizer splits anyway (a template's
    /// control token or newline); for SentencePiece, text that meets across pieces is
    /// encoded as one run. Either way, for ordinary messages the ids equal those of the
    /// whole text.
    pub fn encode_pieces(&self, pieces: &[ChatPiece]) -> Result<Vec<u32>, TokenizerError> {
        let body = match &self.engine {
            Engine::ByteLevel { .. } => {
                let mut body = Vec::new();
                for p in pieces {
                    body.extend(self.encode_raw(&p.text, !p.from_message)?);
                }
                body
            }
            Engine::SentencePiece(spm) => {
                spm.encode_parts(pieces.iter().map(|p| (p.text.as_str(), !p.from_message)))?
            }
        };
        Ok(self.with_bos_eos(body))
    }

    /// Token ids for `text` without BOS / EOS.
    pub fn encode_raw(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.engine {
            Engine::ByteLevel { special, plain } => {
                let hf = if parse_special { special } else { plain };
                let enc = hf
                    .encode_fast(text, false)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            }
            Engine::SentencePiece(spm) => spm.encode(text, parse_special),
        }
    }

    /// The text of `ids`; invalid UTF-8 becomes U+FFFD. Control tokens decode to nothing.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with(ids, false)
    }

    /// Like [`Tokenizer::decode`]; with `render_special`, control tokens give their text.
    /// For SentencePiece vocabularies with a space prefix, the first token loses one
    /// leading space (the one encoding added), as in llama.cpp.
    pub fn decode_with(&self, ids: &[u32], render_special: bool) -> String {
        let mut buf = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_piece(id, render_special);
            let piece = match piece {
                [b' ', rest @ ..] if i == 0 && self.strip_first_space => rest,
                _ => piece,
            };
            buf.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The raw bytes token `id` stands for: empty for control tokens and ids outside the
    /// vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_piece(id, false)
    }

    /// The raw bytes of token `id`; with `render_special`, control tokens give their text.
    pub fn token_piece(&self, id: u32, render_special: bool) -> &[u8] {
        let i = id as usize;
        match self.types.get(i) {
            None => &[],
            Some(TokenType::Control | TokenType::Unknown) if !render_special => &[],
            Some(_) => &self.pieces[i],
        }
    }

    /// A decoder for generated tokens that emits only complete UTF-8 text.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    /// The token's string as stored in the vocabulary (for normal tokens the byte-level form,
    /// e.g. "ĠParis", or the SentencePiece form, e.g. "▁Paris").
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the vocabulary entry spelled exactly `text` (as stored, see
    /// [`Tokenizer::token_text`]).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// The type of token `id`, or `None` outside the vocabulary.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether token `id` is a control token.
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }

    /// Number of entries in `tokenizer.ggml.tokens`.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The fewest tokens `bytes` bytes of text can encode to (each token stands for at
    /// most the longest token's text): a prompt whose bound is over a limit is over it
    /// without being tokenized.
    pub fn min_tokens(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.max_token_text)
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether [`Tokenizer::encode`] prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether [`Tokenizer::encode`] appends EOS.
    pub fn adds_eos(&self) -> bool {
        self.add_eos && self.eos.is_some()
    }

    /// Tokens that end generation: EOS (and EOT / EOM) plus control tokens named like
    /// [`END_OF_GENERATION_NAMES`]; sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether token `id` ends generation (see [`Tokenizer::eog_ids`]).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The pre-tokenizer chosen from `tokenizer.ggml.pre` ([`PreTokenizerKind::NoSplit`]
    /// for SentencePiece, which has none).
    pub fn pre_tokenizer(&self) -> PreTokenizerKind {
        self.pre
    }

    /// The kind of vocabulary (`tokenizer.ggml.model`).
    pub fn model(&self) -> TokenizerModel {
        match self.engine {
            Engine::ByteLevel { .. } => TokenizerModel::ByteLevelBpe,
            Engine::SentencePiece(_) => TokenizerModel::SentencePiece,
        }
    }
}

/// The vocabulary size, checked to be non-zero and to fit token ids.
fn check_vocab_size(tokens: &[String]) -> Result<usize, TokenizerError> {
    let n = tokens.len();
    if n == 0 {
        return Err(TokenizerError::BadMetadata {
            key: "tokenizer.ggml.tokens",
            msg: "the vocabulary is empty".into(),
        });
    }
    if n > u32::MAX as usize {
        return Err(TokenizerError::BadMetadata {
            key: "tokenizer.ggml.tokens",
            msg: format!("{n} tokens is too many"),
        });
    }
    Ok(n)
}

/// The type of each of `n` tokens: all normal when `raw` is empty, else one per token.
fn token_types(raw: &[i64], n: usize) -> Result<Vec<TokenType>, TokenizerError> {
    if raw.is_empty() {
        Ok(vec![TokenType::Normal; n])
    } else if raw.len() != n {
        Err(TokenizerError::BadMetadata {
            key: "tokenizer.ggml.token_type",
            msg: format!("{} entries for {n} tokens", raw.len()),
        })
    } else {
        Ok(raw.iter().map(|&t| TokenType::from_gguf(t)).collect())
    }
}

/// Checks that the BOS / EOS / EOT / EOM / unknown token ids are inside the vocabulary.
fn check_special_ids(cfg: &TokenizerConfig, n: usize) -> Result<(), TokenizerError> {
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", cfg.bos_id),
        ("tokenizer.ggml.eos_token_id", cfg.eos_id),
        ("tokenizer.ggml.eot_token_id", cfg.eot_id),
        ("tokenizer.ggml.eom_token_id", cfg.eom_id),
        ("tokenizer.ggml.unknown_token_id", cfg.unk_id),
    ] {
        if let Some(id) = id.filter(|&id| id as usize >= n) {
            return Err(TokenizerError::BadMetadata {
                key,
                msg: format!("token id {id} is outside the vocabulary of {n} tokens"),
            });
        }
    }
    Ok(())
}

/// Each distinct token string's id: a duplicated string keeps its first id.
fn first_ids(tokens: &[String]) -> Vocab {
    let mut ids = Vocab::default();
    ids.reserve(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.clone()).or_insert(i as u32);
    }
    ids
}

/// The byte-level BPE encoder: the model from tokens and merges (merges naming tokens
/// outside the vocabulary are skipped with a warning), the pre-tokenizer of
/// `tokenizer.ggml.pre`, and control / user-defined tokens as added tokens.
fn byte_level_engine(
    cfg: &TokenizerConfig,
    ids: &Vocab,
    types: &[TokenType],
) -> Result<(Engine, PreTokenizerKind), TokenizerError> {
    let vocab = ids.clone();
    let mut merges = Vec::with_capacity(cfg.merges.len());
    let mut skipped = 0usize;
    for m in &cfg.merges {
        let Some((a, b)) = m.split_once(' ') else {
            skipped += 1;
            continue;
        };
        if ids.contains_key(a) && ids.contains_key(b) && ids.contains_key(&format!("{a}{b}")) {
            merges.push((a.to_string(), b.to_string()));
        } else {
            skipped += 1;
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "ignored BPE merges that are malformed or name tokens outside the vocabulary"
        );
    }

    let pre = PreTokenizerKind::select(cfg.pre.as_deref());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges())
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(pre.build().map_err(TokenizerError::Build)?));

    let mut special = Vec::new();
    let mut user = Vec::new();
    for (i, (t, ty)) in cfg.tokens.iter().zip(types).enumerate() {
        // Only the string's first id can be matched in text.
        if ids.get(t) != Some(&(i as u32)) || t.is_empty() {
            continue;
        }
        match ty {
            TokenType::Control | TokenType::Unknown => {
                special.push(AddedToken::from(t.clone(), true).normalized(false))
            }
            TokenType::UserDefined => {
                user.push(AddedToken::from(t.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    hf.add_special_tokens(&special);
    hf.add_tokens(&user);
    let mut plain = hf.clone();
    plain.set_encode_special_tokens(true);
    let engine = Engine::ByteLevel {
        special: Box::new(hf),
        plain: Box::new(plain),
    };
    Ok((engine, pre))
}

/// The SentencePiece encoder, after checking the scores (one number per token).
fn sentencepiece_engine(
    cfg: &TokenizerConfig,
    ids: &Vocab,
    types: &[TokenType],
) -> Result<Engine, TokenizerError> {
    check_scores(&cfg.scores, cfg.tokens.len())?;
    let enc = spm::SpmEncoder::new(&spm::SpmVocab {
        tokens: &cfg.tokens,
        scores: &cfg.scores,
        types,
        ids,
        unk_id: cfg.unk_id,
        add_space_prefix: cfg.add_space_prefix,
    })?;
    Ok(Engine::SentencePiece(Box::new(enc)))
}

/// Checks that there is one score, a number (not NaN), per token.
fn check_scores(scores: &[f32], n: usize) -> Result<(), TokenizerError> {
    const KEY: &str = "tokenizer.ggml.scores";
    if scores.is_empty() {
        return Err(TokenizerError::BadMetadata {
            key: KEY,
            msg: format!(
                "missing: a SentencePiece vocabulary needs one score per token ({n} tokens)"
            ),
        });
    }
    if scores.len() != n {
        return Err(TokenizerError::BadMetadata {
            key: KEY,
            msg: format!("{} scores for {n} tokens", scores.len()),
        });
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(TokenizerError::BadMetadata {
            key: KEY,
            msg: format!("the score of token {i} is not a number"),
        });
    }
    Ok(())
}

/// The bytes each token decodes to. Byte-level BPE: normal and byte tokens through the
/// GPT-2 byte alphabet. SentencePiece: normal tokens with "▁" as spaces, byte tokens
/// (`<0xNN>`) as their byte. Both: control, unknown and user-defined tokens as their text
/// (control and unknown ones are only shown when rendering special tokens); unused and
/// undefined ones as nothing.
fn token_pieces(
    kind: TokenizerModel,
    tokens: &[String],
    types: &[TokenType],
) -> Result<Vec<Box<[u8]>>, TokenizerError> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .map(|(i, (t, ty))| {
            let piece: Box<[u8]> = match (ty, kind) {
                (TokenType::Normal | TokenType::Byte, TokenizerModel::ByteLevelBpe) => {
                    bytes::decode_byte_level(t).into()
                }
                (TokenType::Normal, TokenizerModel::SentencePiece) => spm::normal_piece(t).into(),
                (TokenType::Byte, TokenizerModel::SentencePiece) => {
                    let b = spm::byte_token_value(t).ok_or_else(|| TokenizerError::BadMetadata {
                        key: "tokenizer.ggml.tokens",
                        msg: format!(
                            "token {i} ({t:?}) has type BYTE in tokenizer.ggml.token_type but is not written <0xNN>"
                        ),
                    })?;
                    Box::new([b])
                }
                (TokenType::Control | TokenType::Unknown | TokenType::UserDefined, _) => {
                    t.as_bytes().into()
                }
                (TokenType::Unused | TokenType::Undefined, _) => Box::default(),
            };
            Ok(piece)
        })
        .collect()
}

/// The tokens that end generation: EOS, EOT and EOM, plus control tokens named like
/// [`END_OF_GENERATION_NAMES`]; sorted, without repeats.
fn eog_ids(cfg: &TokenizerConfig, ids: &Vocab, types: &[TokenType]) -> Vec<u32> {
    let mut eog: Vec<u32> = [cfg.eos_id, cfg.eot_id, cfg.eom_id]
        .into_iter()
        .flatten()
        .collect();
    for name in END_OF_GENERATION_NAMES {
        if let Some(&id) = ids.get(*name) {
            if types[id as usize] == TokenType::Control {
                eog.push(id);
            }
        }
    }
    eog.sort_unstable();
    eog.dedup();
    eog
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny vocabulary: the 256 byte characters, a few merges and two control tokens.
    fn tiny(model: &str, pre: Option<&str>) -> TokenizerConfig {
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        ];
        tokens.extend((0..=255u8).map(|b| bytes::byte_to_char(b).to_string()));
        tokens.extend(["he", "ll", "hell", "hello", "Ġw"].map(String::from));
        let mut token_types = vec![3, 3, 3];
        token_types.resize(tokens.len(), 1);
        TokenizerConfig {
            model: model.into(),
            pre: pre.map(Into::into),
            tokens,
            merges: ["h e", "l l", "he ll", "hell o", "Ġ w"]
                .map(String::from)
                .into(),
            token_types,
            bos_id: Some(1),
            eos_id: Some(2),
            ..Default::default()
        }
    }

    #[test]
    fn unsupported_model_is_named() {
        let err = Tokenizer::from_config(tiny("t5", Some("default"))).unwrap_err();
        assert!(matches!(&err, TokenizerError::Unsupported { model } if model == "t5"));
        assert!(err.to_string().contains("'t5'"), "{err}");
    }

    #[test]
    fn tiny_roundtrip() {
        let t = Tokenizer::from_config(tiny("gpt2", Some("whatever"))).unwrap();
        assert_eq!(t.pre_tokenizer(), PreTokenizerKind::Gpt2);
        let hello = t.token_id("hello").unwrap();
        let w = t.token_id("Ġw").unwrap();
        let ids = t.encode("<|im_start|>hello w", true).unwrap();
        assert_eq!(ids[..2], [1, hello]);
        assert_eq!(ids[2], w);
        assert_eq!(t.decode(&ids), "hello w");
        assert_eq!(t.decode_with(&ids, true), "<|im_start|>hello w");
        let plain = t.encode("<|im_start|>", false).unwrap();
        assert!(!plain.contains(&1));
        assert_eq!(t.decode(&plain), "<|im_start|>");
        assert_eq!(t.eog_ids(), &[0, 2]);
        assert!(t.is_control(1) && !t.is_control(hello));
        assert_eq!(t.token_bytes(99_999), b"");
    }

    #[test]
    fn digit_grouping_follows_pre() {
        let cfg = |pre: &str| {
            let mut c = tiny("gpt2", Some(pre));
            c.tokens.extend(["12", "123", "45"].map(String::from));
            c.token_types.resize(c.tokens.len(), 1);
            c.merges.extend(["1 2", "12 3", "4 5"].map(String::from));
            c
        };
        let pieces = |pre: &str| {
            let t = Tokenizer::from_config(cfg(pre)).unwrap();
            let ids = t.encode("12345", false).unwrap();
            ids.iter()
                .map(|&i| t.token_text(i).unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(pieces("llama-bpe"), ["123", "45"]);
        assert_eq!(pieces("qwen2"), ["1", "2", "3", "4", "5"]);
        assert_eq!(pieces("smollm"), ["1", "2", "3", "4", "5"]);
        assert_eq!(pieces("gpt2"), ["123", "45"]);
    }

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn bad_type_count() {
        let mut c = tiny("gpt2", Some("smollm"));
        c.token_types.pop();
        let err = Tokenizer::from_config(c).unwrap_err();
        assert!(
            err.to_string().contains("tokenizer.ggml.token_type"),
            "{err}"
        );
    }
}
