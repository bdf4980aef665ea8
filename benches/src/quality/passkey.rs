//! Passkey retrieval: a random 5-digit key hidden at several depths of a window of long text,
//! the question after the text; greedy answers of `full` and of every sparse policy. The
//! prompts of one window share their prefix up to the needle: a trunk sequence grows through
//! the text and is cloned at each depth.

use super::corpus::Frame;
use super::session::Session;
use super::stats::{sharp_missed, LayerAgg, Recall};
use super::Inputs;
use anyhow::{ensure, Context, Result};
use instinfer_runtime::kv::SeqId;
use rand::Rng;
use rand_chacha::ChaCha12Rng;
use serde::Serialize;

/// The text before the long context.
pub const PASSKEY_INTRO: &str = "There is a pass key hidden inside a lot of irrelevant text below. Find it and memorize it. I will ask you what the pass key is.\n";
/// The question after the long context.
pub const PASSKEY_QUESTION: &str =
    "\n\nWhat is the pass key? Answer with the five-digit number only.";

/// The sentence hiding `key` in the text.
pub fn needle(key: &str) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key.")
}

/// One sparse policy's answer to one passkey prompt.
#[derive(Serialize)]
pub struct SparseAnswer {
    /// The policy's name.
    pub variant: String,
    /// The answer, with the answer prefix.
    pub answer: String,
    /// Whether the answer holds the key.
    pub correct: bool,
    /// Whether the answer's tokens are full's.
    pub same_as_full: bool,
    /// The run's recall figures.
    #[serde(flatten)]
    pub recall: Recall,
    /// Per layer with any: "layer:missed/sharp" for heads whose heaviest block held >= 20%.
    pub sharp_missed: String,
}

/// One passkey prompt and its answers.
#[derive(Serialize)]
pub struct PasskeyTrial {
    /// Total length in tokens (prompt plus answer budget).
    pub length: usize,
    /// The trial (text window) of this length.
    pub trial: usize,
    /// The depth asked for, in percent of the text.
    pub depth_pct: u32,
    /// Where the needle actually starts, as a share of the text (sentence boundaries).
    pub actual_depth: f64,
    /// The corpus unit the text window starts at.
    pub text_start_unit: usize,
    /// The key hidden.
    pub key: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Full's answer, with the answer prefix.
    pub full_answer: String,
    /// Whether full's answer holds the key.
    pub full_correct: bool,
    /// Each sparse policy's answer.
    pub sparse: Vec<SparseAnswer>,
}

/// One sparse policy's score at one length.
#[derive(Serialize)]
pub struct VariantScore {
    /// The policy's name.
    pub variant: String,
    /// Trials it answered correctly.
    pub correct: usize,
    /// `correct` over the trials.
    pub accuracy: f64,
    /// Trials where the sparse answer is the same text as full's.
    pub same_answer: usize,
}

/// The scores at one length.
#[derive(Serialize)]
pub struct PasskeyLength {
    /// Total length in tokens.
    pub length: usize,
    /// Prompts asked (trials times depths).
    pub trials: usize,
    /// Prompts full answered correctly.
    pub full_correct: usize,
    /// `full_correct` over the prompts.
    pub full_accuracy: f64,
    /// Each sparse policy's score.
    pub sparse: Vec<VariantScore>,
}

/// The text of an answer on one line.
fn show(s: &str) -> String {
    s.trim().replace('\n', "⏎")
}

impl PasskeyTrial {
    /// The trial's console line: the key, then each answer, right or wrong.
    fn line(&self) -> String {
        let mark = |ok: bool| if ok { "ok  " } else { "MISS" };
        let mut line = format!(
            "passkey {:>5} trial {} depth {:>3}% key {}: full {} {:?}",
            self.length,
            self.trial + 1,
            self.depth_pct,
            self.key,
            mark(self.full_correct),
            show(&self.full_answer),
        );
        for s in &self.sparse {
            line.push_str(&format!(
                " | {} {} {:?}{}",
                s.variant,
                mark(s.correct),
                show(&s.answer),
                s.recall
                    .line()
                    .map(|x| format!(" {x} sharp missed {}", s.sharp_missed))
                    .unwrap_or_default()
            ));
        }
        line
    }
}

