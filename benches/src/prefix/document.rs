//! The document every prompt starts with (a real text, cut to a number of tokens with the
//! model's own tokenizer), the questions asked about it, and the prompts built from them.

use anyhow::{Context, Result};
use instinfer_proto::v1 as pb;
use instinfer_runtime::model::GgufFile;
use instinfer_runtime::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// The text shipped with the benchmark: the GNU GPL v3, copied verbatim (its own terms allow
/// verbatim copies) from `/usr/share/common-licenses/GPL-3`.
pub const DEFAULT_DOCUMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/gpl-3.0.txt");

/// Questions about the GPL v3, asked after the document (plain text) or as user turns (chat).
pub const QUESTIONS: [&str; 16] = [
    "What does the license say about charging a fee for conveying copies of the program?",
    "How does the license define the Corresponding Source of a work in object code form?",
    "What must you do when you convey a covered work in object code form?",
    "What does the license say about laws that prohibit circumvention of technological measures?",
    "What happens to your rights if you violate the terms of this license?",
    "How can a licensee whose license was terminated get the rights back?",
    "What patent license does each contributor grant to the recipients?",
    "What is Installation Information, and when must it be provided?",
    "What additional permissions or terms may be added to a covered work?",
    "Does the license give any warranty for the program?",
    "What does the license say about later versions of the GNU General Public License?",
    "What is a User Product in the sense of this license?",
    "Do you have to accept this license to receive or run a copy of the program?",
    "What does the license say about combining the work with the GNU Affero General Public License?",
    "When is a compilation of a covered work with other works called an aggregate?",
    "What does the license say about conveying verbatim copies of the source code?",
];

/// The model's tokenizer, read from the GGUF file's metadata (the model's weights are not
/// loaded).
pub fn load_tokenizer(model: &Path) -> Result<Tokenizer> {
    let gguf = GgufFile::open(model).with_context(|| format!("opening {}", model.display()))?;
    Tokenizer::from_gguf(&gguf).context("building the tokenizer")
}

/// A document cut to a number of tokens.
#[derive(Clone, Debug)]
pub struct Document {
    /// The file it came from.
    pub path: PathBuf,
    /// Its text, cut at a line end.
    pub text: String,
    /// Tokens of `text` (without BOS), by the model's tokenizer.
    pub tokens: usize,
    /// Tokens of the whole file.
    pub file_tokens: usize,
}

impl Document {
    /// The first `max_tokens` tokens of the file at `path`, cut back to the last whole line.
    pub fn load(path: &Path, tok: &Tokenizer, max_tokens: usize) -> Result<Document> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let ids = tok
            .encode_raw(&text, false)
            .with_context(|| format!("tokenizing {}", path.display()))?;
        let text = if ids.len() <= max_tokens {
            text.trim_end().to_string()
        } else {
            let mut cut = tok.decode(&ids[..max_tokens]);
            match cut.rfind('\n') {
                Some(i) if i > 0 => cut.truncate(i),
                _ => {}
            }
            cut.trim_end().to_string()
        };
        let tokens = tok
            .encode_raw(&text, false)
            .context("tokenizing the document")?
            .len();
        Ok(Document {
            path: path.to_path_buf(),
            text,
            tokens,
            file_tokens: ids.len(),
        })
    }
}

/// A greedy generation request of `max_tokens` tokens with the given prompt and cache use.
pub fn request(
    prompt: pb::generate_request::Prompt,
    max_tokens: u32,
    cache: pb::CacheMode,
    request_id: String,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: Some(max_tokens),
        ignore_eos: false,
        cache: cache as i32,
        request_id,
        ..Default::default()
    }
}

/// The plain-text prompt of one question: the document, then the question.
pub fn question_prompt(doc: &str, question: &str) -> pb::generate_request::Prompt {
    pb::generate_request::Prompt::Text(format!("{doc}\n\nQuestion: {question}\nAnswer:"))
}

/// The system message of the chat phase, which holds the document.
pub fn chat_system(doc: &str) -> String {
    format!("Answer questions about this license text briefly.\n\n{doc}")
}

/// The chat prompt of turn `turn` (0-based): the system message, the earlier turns' questions
/// and `replies`, then this turn's question.
pub fn chat_prompt(system: &str, replies: &[String], turn: usize) -> pb::generate_request::Prompt {
    let mut messages = vec![pb::ChatMessage {
        role: "system".into(),
        content: system.to_string(),
    }];
    for (t, q) in QUESTIONS.iter().cycle().take(turn + 1).enumerate() {
        messages.push(pb::ChatMessage {
            role: "user".into(),
            content: q.to_string(),
        });
        if t < turn {
            messages.push(pb::ChatMessage {
                role: "assistant".into(),
                content: replies[t].clone(),
            });
        }
    }
    pb::generate_request::Prompt::Chat(pb::ChatPrompt {
        messages,
        add_generation_prompt: Some(true),
    })
}
