//! What a run records: every request, and each phase's server counters.

use super::client::Generated;
use instinfer_proto::v1 as pb;
use serde::Serialize;

/// The phases of a run, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Every question with the cache off: each pays its full prefill.
    Cold,
    /// After ClearCache, every question with USE_AND_STORE: the first stores the document.
    Warm,
    /// After a restart on the same store, every question again with USE_AND_STORE.
    Restart,
    /// A multi-turn chat with USE_AND_STORE.
    ChatCached,
    /// The same turns with the cache off.
    ChatUncached,
}

impl Phase {
    /// Every phase, in run order.
    pub const ALL: [Phase; 5] = [
        Phase::Cold,
        Phase::Warm,
        Phase::Restart,
        Phase::ChatCached,
        Phase::ChatUncached,
    ];

    /// The phase's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Cold => "cold",
            Phase::Warm => "warm",
            Phase::Restart => "restart",
            Phase::ChatCached => "chat-cached",
            Phase::ChatUncached => "chat-uncached",
        }
    }

    /// The cache mode its requests use.
    pub fn cache(self) -> pb::CacheMode {
        match self {
            Phase::Cold | Phase::ChatUncached => pb::CacheMode::Off,
            Phase::Warm | Phase::Restart | Phase::ChatCached => pb::CacheMode::UseAndStore,
        }
    }
}

/// One request and what it returned.
#[derive(Clone, Debug, Serialize)]
pub struct RequestRecord {
    /// Its phase.
    pub phase: Phase,
    /// Position in the phase (0-based).
    pub index: usize,
    /// The question asked (index into the question list); for chat, the turn.
    pub question: usize,
    /// Cache mode sent.
    pub cache: String,
    /// Prompt tokens, as the server counted them.
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// The server's time to first token (from receiving the request).
    pub ttft_ms: f64,
    /// The client's time to first token (from sending the request).
    pub client_ttft_ms: f64,
    /// From sending the request to the end of its stream.
    pub wall_ms: f64,
    /// Decode speed after the first token.
    pub decode_tok_per_s: f64,
    /// Bytes of this sequence's KV written to / read from the device.
    pub kv_bytes_written: u64,
    /// See `kv_bytes_written`.
    pub kv_bytes_read: u64,
    /// Finish reason.
    pub finish: String,
    /// The generated text.
    pub text: String,
    /// The generated token ids.
    pub ids: Vec<u32>,
}

impl RequestRecord {
    /// The record of `g`, request `index` of `phase`, asking question (or turn) `question`.
    pub fn new(phase: Phase, index: usize, question: usize, g: Generated) -> RequestRecord {
        let u = g.usage;
        RequestRecord {
            phase,
            index,
            question,
            cache: phase.cache().as_str_name().to_string(),
            prompt_tokens: u.prompt_tokens,
            cached_tokens: u.cached_tokens,
            generated_tokens: u.generated_tokens,
            ttft_ms: u.time_to_first_token_ms,
            client_ttft_ms: g.client_ttft_ms,
            wall_ms: g.wall_ms,
            decode_tok_per_s: u.decode_tokens_per_second,
            kv_bytes_written: u.kv_bytes_written,
            kv_bytes_read: u.kv_bytes_read,
            finish: g.reason.as_str_name().to_string(),
            text: g.text,
            ids: g.ids,
        }
    }

    /// Same generated tokens and text as `other`.
    pub fn same_output(&self, other: &RequestRecord) -> bool {
        self.ids == other.ids && self.text == other.text
    }
}

/// A phase's requests and how the server's counters moved over it.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseRecord {
    /// The phase.
    pub phase: Phase,
    /// Its requests, in order.
    pub requests: Vec<RequestRecord>,
    /// Wall time of its requests.
    pub wall_s: f64,
    /// GetStats `kv_device_bytes_written` over the phase.
    pub device_bytes_written: u64,
    /// GetStats `kv_device_bytes_read` over the phase.
    pub device_bytes_read: u64,
    /// Prompt tokens looked up in / found in the prefix cache over the phase.
    pub prefix_lookup_tokens: u64,
    /// See `prefix_lookup_tokens`.
    pub prefix_hit_tokens: u64,
    /// Pages evicted from the prefix cache over the phase.
    pub prefix_evicted_pages: u64,
    /// Pages and bytes the prefix cache holds at the end of the phase.
    pub prefix_pages: u64,
    /// See `prefix_pages`.
    pub prefix_bytes: u64,
    /// Entries dropped at recovery, since the daemon started.
    pub prefix_dropped_at_recovery: u64,
    /// Bytes of the store's data area allocated at the end of the phase.
    pub kv_store_bytes_used: u64,
    /// Pages ClearCache dropped before the phase (warm phase).
    pub cleared_pages: Option<u64>,
    /// Seconds from starting the daemon to its first answer (phases that start one).
    pub daemon_ready_s: Option<f64>,
    /// Prefix-cache pages GetStats reported before the phase's first request (restart
    /// phase).
    pub prefix_pages_at_start: Option<u64>,
    /// Pages, and entries dropped, that the daemon's log says it recovered at its start
    /// (restart phase).
    pub recovered_in_log: Option<(u64, u64)>,
}

impl PhaseRecord {
    /// An empty record of `phase`, counters to be filled by [`PhaseRecord::counters`].
    pub fn new(phase: Phase) -> PhaseRecord {
        PhaseRecord {
            phase,
            requests: Vec::new(),
            wall_s: 0.0,
            device_bytes_written: 0,
            device_bytes_read: 0,
            prefix_lookup_tokens: 0,
            prefix_hit_tokens: 0,
            prefix_evicted_pages: 0,
            prefix_pages: 0,
            prefix_bytes: 0,
            prefix_dropped_at_recovery: 0,
            kv_store_bytes_used: 0,
            cleared_pages: None,
            daemon_ready_s: None,
            prefix_pages_at_start: None,
            recovered_in_log: None,
        }
    }

    /// Fill the counters from GetStats before and after the phase (one daemon process).
    pub fn counters(&mut self, before: &pb::Stats, after: &pb::Stats) {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        self.device_bytes_written = d(
            after.kv_device_bytes_written,
            before.kv_device_bytes_written,
        );
        self.device_bytes_read = d(after.kv_device_bytes_read, before.kv_device_bytes_read);
        self.prefix_lookup_tokens = d(after.prefix_lookup_tokens, before.prefix_lookup_tokens);
        self.prefix_hit_tokens = d(after.prefix_hit_tokens, before.prefix_hit_tokens);
        self.prefix_evicted_pages = d(after.prefix_evicted_pages, before.prefix_evicted_pages);
        self.prefix_pages = after.prefix_pages;
        self.prefix_bytes = after.prefix_bytes;
        self.prefix_dropped_at_recovery = after.prefix_dropped_at_recovery;
        self.kv_store_bytes_used = after.kv_store_bytes_used;
    }

    /// The server TTFTs of its requests, in order.
    pub fn ttfts(&self) -> Vec<f64> {
        self.requests.iter().map(|r| r.ttft_ms).collect()
    }

    /// Prompt tokens served from the prefix cache over the phase.
    pub fn cached_tokens(&self) -> u64 {
        self.requests
            .iter()
            .map(|r| u64::from(r.cached_tokens))
            .sum()
    }
}
