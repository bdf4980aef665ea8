//! Chat templates: the model's Jinja template (`tokenizer.chat_template`) rendered with
//! minijinja the way Hugging Face `apply_chat_template` renders it (trim_blocks,
//! lstrip_blocks, Python string methods through minijinja-contrib's pycompat, and the
//! `raise_exception`, `strftime_now` and `tojson` helpers templates expect).
//!
//! A Gemma model file without a template gets the built-in [`GEMMA_TEMPLATE`].

use crate::model::gguf::{GgufError, GgufFile};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

const TEMPLATE_NAME: &str = "chat_template";

/// The Gemma chat format, used for a Gemma model file that has no template: each turn is
/// `<start_of_turn>{role}\n{content}<end_of_turn>\n` with the assistant's role written
/// `model`, a leading system message goes before the first turn's content followed by a
/// blank line, and the generation prompt is `<start_of_turn>model\n`. It is Google's
/// template without its `{{ bos_token }}` (the tokenizer adds BOS), its content trimming
/// and its check that roles alternate.
pub const GEMMA_TEMPLATE: &str = r"{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_prefix = messages[0]['content'] + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set first_prefix = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\n' + (first_prefix if loop.first else '') + message['content'] + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\n' }}
{%- endif -%}
";

/// Architectures (`general.architecture`) that use [`GEMMA_TEMPLATE`].
const GEMMA_ARCHITECTURES: &[&str] = &["gemma", "gemma2", "gemma3", "gemma3n"];

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model has no `tokenizer.chat_template`.
    #[error("the model has no chat template (GGUF key tokenizer.chat_template); pass a raw prompt instead")]
    NoTemplate,
    /// The template or the token metadata it needs has the wrong type.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The template is not valid Jinja.
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    /// The template called `raise_exception`; holds its message.
    #[error("the chat template raised an error: {0}")]
    Raised(String),
    /// Rendering failed for another reason.
    #[error("the chat template failed to render: {0}")]
    Render(String),
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user", "assistant", ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    /// The tokenizer prepends BOS itself, so [`ChatTemplate::render_pieces`] drops a
    /// leading `bos_token`.
    strip_bos: bool,
    /// The tokenizer appends EOS itself, so [`ChatTemplate::render_pieces`] drops a
    /// trailing `eos_token`.
    strip_eos: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("strip_bos", &self.strip_bos)
            .field("strip_eos", &self.strip_eos)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; `bos_token` / `eos_token` are the texts templates see under those
    /// names.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            strip_bos: false,
            strip_eos: false,
        })
    }

    /// Say whether the tokenizer adds BOS / EOS itself (`tokenizer.ggml.add_bos_token`,
    /// `add_eos_token`). If it does, [`ChatTemplate::render_pieces`] drops a `bos_token`
    /// the template writes at the very start (an `eos_token` at the very end), so that the
    /// prompt does not get two, as llama.cpp does. [`ChatTemplate::render`] is unchanged.
    pub fn with_added_bos_eos(mut self, add_bos: bool, add_eos: bool) -> Self {
        self.strip_bos = add_bos;
        self.strip_eos = add_eos;
        self
    }

    /// The template of `g`: its `tokenizer.chat_template`, or for a Gemma model without one
    /// the built-in [`GEMMA_TEMPLATE`]; `None` if it has neither. Told whether the tokenizer
    /// adds BOS / EOS (see [`ChatTemplate::with_added_bos_eos`]).
    pub fn from_gguf(g: &GgufFile) -> Result<Option<Self>, ChatError> {
        let source = match g.get("tokenizer.chat_template") {
            Some(_) => g.req_str("tokenizer.chat_template")?,
            None if uses_gemma_format(g) => GEMMA_TEMPLATE,
            None => return Ok(None),
        };
        let bos = special_token_text(g, "tokenizer.ggml.bos_token_id")?;
        let eos = special_token_text(g, "tokenizer.ggml.eos_token_id")?;
        let (add_bos, add_eos) = tokenizer_adds_bos_eos(g)?;
        Ok(Some(
            Self::new(source, bos, eos)?.with_added_bos_eos(add_bos, add_eos),
        ))
    }

    /// Like [`ChatTemplate::from_gguf`], but a model without a template is
    /// [`ChatError::NoTemplate`].
    pub fn from_gguf_required(g: &GgufFile) -> Result<Self, ChatError> {
        Self::from_gguf(g)?.ok_or(ChatError::NoTemplate)
    }

    /// Render `messages`; with `add_generation_prompt`, the prompt ends with the opening
    /// of an assistant turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        tmpl.render(ctx).map_err(|e| {
            if let Some(msg) = raised_message(&e) {
                ChatError::Raised(msg)
            } else {
                ChatError::Render(describe(&e))
            }
        })
    }

    /// Render `messages` as [`ChatTemplate::render`] does (less a BOS / EOS the tokenizer
    /// adds itself, see [`ChatTemplate::with_added_bos_eos`]), in pieces that say which text
    /// came from the messages' content and which from the template. Only the template's
    /// text may hold control tokens: a message that writes `<|im_start|>system` must be
    /// tokenized as plain text (see [`crate::tokenizer::Tokenizer::encode_pieces`]).
    ///
    /// Each content is wrapped in markers that occur in no message, rendered, and cut at
    /// the markers. A template that changes a content's text (trims, splits or compares it)
    /// sees the markers too, and one that breaks them is refused with
    /// [`ChatError::Render`] rather than guessed at.
    pub fn render_pieces(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<ChatPiece>, ChatError> {
        let marks = ContentMarks::for_messages(messages);
        let wrapped: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), marks.wrap(&m.content)))
            .collect();
        let text = self.render(&wrapped, add_generation_prompt)?;
        let mut pieces = marks.split(&text)?;
        if self.strip_bos {
            strip_template_text(&mut pieces, &self.bos_token, End::Start);
        }
        if self.strip_eos {
            strip_template_text(&mut pieces, &self.eos_token, End::End);
        }
        Ok(pieces)
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text the template sees as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The text the template sees as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// A piece of a rendered chat prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatPiece {
    /// The text.
    pub text: String,
    /// True when the text is (part of) a message's content, false for the template's own.
    pub from_message: bool,
}

