//! Greedy agreement of the sparse policies with `full` over N decode steps, on long excerpts
//! followed by an instruction. `full` generates greedily and its tokens are fed to every
//! sparse sequence (teacher forcing); every position where a policy's argmax equals full's
//! token counts. The first mismatch is where a free-running sparse generation would leave
//! full's, so the matching prefix of the teacher-forced run is the free-running one.

use super::corpus::Frame;
use super::session::Session;
use super::stats::{LayerAgg, Recall};
use super::Inputs;
use anyhow::{ensure, Result};
use instinfer_runtime::kv::SeqId;
use rand::Rng;
use rand_chacha::ChaCha12Rng;
use serde::Serialize;

/// One sparse policy's agreement on one prompt.
#[derive(Serialize)]
pub struct SparseAgreement {
    /// The policy's name.
    pub variant: String,
    /// Teacher-forced: positions where sparse's argmax equals full's token.
    pub matches: usize,
    /// `matches` over the decode steps.
    pub agreement: f64,
    /// Free-running: decode steps before the first mismatch.
    pub matching_prefix: usize,
    /// The run's recall figures.
    #[serde(flatten)]
    pub recall: Recall,
}

/// One agreement prompt and how each policy followed full on it.
#[derive(Serialize)]
pub struct AgreementRun {
    /// Total length in tokens (prompt plus generated tokens).
    pub length: usize,
    /// The prompt's index at this length.
    pub prompt: usize,
    /// "summarize" or "continue".
    pub instruction: &'static str,
    /// The corpus unit the text starts at.
    pub text_start_unit: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Decode steps compared (the first generated token comes from the exact prefill).
    pub steps: usize,
    /// Position (in full's generated tokens) of its first end-of-generation token, if any.
    pub full_first_eog: Option<usize>,
    /// Full's generated text.
    pub full_text: String,
    /// Each sparse policy's agreement.
    pub sparse: Vec<SparseAgreement>,
}

/// The instructions after the text, by name; prompts take them in turn.
const AGREE_INSTRUCTIONS: [(&str, &str); 2] = [
    ("summarize", "\n\nSummarize the text above in detail."),
    ("continue", "\n\nContinue the text above."),
];

impl AgreementRun {
    /// The run's console line: each policy's matches and matching prefix.
    fn line(&self) -> String {
        let mut line = format!(
            "agreement {:>5} {:<9} prompt {} tokens:",
            self.length, self.instruction, self.prompt_tokens
        );
        for s in &self.sparse {
            line.push_str(&format!(
                " | {} {}/{} = {:.3}, prefix {}{}",
                s.variant,
                s.matches,
                self.steps,
                s.agreement,
                s.matching_prefix,
                s.recall
                    .line()
                    .map(|x| format!(", {x}"))
                    .unwrap_or_default()
            ));
        }
        line
    }
}

/// Run every agreement prompt of the flags (text offsets drawn from `rng`) on full and every
/// policy; each policy's counters are summed per length into `agg`.
pub fn agreement(
    s: &mut Session<'_>,
    inp: &Inputs<'_>,
    rng: &mut ChaCha12Rng,
    agg: &mut [Vec<(usize, LayerAgg)>],
) -> Result<Vec<AgreementRun>> {
    let (opts, corpus, names) = (inp.opts, inp.corpus, inp.names);
    let intro = "Read the following text.\n";
    let frames: Vec<Frame> = AGREE_INSTRUCTIONS
        .iter()
        .map(|(_, outro)| Frame::new(s.tok, inp.template, intro, outro, ""))
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for &length in &opts.agree_lengths {
        let mut laggs = vec![LayerAgg::default(); names.len()];
        for p in 0..opts.agree_prompts {
            let which = p % AGREE_INSTRUCTIONS.len();
            let fr = &frames[which];
            let fixed = fr.prefix.len() + fr.suffix.len() + opts.agree_tokens + 1;
            ensure!(
                length > fixed + 64,
                "agreement length {length} leaves no room for text"
            );
            let start = rng.random_range(0..corpus.units.len());
            let mut prompt = fr.prefix.clone();
            prompt.extend(corpus.window(start, length - fixed).concat());
            prompt.extend_from_slice(&fr.suffix);
            s.pb.set_message(format!("agreement {length} prompt {}", p + 1));
            let n = opts.agree_tokens;
            let (full_ids, sparse) = compare(s, &prompt, n, names, &mut laggs)?;
            let run = AgreementRun {
                length,
                prompt: p,
                instruction: AGREE_INSTRUCTIONS[which].0,
                text_start_unit: start,
                prompt_tokens: prompt.len(),
                steps: n,
                full_first_eog: full_ids.iter().position(|&t| s.tok.is_eog(t)),
                full_text: s.tok.decode(&full_ids),
                sparse,
            };
            s.say(run.line());
            out.push(run);
        }
        for (v, l) in laggs.into_iter().enumerate() {
            agg[v].push((length, l));
        }
    }
    Ok(out)
}

/// Prefill `prompt`, decode `n` steps of full greedily with every policy of `names`
/// teacher-forced on full's tokens, and count the matches; each policy's counters are added
/// to `laggs`. Returns full's tokens and each policy's agreement.
fn compare(
    s: &mut Session<'_>,
    prompt: &[u32],
    n: usize,
    names: &[String],
    laggs: &mut [LayerAgg],
) -> Result<(Vec<u32>, Vec<SparseAgreement>)> {
    let full = s.open_all()?;
    let first = s.prefill(full, prompt)?;
    let set = s.split(full)?;
    let forced = teacher_forced(s, &set, first, n)?;
    let mut sparse = Vec::new();
    for (v, name) in names.iter().enumerate() {
        let st = s.eng.stats(set[v + 1])?;
        laggs[v].add(&st);
        sparse.push(SparseAgreement {
            variant: name.clone(),
            matches: forced.matches[v],
            agreement: forced.matches[v] as f64 / n.max(1) as f64,
            matching_prefix: forced.first_mismatch[v].unwrap_or(n),
            recall: Recall::of(&st),
        });
    }
    for &seq in &set {
        s.release(seq);
    }
    Ok((forced.full_ids, sparse))
}

/// What a teacher-forced run of the policies along full found.
struct Forced {
    /// Full's tokens: the prefill's and one per step.
    full_ids: Vec<u32>,
    /// Per policy: steps where its argmax was full's.
    matches: Vec<usize>,
    /// Per policy: the first step where it was not.
    first_mismatch: Vec<Option<usize>>,
}

/// `n` decode steps from `first` of full (`set[0]`) greedily and of each policy
/// (`set[v + 1]`) fed full's tokens.
fn teacher_forced(s: &mut Session<'_>, set: &[SeqId], first: u32, n: usize) -> Result<Forced> {
    let policies = set.len() - 1;
    let mut f = Forced {
        full_ids: vec![first],
        matches: vec![0; policies],
        first_mismatch: vec![None; policies],
    };
    for j in 0..n {
        let t = f.full_ids[j];
        let items: Vec<(SeqId, u32)> = set.iter().map(|&seq| (seq, t)).collect();
        let got = s.step(&items)?;
        for v in 0..policies {
            if got[v + 1] == got[0] {
                f.matches[v] += 1;
            } else if f.first_mismatch[v].is_none() {
                f.first_mismatch[v] = Some(j);
            }
        }
        f.full_ids.push(got[0]);
    }
    Ok(f)
}
