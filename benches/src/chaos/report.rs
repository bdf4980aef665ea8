//! The chaos run's verdict: each call classified against its reference tokens and the status
//! it should carry, recovery after the kill, the hostile clients' counts; as JSON, a
//! Markdown table, and a PNG timeline.

use super::hostile::{Oversized, ResetFlood, Slowloris};
use super::streams::{Outcome, Tally};
use std::time::{Duration, Instant};
use tonic::Code;

/// The figures of one chaos run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Generate calls made by the stream workers.
    pub calls: usize,
    /// Finished with every token, all equal to the reference.
    pub completed: usize,
    /// Failed with a status that says what happened: DATA_LOSS (a page failed its
    /// checksum), UNAVAILABLE (a read failed), RESOURCE_EXHAUSTED (no room).
    pub failed_right_status: usize,
    /// In flight when the daemon was killed (any transport error is right for them).
    pub cut_by_kill: usize,
    /// Refused with UNAVAILABLE because the daemon was down.
    pub refused_while_down: usize,
    /// Failed with any other status (the first few are in `wrong_status_examples`).
    pub failed_wrong_status: usize,
    /// Examples of wrong statuses.
    pub wrong_status_examples: Vec<String>,
    /// Finished normally but with fewer tokens than asked.
    pub completed_short: usize,
    /// Tokens received, over all calls.
    pub tokens_served: usize,
    /// Tokens received that differ from the reference at their position (must be 0).
    pub wrong_tokens: usize,
    /// Failure codes seen, with counts.
    pub codes: Vec<(String, usize)>,
    /// From SIGKILL until the restarted daemon answered, in seconds.
    pub restart_ready_s: f64,
    /// From SIGKILL until the first token of a call started after it, in seconds.
    pub first_token_after_kill_s: f64,
    /// Jobs whose two reference runs disagreed (left out of the token check).
    pub unstable_reference_jobs: usize,
    /// The slowloris connections.
    pub slowloris: Slowloris,
    /// The reset flood.
    pub reset_flood: ResetFlood,
    /// The oversized prompts.
    pub oversized: Oversized,
    /// Panics in the daemon's log (must be 0).
    pub daemon_panics: usize,
}

/// Whether a call that ended with `code` said what went wrong.
fn right_status(code: Code) -> bool {
    matches!(
        code,
        Code::DataLoss | Code::Unavailable | Code::ResourceExhausted
    )
}

/// Classify every call of `tally`; `kill` and `ready` bound the time the daemon was down.
pub fn classify(
    tally: &Tally,
    refs: &[Vec<u32>],
    unstable: &[usize],
    max_tokens: usize,
    (kill, ready): (Instant, Instant),
) -> Report {
    let mut r = Report {
        calls: tally.calls.len(),
        unstable_reference_jobs: unstable.len(),
        restart_ready_s: ready.duration_since(kill).as_secs_f64(),
        ..Report::default()
    };
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let mut first_after = None::<Instant>;
    for (j, o) in &tally.calls {
        r.tokens_served += o.ids.len();
        if !unstable.contains(j) {
            r.wrong_tokens += wrong_tokens(&o.ids, &refs[*j]);
        }
        if o.started >= kill {
            if let Some(t) = o.first_token {
                first_after = Some(first_after.map_or(t, |f: Instant| f.min(t)));
            }
        }
        match &o.error {
            None if o.ids.len() == max_tokens => r.completed += 1,
            None => r.completed_short += 1,
            Some((code, msg)) => {
                *codes.entry(format!("{code:?}")).or_default() += 1;
                classify_failure(&mut r, o, *code, msg, (kill, ready));
            }
        }
    }
    r.codes = codes.into_iter().collect();
    r.first_token_after_kill_s =
        first_after.map_or(f64::NAN, |t| t.duration_since(kill).as_secs_f64());
    r
}