/// One trial's prompts: a window of text and, per depth, a key and where its needle goes.
struct Trial {
    length: usize,
    trial: usize,
    keys: Vec<String>,
    needles: Vec<Vec<u32>>,
    start: usize,
    /// Tokens of text in the window.
    text_tokens: usize,
    window: Vec<Vec<u32>>,
    /// Token offsets of the window's unit boundaries (0 first, the window's length last).
    bounds: Vec<usize>,
    /// Per depth: the unit boundary the needle goes at.
    insert_at: Vec<usize>,
}

/// The passkey measurement of one run.
struct Passkey<'c> {
    inp: &'c Inputs<'c>,
    /// The prompt around the text.
    frame: Frame,
    /// The depths asked for, sorted, each once.
    depths: Vec<u32>,
}

/// Ask every passkey prompt of the flags (keys and text windows drawn from `rng`) of full
/// and of every policy; each policy's counters are summed per length into `agg`.
pub fn passkey(
    s: &mut Session<'_>,
    inp: &Inputs<'_>,
    rng: &mut ChaCha12Rng,
    agg: &mut [Vec<(usize, LayerAgg)>],
) -> Result<Vec<PasskeyTrial>> {
    let opts = inp.opts;
    let frame = Frame::new(
        s.tok,
        inp.template,
        PASSKEY_INTRO,
        PASSKEY_QUESTION,
        &opts.answer_prefix,
    )?;
    let mut depths = opts.depths.clone();
    depths.sort_unstable();
    depths.dedup();
    let run = Passkey { inp, frame, depths };
    let mut out = Vec::new();
    for &length in &opts.lengths {
        let mut laggs = vec![LayerAgg::default(); inp.names.len()];
        for trial in 0..opts.trials {
            let plan = run.draw(s, length, trial, rng)?;
            run.trial(s, &plan, &mut laggs, &mut out)?;
        }
        for (v, l) in laggs.into_iter().enumerate() {
            agg[v].push((length, l));
        }
    }
    Ok(out)
}