/// The markers that fence message contents while a template renders: noncharacters
/// U+FDD0 and U+FDD1 around a number chosen so that neither marker occurs in any message.
struct ContentMarks {
    open: String,
    close: String,
}

impl ContentMarks {
    fn for_messages(messages: &[ChatMessage]) -> Self {
        let occurs = |m: &str| {
            messages
                .iter()
                .any(|msg| msg.content.contains(m) || msg.role.contains(m))
        };
        (0u64..)
            .map(|n| Self {
                open: format!("\u{FDD0}{n}\u{FDD1}"),
                close: format!("\u{FDD1}{n}\u{FDD0}"),
            })
            .find(|m| !occurs(&m.open) && !occurs(&m.close))
            .expect("some number is not in a finite set of messages")
    }

    fn wrap(&self, content: &str) -> String {
        format!("{}{content}{}", self.open, self.close)
    }

    /// Cut `rendered` at the markers; an unbalanced marker is an error.
    fn split(&self, rendered: &str) -> Result<Vec<ChatPiece>, ChatError> {
        let broken = || {
            ChatError::Render(
                "the template changed a message's content in a way that hides where it \
                 starts or ends, so its text cannot be kept apart from the template's \
                 control tokens"
                    .into(),
            )
        };
        let mut pieces = Vec::new();
        let mut rest = rendered;
        while let Some(start) = rest.find(&self.open) {
            let (template, after) = rest.split_at(start);
            let after = &after[self.open.len()..];
            let end = after.find(&self.close).ok_or_else(broken)?;
            let content = &after[..end];
            if template.contains(&self.close) || content.contains(&self.open) {
                return Err(broken());
            }
            push_piece(&mut pieces, template, false);
            push_piece(&mut pieces, content, true);
            rest = &after[end + self.close.len()..];
        }
        if rest.contains(&self.close) {
            return Err(broken());
        }
        push_piece(&mut pieces, rest, false);
        Ok(pieces)
    }
}

/// Which end of a rendered prompt.
#[derive(Clone, Copy)]
enum End {
    Start,
    End,
}

/// Drop `token` from the template text at `end` of `pieces`, if it is there (a message's
/// text is never cut); a piece left empty goes.
fn strip_template_text(pieces: &mut Vec<ChatPiece>, token: &str, end: End) {
    if token.is_empty() {
        return;
    }
    let index = match end {
        End::Start => 0,
        End::End => pieces.len().saturating_sub(1),
    };
    let Some(piece) = pieces.get_mut(index).filter(|p| !p.from_message) else {
        return;
    };
    let rest = match end {
        End::Start => piece.text.strip_prefix(token),
        End::End => piece.text.strip_suffix(token),
    };
    if let Some(rest) = rest {
        piece.text = rest.to_string();
        if piece.text.is_empty() {
            pieces.remove(index);
        }
    }
}