fn classify_failure(
    r: &mut Report,
    o: &Outcome,
    code: Code,
    msg: &str,
    (kill, ready): (Instant, Instant),
) {
    let in_flight_at_kill = o.started <= kill && o.ended >= kill;
    // A channel notices the new daemon on its next connection attempt: allow it a second.
    let while_down = o.started >= kill && o.started <= ready + Duration::from_secs(1);
    let transport = matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled);
    if in_flight_at_kill {
        r.cut_by_kill += 1;
    } else if while_down && transport && o.ids.is_empty() {
        r.refused_while_down += 1;
    } else if right_status(code) {
        r.failed_right_status += 1;
    } else {
        r.failed_wrong_status += 1;
        if r.wrong_status_examples.len() < 10 {
            let after = |t: Instant| {
                if t >= kill {
                    format!("{:.2} s after", t.duration_since(kill).as_secs_f64())
                } else {
                    format!("{:.2} s before", kill.duration_since(t).as_secs_f64())
                }
            };
            r.wrong_status_examples.push(format!(
                "{code:?}: {msg} (started {} the kill, {} tokens)",
                after(o.started),
                o.ids.len()
            ));
        }
    }
}

/// Tokens of `got` that differ from `want` at their position (extra tokens count too).
fn wrong_tokens(got: &[u32], want: &[u32]) -> usize {
    let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
    differing + got.len().saturating_sub(want.len())
}

/// Per-second counts of completed and failed calls (by end time) from `start`, for the
/// timeline plot.
pub fn timeline(tally: &Tally, start: Instant) -> Vec<(String, Vec<(f64, f64)>)> {
    let secs = tally
        .calls
        .iter()
        .map(|(_, o)| o.ended.duration_since(start).as_secs() as usize)
        .max()
        .unwrap_or(0)
        + 1;
    let (mut ok, mut failed, mut tokens) = (vec![0.0; secs], vec![0.0; secs], vec![0.0; secs]);
    for (_, o) in &tally.calls {
        let s = o.ended.duration_since(start).as_secs() as usize;
        match o.error {
            None => ok[s] += 1.0,
            Some(_) => failed[s] += 1.0,
        }
        tokens[s] += o.ids.len() as f64 / 10.0;
    }
    let pts = |v: Vec<f64>| {
        v.into_iter()
            .enumerate()
            .map(|(i, y)| (i as f64, y))
            .collect()
    };
    vec![
        ("calls completed per second".into(), pts(ok)),
        ("calls failed per second".into(), pts(failed)),
        ("tokens received per second / 10".into(), pts(tokens)),
    ]
}

impl Report {
    /// A Markdown table of the figures.
    pub fn markdown(&self) -> String {
        let rows: Vec<(&str, String)> = vec![
            ("Generate calls by the 32 stream workers", self.calls.to_string()),
            ("completed, every token equal to the fault-free run", self.completed.to_string()),
            ("failed with the right status (DATA_LOSS / UNAVAILABLE / RESOURCE_EXHAUSTED)", self.failed_right_status.to_string()),
            ("in flight at the SIGKILL (cut by it)", self.cut_by_kill.to_string()),
            ("refused while the daemon was down", self.refused_while_down.to_string()),
            ("failed with a wrong status", self.failed_wrong_status.to_string()),
            ("finished early without an error", self.completed_short.to_string()),
            ("tokens served", self.tokens_served.to_string()),
            ("**wrong tokens served**", format!("**{}**", self.wrong_tokens)),
            ("failure codes", format!("{:?}", self.codes)),
            ("SIGKILL → restarted daemon answers", format!("{:.2} s", self.restart_ready_s)),
            ("SIGKILL → first token of a new call", format!("{:.2} s", self.first_token_after_kill_s)),
            ("slowloris connections opened / cut by the server / longest held", format!("{} / {} / {:.1} s", self.slowloris.opened, self.slowloris.cut_by_server, self.slowloris.longest_held_s)),
            ("reset flood: streams reset / connections / ended by the server", format!("{} / {} / {}", self.reset_flood.resets_sent, self.reset_flood.connections, self.reset_flood.ended_by_server)),
            ("oversized prompts sent / RESOURCE_EXHAUSTED / refused while down / cut by the kill / other", format!("{} / {} / {} / {} / {}", self.oversized.sent, self.oversized.refused_right, self.oversized.daemon_down, self.oversized.cut_by_kill, self.oversized.other.len())),
            ("panics in the daemon's log", self.daemon_panics.to_string()),
        ];
        let mut s = String::from("| | |\n|---|---|\n");
        for (k, v) in rows {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        s
    }
}