impl Passkey<'_> {
    /// Draw a trial's keys (one per depth), then its text window.
    fn draw(
        &self,
        s: &Session<'_>,
        length: usize,
        trial: usize,
        rng: &mut ChaCha12Rng,
    ) -> Result<Trial> {
        let keys: Vec<String> = self
            .depths
            .iter()
            .map(|_| rng.random_range(10000u32..=99999).to_string())
            .collect();
        let needles: Vec<Vec<u32>> = keys
            .iter()
            .map(|k| s.tok.encode_raw(&needle(k), false))
            .collect::<Result<_, _>>()
            .context("tokenizing the needle")?;
        let needle_max = needles.iter().map(Vec::len).max().unwrap_or(0);
        let fixed = self.frame.prefix.len()
            + self.frame.suffix.len()
            + needle_max
            + self.inp.opts.answer_tokens;
        ensure!(
            length > fixed + 64,
            "passkey length {length} leaves no room for text ({fixed} tokens of frame, needle and answer)"
        );
        let text_tokens = length - fixed;
        let corpus = self.inp.corpus;
        let start = rng.random_range(0..corpus.units.len());
        let window = corpus.window(start, text_tokens);
        let mut bounds = vec![0usize];
        for u in &window {
            bounds.push(bounds.last().unwrap() + u.len());
        }
        let insert_at: Vec<usize> = self
            .depths
            .iter()
            .map(|&d| {
                let target = text_tokens as f64 * d as f64 / 100.0;
                (0..bounds.len())
                    .min_by(|&a, &c| {
                        (bounds[a] as f64 - target)
                            .abs()
                            .total_cmp(&(bounds[c] as f64 - target).abs())
                    })
                    .unwrap_or(0)
            })
            .collect();
        Ok(Trial {
            length,
            trial,
            keys,
            needles,
            start,
            text_tokens,
            window,
            bounds,
            insert_at,
        })
    }

    /// Ask the trial's prompts, one per depth, growing the trunk through the text.
    fn trial(
        &self,
        s: &mut Session<'_>,
        plan: &Trial,
        laggs: &mut [LayerAgg],
        out: &mut Vec<PasskeyTrial>,
    ) -> Result<()> {
        s.pb.set_message(format!("passkey {} trial {}", plan.length, plan.trial + 1));
        let trunk = s.open_all()?;
        s.prefill(trunk, &self.frame.prefix)?;
        let mut trunk_units = 0;
        for di in 0..self.depths.len() {
            let at = plan.insert_at[di];
            let grow: Vec<u32> = plan.window[trunk_units..at].concat();
            if !grow.is_empty() {
                s.prefill(trunk, &grow)?;
            }
            trunk_units = at;
            let t = self.ask(s, plan, trunk, di, laggs)?;
            s.say(t.line());
            out.push(t);
        }
        s.release(trunk);
        Ok(())
    }

    /// The prompt of depth `di`: a branch of `trunk` (the text up to the needle) gets the
    /// needle and the rest, then full and every policy answer.
    fn ask(
        &self,
        s: &mut Session<'_>,
        plan: &Trial,
        trunk: SeqId,
        di: usize,
        laggs: &mut [LayerAgg],
    ) -> Result<PasskeyTrial> {
        let (opts, frame) = (self.inp.opts, &self.frame);
        let at = plan.insert_at[di];
        let branch = s.branch(trunk)?;
        let mut rest = plan.needles[di].clone();
        rest.extend(plan.window[at..].concat());
        rest.extend_from_slice(&frame.suffix);
        let prompt_tokens = frame.prefix.len() + plan.bounds[at] + rest.len();
        let first = s.prefill(branch, &rest)?;
        let set = s.split(branch)?;
        let ids = s.answers(&set, first, opts.answer_tokens)?;
        let key = &plan.keys[di];
        let texts: Vec<String> = ids.iter().map(|a| s.tok.decode(a)).collect();
        let mut sparse = Vec::new();
        for (v, name) in self.inp.names.iter().enumerate() {
            let st = s.eng.stats(set[v + 1])?;
            laggs[v].add(&st);
            sparse.push(SparseAnswer {
                variant: name.clone(),
                answer: format!("{}{}", opts.answer_prefix, texts[v + 1]),
                correct: texts[v + 1].contains(key.as_str()),
                same_as_full: ids[v + 1] == ids[0],
                recall: Recall::of(&st),
                sharp_missed: sharp_missed(&st),
            });
        }
        for &seq in &set {
            s.release(seq);
        }
        Ok(PasskeyTrial {
            length: plan.length,
            trial: plan.trial,
            depth_pct: self.depths[di],
            actual_depth: plan.bounds[at] as f64 / plan.text_tokens as f64,
            text_start_unit: plan.start,
            key: key.clone(),
            prompt_tokens,
            full_answer: format!("{}{}", opts.answer_prefix, texts[0]),
            full_correct: texts[0].contains(key.as_str()),
            sparse,
        })
    }
}

/// Per length of `lengths`: how many prompts full and each policy of `names` answered right.
pub fn summary(trials: &[PasskeyTrial], lengths: &[usize], names: &[String]) -> Vec<PasskeyLength> {
    lengths
        .iter()
        .map(|&length| {
            let t: Vec<&PasskeyTrial> = trials.iter().filter(|t| t.length == length).collect();
            let n = t.len();
            let f = t.iter().filter(|t| t.full_correct).count();
            let sparse = names
                .iter()
                .enumerate()
                .map(|(v, name)| {
                    let c = t.iter().filter(|t| t.sparse[v].correct).count();
                    VariantScore {
                        variant: name.clone(),
                        correct: c,
                        accuracy: c as f64 / n.max(1) as f64,
                        same_answer: t.iter().filter(|t| t.sparse[v].same_as_full).count(),
                    }
                })
                .collect();
            PasskeyLength {
                length,
                trials: n,
                full_correct: f,
                full_accuracy: f as f64 / n.max(1) as f64,
                sparse,
            }
        })
        .collect()
}
