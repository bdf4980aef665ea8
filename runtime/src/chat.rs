//! Chat templates: the model's Jinja template (`tokenizer.chat_template`) rendered with
//! minijinja the way Hugging Face `apply_chat_template` renders it (trim_blocks,
//! lstrip_blocks, Python string methods through minijinja-contrib's pycompat, and the
//! `raise_exception`, `strftime_now` and `tojson` helpers templates expect).

use crate::model::gguf::{GgufError, GgufFile};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

const TEMPLATE_NAME: &str = "chat_template";

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
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
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
        })
    }

    /// The template of `g` (`tokenizer.chat_template`), or `None` if it has none.
    pub fn from_gguf(g: &GgufFile) -> Result<Option<Self>, ChatError> {
        if g.get("tokenizer.chat_template").is_none() {
            return Ok(None);
        }
        let source = g.req_str("tokenizer.chat_template")?;
        let token = |key: &str| -> Result<String, ChatError> {
            let Some(id) = g.opt_u64(key)? else {
                return Ok(String::new());
            };
            let tokens = g.req_strings("tokenizer.ggml.tokens")?;
            Ok(tokens
                .get(id as usize)
                .map(|s| s.to_string())
                .unwrap_or_default())
        };
        let bos = token("tokenizer.ggml.bos_token_id")?;
        let eos = token("tokenizer.ggml.eos_token_id")?;
        Self::new(source, bos, eos).map(Some)
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

    /// Render `messages` as [`ChatTemplate::render`] does, in pieces that say which text
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
        marks.split(&text)
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