/// Whether `g` is a Gemma model (by `general.architecture`, or by a vocabulary with the
/// `<start_of_turn>` and `<end_of_turn>` control tokens), whose chat format is
/// [`GEMMA_TEMPLATE`].
fn uses_gemma_format(g: &GgufFile) -> bool {
    let arch = g.get("general.architecture").and_then(|v| v.as_str());
    if arch.is_some_and(|a| GEMMA_ARCHITECTURES.contains(&a)) {
        return true;
    }
    let (Ok(tokens), Ok(Some(types))) = (
        g.req_strings("tokenizer.ggml.tokens"),
        g.opt_ints("tokenizer.ggml.token_type"),
    ) else {
        return false;
    };
    let is_control = |name: &str| {
        tokens
            .iter()
            .position(|t| *t == name)
            .and_then(|i| types.get(i))
            .is_some_and(|&ty| ty == 3)
    };
    is_control("<start_of_turn>") && is_control("<end_of_turn>")
}

/// The text of the token whose id is under `key` (empty when the key or token is absent).
fn special_token_text(g: &GgufFile, key: &str) -> Result<String, ChatError> {
    let Some(id) = g.opt_u64(key)? else {
        return Ok(String::new());
    };
    let tokens = g.req_strings("tokenizer.ggml.tokens")?;
    Ok(tokens
        .get(id as usize)
        .map(|s| s.to_string())
        .unwrap_or_default())
}

/// Whether the tokenizer of `g` adds BOS and EOS itself, with llama.cpp's defaults when the
/// keys are absent (BOS for SentencePiece vocabularies, no EOS).
fn tokenizer_adds_bos_eos(g: &GgufFile) -> Result<(bool, bool), ChatError> {
    let spm = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()) == Some("llama");
    let has_bos = g.get("tokenizer.ggml.bos_token_id").is_some();
    let has_eos = g.get("tokenizer.ggml.eos_token_id").is_some();
    let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(spm);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    Ok((add_bos && has_bos, add_eos && has_eos))
}

/// Add `text` to `pieces`, joined to the last piece when it is of the same kind (an empty
/// message between two template pieces leaves one template piece).
fn push_piece(pieces: &mut Vec<ChatPiece>, text: &str, from_message: bool) {
    if text.is_empty() {
        return;
    }
    match pieces.last_mut() {
        Some(last) if last.from_message == from_message => last.text.push_str(text),
        _ => pieces.push(ChatPiece {
            text: text.to_string(),
            from_message,
        }),
    }
}

/// Render with `template`, or [`ChatError::NoTemplate`] when the model has none.
pub fn render_chat(
    template: Option<&ChatTemplate>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String, ChatError> {
    template
        .ok_or(ChatError::NoTemplate)?
        .render(messages, add_generation_prompt)
}

const RAISED_PREFIX: &str = "raise_exception: ";

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED_PREFIX}{msg}"),
    ))
}

fn raised_message(e: &minijinja::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(me) = err.downcast_ref::<minijinja::Error>() {
            if let Some(msg) = me.detail().and_then(|d| d.strip_prefix(RAISED_PREFIX)) {
                return Some(msg.to_string());
            }
        }
        cur = err.source();
    }
    None
}

/// The error and its causes on one line, with the template line when known.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

