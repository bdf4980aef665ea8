//! The figures a run reports (TTFT percentiles, speedups, tokens saved, bytes written,
//! identical outputs), written as JSON and Markdown.

use super::record::{Phase, PhaseRecord, RequestRecord};
use crate::machine::Machine;
use serde::Serialize;
use serde_json::{json, Value};

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// The command line.
    pub command: String,
    /// When it started (UTC, RFC 3339-like, from the system clock).
    pub started: String,
    /// The machine.
    pub machine: Machine,
    /// /proc/loadavg at the end.
    pub load_after: String,
    /// Model file, layers, quantization, KV bytes per token, context.
    pub model: Value,
    /// The document: file, tokens used, tokens of the whole file; the chat's share of it.
    pub document: Value,
    /// Settings: questions, cold questions, chat turns, max tokens, store size.
    pub settings: Value,
    /// The phases, in run order.
    pub phases: Vec<PhaseRecord>,
    /// The daemon's exit statuses at each SIGTERM.
    pub daemon_exits: Vec<String>,
}

/// Nearest-rank percentile of `values` (0 if empty).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// For each of `reqs`, the request of `base` that asked the same question: how many of these
/// pairs have identical output, and how many pairs there are.
pub(super) fn identical_to(reqs: &[RequestRecord], base: &PhaseRecord) -> (usize, usize) {
    reqs.iter()
        .filter_map(|r| {
            let b = base.requests.iter().find(|b| b.question == r.question)?;
            Some(r.same_output(b))
        })
        .fold((0, 0), |(same, n), s| (same + usize::from(s), n + 1))
}

/// The derived figures of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Cold TTFT p50 / p99 (ms) and the count.
    pub cold_p50_ms: f64,
    /// See `cold_p50_ms`.
    pub cold_p99_ms: f64,
    /// See `cold_p50_ms`.
    pub cold_n: usize,
    /// The warm phase's first request (the miss that stores the document).
    pub warm_first_ms: f64,
    /// Its cached tokens.
    pub warm_first_cached_tokens: u32,
    /// Warm TTFT p50 / p99 over the requests after the first, and their count.
    pub warm_p50_ms: f64,
    /// See `warm_p50_ms`.
    pub warm_p99_ms: f64,
    /// See `warm_p50_ms`.
    pub warm_n: usize,
    /// Cached tokens of the warm phase's second request.
    pub warm_second_cached_tokens: u32,
    /// After restart: TTFT p50 / p99 over every request (the first included), the count.
    pub restart_p50_ms: f64,
    /// See `restart_p50_ms`.
    pub restart_p99_ms: f64,
    /// See `restart_p50_ms`.
    pub restart_n: usize,
    /// The first request after the restart: TTFT and cached tokens.
    pub restart_first_ms: f64,
    /// See `restart_first_ms`.
    pub restart_first_cached_tokens: u32,
    /// cold p50 ÷ warm p50, cold p50 ÷ after-restart p50.
    pub speedup_warm: f64,
    /// See `speedup_warm`.
    pub speedup_restart: f64,
    /// Prompt tokens served from the cache instead of prefilled: warm, restart, chat.
    pub saved_tokens_warm: u64,
    /// See `saved_tokens_warm`.
    pub saved_tokens_restart: u64,
    /// See `saved_tokens_warm`.
    pub saved_tokens_chat: u64,
    /// Prompt tokens of those phases in all.
    pub prompt_tokens_warm: u64,
    /// See `prompt_tokens_warm`.
    pub prompt_tokens_restart: u64,
    /// See `prompt_tokens_warm`.
    pub prompt_tokens_chat: u64,
    /// Warm and after-restart requests with a cold counterpart whose output is identical
    /// to it, and how many there are.
    pub identical_warm: (usize, usize),
    /// See `identical_warm`.
    pub identical_restart: (usize, usize),
    /// After-restart requests identical to the same question's warm request (every
    /// question, also those with no cold run).
    pub identical_restart_warm: (usize, usize),
    /// Chat turns identical cached against uncached.
    pub identical_chat: (usize, usize),
    /// Chat: TTFT p50 over the cached turns after the first, and over the uncached turns
    /// after the first.
    pub chat_cached_p50_ms: f64,
    /// See `chat_cached_p50_ms`.
    pub chat_uncached_p50_ms: f64,
}

