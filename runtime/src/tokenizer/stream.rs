//! Incremental decoding: bytes (or token ids) in, complete UTF-8 text out.

use super::Tokenizer;

/// Turns a stream of byte chunks into text, holding back a character whose bytes have not
/// all arrived yet. An invalid byte sequence becomes U+FFFD (one per maximal invalid
/// subsequence, as [`String::from_utf8_lossy`] does), so the concatenated output always
/// equals the lossy decoding of all bytes pushed.
#[derive(Clone, Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// An empty stream with nothing held back.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add bytes; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        self.drain(&mut out, false);
        out
    }

    /// Flush what is held back; an incomplete character at the end becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        self.drain(&mut out, true);
        out
    }

    /// Bytes held back waiting for the rest of a character (at most 3).
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    fn drain(&mut self, out: &mut String, at_end: bool) {
        let mut start = 0;
        while start < self.pending.len() {
            let rest = &self.pending[start..];
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid UTF-8, so this borrows without replacing anything.
                    out.push_str(&String::from_utf8_lossy(&rest[..valid]));
                    start += valid;
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += n;
                        }
                        None => {
                            // A character cut short by the end of the input so far.
                            if at_end {
                                out.push(char::REPLACEMENT_CHARACTER);
                                start = self.pending.len();
                            }
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }
}

/// Decodes generated token ids one at a time into complete UTF-8 text.
#[derive(Clone, Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    utf8: Utf8Stream,
    render_special: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder over `tok`'s vocabulary with nothing held back; control tokens decode to nothing.
    pub fn new(tok: &'a Tokenizer) -> Self {
        Self {
            tok,
            utf8: Utf8Stream::new(),
            render_special: false,
        }
    }

    /// Also emit the text of control tokens (off by default: they decode to nothing).
    pub fn render_special(mut self, yes: bool) -> Self {
        self.render_special = yes;
        self
    }

    /// Add one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let bytes = self.tok.token_piece(id, self.render_special);
        self.utf8.push(bytes)
    }

    /// Flush what is held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        self.utf8.finish()
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.utf8.pending().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = Utf8Stream::new();
        let mut v: Vec<String> = chunks.iter().map(|c| s.push(c)).collect();
        v.push(s.finish());
        v
    }

    #[test]
    fn split_char_is_held() {
        let rocket = "🚀".as_bytes();
        let out = run(&[b"a", &rocket[..1], &rocket[1..3], &rocket[3..], b"b"]);
        assert_eq!(out, ["a", "", "", "🚀", "b", ""]);
    }

    #[test]
    fn invalid_bytes_are_replaced() {
        // A lead byte followed by ASCII: invalid, replaced, and the ASCII is kept.
        assert_eq!(run(&[&[0xE6], b"x"]), ["", "\u{FFFD}x", ""]);
        // A stray continuation byte.
        assert_eq!(run(&[&[0x80, b'y']]), ["\u{FFFD}y", ""]);
        // Cut short at the end.
        assert_eq!(run(&[b"z", &[0xF0, 0x9F]]), ["z", "", "\u{FFFD}"]);
        let all: Vec<u8> = [0xE6u8, b'x', 0x80, 0xF0, 0x9F].to_vec();
        assert_eq!(
            run(&[&all[..1], &all[1..3], &all[3..]]).concat(),
            String::from_utf8_lossy(&all)
        );
    }
}