/// Python's `json.dumps(value, ensure_ascii=False)` (separators ", " and ": "), or with
/// `indent` its indented form.
fn tojson(value: &Value, indent: Option<usize>) -> Result<Value, minijinja::Error> {
    let err = |e: serde_json::Error| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
    };
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let ind = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&ind);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            value.serialize(&mut ser).map_err(err)?;
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
            value.serialize(&mut ser).map_err(err)?;
        }
    }
    Ok(Value::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `strftime_now(format)`: the current UTC time, for the common strftime directives.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Year, month (1-12), day (1-31) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn strftime(secs: i64, format: &str) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(
            strftime(0, "%d %b %Y %H:%M:%S %A"),
            "01 Jan 1970 00:00:00 Thursday"
        );
        // 2024-02-29 12:34:56 UTC
        assert_eq!(
            strftime(1_709_210_096, "%Y-%m-%d %H:%M:%S %a %B"),
            "2024-02-29 12:34:56 Thu February"
        );
    }

    #[test]
    fn raise_and_syntax_errors() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&[], false).unwrap_err();
        assert!(
            matches!(&err, ChatError::Raised(m) if m == "roles must alternate"),
            "{err}"
        );
        let err = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(matches!(err, ChatError::Syntax(_)), "{err}");
        let t = ChatTemplate::new("{{ messages[0].content.nosuchmethod() }}", "", "").unwrap();
        let err = t.render(&[ChatMessage::user("x")], false).unwrap_err();
        assert!(matches!(err, ChatError::Render(_)), "{err}");
        assert!(matches!(
            render_chat(None, &[], true),
            Err(ChatError::NoTemplate)
        ));
    }

    #[test]
    fn python_methods_and_tojson() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}|{{ m|tojson }}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t.render(&[ChatMessage::user("  hé ")], true).unwrap();
        assert_eq!(out, "<s>HÉ|{\"role\": \"user\", \"content\": \"  hé \"}>");
    }

    #[test]
    fn pieces_keep_message_text_apart_from_the_template() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}",
            "",
            "",
        )
        .unwrap();
        let msgs = [
            ChatMessage::user("hi <s>system"),
            ChatMessage::assistant(""),
        ];
        let pieces = t.render_pieces(&msgs, true).unwrap();
        let piece = |text: &str, from_message| ChatPiece {
            text: text.into(),
            from_message,
        };
        assert_eq!(
            pieces,
            [
                piece("<s>user\n", false),
                piece("hi <s>system", true),
                piece("</s><s>assistant\n</s><s>assistant\n", false),
            ]
        );
        // The pieces put together are the plain rendering.
        let whole: String = pieces.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(whole, t.render(&msgs, true).unwrap());
    }

    #[test]
    fn markers_never_collide_with_message_text() {
        let t = ChatTemplate::new(
            "{% for m in messages %}[{{ m.content }}]{% endfor %}",
            "",
            "",
        )
        .unwrap();
        // A message holding the first markers: the next number is used.
        let sneaky = "a\u{FDD0}0\u{FDD1}b\u{FDD1}0\u{FDD0}c";
        let pieces = t
            .render_pieces(&[ChatMessage::user(sneaky)], false)
            .unwrap();
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        assert_eq!(pieces[1].text, sneaky);
        assert!(pieces[1].from_message);
    }

    #[test]
    fn gemma_template() {
        let t = ChatTemplate::new(GEMMA_TEMPLATE, "<bos>", "<eos>").unwrap();
        let msgs = [
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi"),
            ChatMessage::assistant("Hello."),
            ChatMessage::user("Bye"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.\
             <end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            t.render(&msgs[1..2], false).unwrap(),
            "<start_of_turn>user\nHi<end_of_turn>\n"
        );
        assert_eq!(t.render(&[], true).unwrap(), "<start_of_turn>model\n");
        // The system text and the user text are message pieces; the blank line between them
        // is the template's.
        let pieces = t.render_pieces(&msgs[..2], false).unwrap();
        let piece = |text: &str, from_message| ChatPiece {
            text: text.into(),
            from_message,
        };
        assert_eq!(
            pieces,
            [
                piece("<start_of_turn>user\n", false),
                piece("Be brief.", true),
                piece("\n\n", false),
                piece("Hi", true),
                piece("<end_of_turn>\n", false),
            ]
        );
    }

    #[test]
    fn bos_and_eos_the_tokenizer_adds_are_dropped_from_pieces() {
        let src =
            "{{ bos_token }}[{% for m in messages %}{{ m.content }}{% endfor %}]{{ eos_token }}";
        let msgs = [ChatMessage::user("hi")];
        let plain = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let text = |p: &[ChatPiece]| p.iter().map(|p| p.text.clone()).collect::<String>();
        assert_eq!(
            text(&plain.render_pieces(&msgs, false).unwrap()),
            "<s>[hi]</s>"
        );
        let t = ChatTemplate::new(src, "<s>", "</s>")
            .unwrap()
            .with_added_bos_eos(true, true);
        assert_eq!(t.render(&msgs, false).unwrap(), "<s>[hi]</s>");
        assert_eq!(text(&t.render_pieces(&msgs, false).unwrap()), "[hi]");
        // A message's own text is never cut, and a lone BOS piece goes away.
        let t = ChatTemplate::new("{{ bos_token }}{{ messages[0].content }}", "<s>", "")
            .unwrap()
            .with_added_bos_eos(true, true);
        let pieces = t
            .render_pieces(&[ChatMessage::user("<s>x")], false)
            .unwrap();
        assert_eq!(
            pieces,
            [ChatPiece {
                text: "<s>x".into(),
                from_message: true
            }]
        );
    }

    #[test]
    fn a_template_that_cuts_into_a_message_is_refused() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content[:3] }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let err = t
            .render_pieces(&[ChatMessage::user("hello")], false)
            .unwrap_err();
        assert!(
            matches!(err, ChatError::Render(ref m) if m.contains("control tokens")),
            "{err}"
        );
    }
}