impl Run {
    /// The record of `phase` (an empty one if it did not run).
    pub fn phase(&self, phase: Phase) -> PhaseRecord {
        self.phases
            .iter()
            .find(|p| p.phase == phase)
            .cloned()
            .unwrap_or_else(|| PhaseRecord::new(phase))
    }

    /// The derived figures.
    pub fn summary(&self) -> Summary {
        let cold = self.phase(Phase::Cold);
        let warm = self.phase(Phase::Warm);
        let restart = self.phase(Phase::Restart);
        let chat = self.phase(Phase::ChatCached);
        let chat_off = self.phase(Phase::ChatUncached);
        let cold_t = cold.ttfts();
        let warm_t = warm.ttfts();
        let warm_rest = warm_t.get(1..).unwrap_or_default();
        let restart_t = restart.ttfts();
        let prompt = |p: &PhaseRecord| p.requests.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let cold_p50 = percentile(&cold_t, 50.0);
        let warm_p50 = percentile(warm_rest, 50.0);
        let restart_p50 = percentile(&restart_t, 50.0);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        Summary {
            cold_p50_ms: cold_p50,
            cold_p99_ms: percentile(&cold_t, 99.0),
            cold_n: cold_t.len(),
            warm_first_ms: warm_t.first().copied().unwrap_or_default(),
            warm_first_cached_tokens: warm.requests.first().map_or(0, |r| r.cached_tokens),
            warm_p50_ms: warm_p50,
            warm_p99_ms: percentile(warm_rest, 99.0),
            warm_n: warm_rest.len(),
            warm_second_cached_tokens: warm.requests.get(1).map_or(0, |r| r.cached_tokens),
            restart_p50_ms: restart_p50,
            restart_p99_ms: percentile(&restart_t, 99.0),
            restart_n: restart_t.len(),
            restart_first_ms: restart_t.first().copied().unwrap_or_default(),
            restart_first_cached_tokens: restart.requests.first().map_or(0, |r| r.cached_tokens),
            speedup_warm: ratio(cold_p50, warm_p50),
            speedup_restart: ratio(cold_p50, restart_p50),
            saved_tokens_warm: warm.cached_tokens(),
            saved_tokens_restart: restart.cached_tokens(),
            saved_tokens_chat: chat.cached_tokens(),
            prompt_tokens_warm: prompt(&warm),
            prompt_tokens_restart: prompt(&restart),
            prompt_tokens_chat: prompt(&chat),
            identical_warm: identical_to(&warm.requests, &cold),
            identical_restart: identical_to(&restart.requests, &cold),
            identical_restart_warm: identical_to(&restart.requests, &warm),
            identical_chat: identical_to(&chat.requests, &chat_off),
            chat_cached_p50_ms: percentile(chat.ttfts().get(1..).unwrap_or_default(), 50.0),
            chat_uncached_p50_ms: percentile(chat_off.ttfts().get(1..).unwrap_or_default(), 50.0),
        }
    }

    /// The whole run and its summary as one JSON object.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        v["summary"] = serde_json::to_value(self.summary()).unwrap_or(Value::Null);
        v["checks"] = self.checks();
        v
    }

    /// The acceptance checks, as measured.
    pub fn checks(&self) -> Value {
        let s = self.summary();
        let all = |(a, b): (usize, usize)| a == b;
        json!({
            "warm_second_cached_tokens": s.warm_second_cached_tokens,
            "restart_first_cached_tokens": s.restart_first_cached_tokens,
            "warm_speedup_at_least_20x": s.speedup_warm >= 20.0,
            "restart_first_request_warm": s.restart_first_cached_tokens > 0,
            "identical_warm": all(s.identical_warm),
            "identical_restart": all(s.identical_restart) && all(s.identical_restart_warm),
            "identical_chat": all(s.identical_chat),
        })
    }
}
