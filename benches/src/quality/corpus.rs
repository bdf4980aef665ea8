//! The prompts' material: long English text as sentence-sized units of token ids, windows of
//! it, and the chat-template frame put around it.

use crate::files::{files_in, DEFAULT_TEXT_DIR};
use anyhow::{bail, ensure, Context, Result};
use instinfer_runtime::chat::{ChatMessage, ChatTemplate};
use instinfer_runtime::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// Long text as sentence-sized units of token ids.
pub struct Corpus {
    /// File names the text came from (names only).
    pub sources: Vec<String>,
    /// Words in the text.
    pub words: usize,
    /// The sentences, each with its leading separator, as token ids.
    pub units: Vec<Vec<u32>>,
    /// Tokens in all units.
    pub tokens: usize,
}

/// Files named by --text (directories expanded), or the files of the default text folder;
/// each real file once.
pub fn text_files(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let roots: Vec<PathBuf> = if given.is_empty() {
        [DEFAULT_TEXT_DIR]
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .collect()
    } else {
        given.to_vec()
    };
    if roots.is_empty() {
        bail!("no long English text found (searched {DEFAULT_TEXT_DIR}); pass --text FILE or --text DIR");
    }
    let mut files = Vec::new();
    for r in roots {
        let meta = std::fs::metadata(&r).with_context(|| format!("reading {}", r.display()))?;
        if meta.is_dir() {
            files.extend(files_in(&r).with_context(|| format!("listing {}", r.display()))?);
        } else {
            files.push(r);
        }
    }
    // Links (GPL -> GPL-3) name a text already taken: keep each real file once.
    let mut out: Vec<PathBuf> = Vec::new();
    for f in files {
        let canon =
            std::fs::canonicalize(&f).with_context(|| format!("resolving {}", f.display()))?;
        if !out.contains(&canon) {
            out.push(canon);
        }
    }
    Ok(out)
}

/// Split text into paragraphs (blank-line separated), whitespace collapsed, then into
/// sentences. Each unit carries its leading separator: "\n" before a paragraph, " " before
/// any other sentence.
fn sentence_units(text: &str) -> Vec<String> {
    let mut units = Vec::new();
    let mut para = String::new();
    for line in text.lines() {
        if line
            .trim_matches(|c: char| c.is_whitespace() || c == '\u{c}')
            .is_empty()
        {
            split_paragraph(&mut para, &mut units);
        } else {
            para.push_str(line);
            para.push(' ');
        }
    }
    split_paragraph(&mut para, &mut units);
    units
}

/// Append the sentences of paragraph `para` (whitespace collapsed) to `units`, and empty it.
fn split_paragraph(para: &mut String, units: &mut Vec<String>) {
    let joined = para.split_whitespace().collect::<Vec<_>>().join(" ");
    para.clear();
    if joined.is_empty() {
        return;
    }
    let mut first = true;
    let mut start = 0;
    let bytes = joined.as_bytes();
    for i in 0..bytes.len() {
        let end_of_sentence =
            matches!(bytes[i], b'.' | b'?' | b'!' | b';') && bytes.get(i + 1) == Some(&b' ');
        if end_of_sentence || i + 1 == bytes.len() {
            let s = joined[start..=i].trim();
            if !s.is_empty() {
                units.push(format!("{}{s}", if first { "\n" } else { " " }));
                first = false;
            }
            start = i + 1;
        }
    }
}

impl Corpus {
    /// The text of `files` (form feeds read as line breaks), tokenized sentence by sentence.
    pub fn load(files: &[PathBuf], tok: &Tokenizer) -> Result<Corpus> {
        let mut sources = Vec::new();
        let mut words = 0;
        let mut units = Vec::new();
        let mut tokens = 0;
        for f in files {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let text = String::from_utf8_lossy(&bytes).replace('\u{c}', "\n");
            words += text.split_whitespace().count();
            for u in sentence_units(&text) {
                let ids = tok
                    .encode_raw(&u, false)
                    .with_context(|| format!("tokenizing text of {}", f.display()))?;
                tokens += ids.len();
                units.push(ids);
            }
            sources.push(file_name(f));
        }
        ensure!(!units.is_empty(), "the text files hold no text");
        Ok(Corpus {
            sources,
            words,
            units,
            tokens,
        })
    }

    /// Exactly `budget` tokens of consecutive units from unit `start` on (wrapping around);
    /// the last unit is cut to fit.
    pub fn window(&self, start: usize, budget: usize) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        let mut left = budget;
        let mut i = start % self.units.len();
        while left > 0 {
            let u = &self.units[i];
            let take = u.len().min(left);
            if take > 0 {
                out.push(u[..take].to_vec());
                left -= take;
            }
            i = (i + 1) % self.units.len();
        }
        out
    }
}

/// The last component of `path`, lossily as text ("" for none).
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Prompt parts around the text: `prefix` (chat template opening and intro, BOS as the model
/// wants) and `suffix` (instruction, template closing, assistant opening).
pub struct Frame {
    /// Tokens before the text.
    pub prefix: Vec<u32>,
    /// Tokens after the text.
    pub suffix: Vec<u32>,
}

impl Frame {
    /// A user message of `intro`, the text and `outro`, rendered with `template`, then the
    /// assistant's turn opened with `answer_prefix`.
    pub fn new(
        tok: &Tokenizer,
        template: &ChatTemplate,
        intro: &str,
        outro: &str,
        answer_prefix: &str,
    ) -> Result<Frame> {
        const MARK: &str = "QUALITYBENCHTEXTMARK";
        let rendered = template
            .render(&[ChatMessage::user(MARK)], true)
            .context("rendering the chat template")?;
        let (before, after) = rendered
            .split_once(MARK)
            .context("the chat template dropped the message text")?;
        let prefix = tok
            .encode(&format!("{before}{intro}"), true)
            .context("tokenizing the prompt opening")?;
        let suffix = tok
            .encode_raw(&format!("{outro}{after}{answer_prefix}"), true)
            .context("tokenizing the prompt closing")?;
        Ok(Frame { prefix, suffix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_keep_their_separators() {
        let text = "First one. Second?\nstill second; third\n\n\u{c}\nNew  para! end.";
        assert_eq!(
            sentence_units(text),
            [
                "\nFirst one.",
                " Second?",
                " still second;",
                " third",
                "\nNew para!",
                " end."
            ]
        );
    }

    #[test]
    fn a_window_wraps_around_and_cuts_the_last_unit() {
        let c = Corpus {
            sources: Vec::new(),
            words: 0,
            units: vec![vec![1, 2], vec![], vec![3, 4, 5]],
            tokens: 5,
        };
        assert_eq!(c.window(2, 6), [vec![3, 4, 5], vec![1, 2], vec![3]]);
        assert_eq!(c.window(4, 1), [vec![3]]);
    }
}
