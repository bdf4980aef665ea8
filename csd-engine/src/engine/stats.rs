//! The engine's counters, in two kinds: what a server reports about its traffic
//! ([`EngineStats`]), and what the retrieval policy did, for research and benchmarks
//! ([`PolicyStats`]); the engine-wide totals ([`EngineTotals`]) and the engine's accessors
//! of them.

use super::Engine;
use crate::error::SeqId;

/// Traffic counters of one sequence, or of the whole engine: what a serving daemon exports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Bytes read from the device for attention (page groups, padding included).
    pub device_bytes_read: u64,
    /// Bytes sent to the device by appends (whole page groups).
    pub device_bytes_written: u64,
    /// Bytes that crossed the command interface: K/V/q of appends, q and outputs of attends.
    pub boundary_bytes: u64,
    /// Page lookups in the RAM page cache.
    pub cache_lookups: u64,
    /// Of those lookups, the pages the cache held.
    pub cache_hits: u64,
    /// Pages read back that failed their checksum (the store's count; engine totals only).
    pub checksum_failures: u64,
    /// Times the store's device left a failed io_uring for pread/pwrite (engine totals
    /// only).
    pub ring_failovers: u64,
}

impl EngineStats {
    /// Add `s` to these counters (bytes written included).
    pub fn add(&mut self, s: &EngineStats) {
        self.device_bytes_read += s.device_bytes_read;
        self.device_bytes_written += s.device_bytes_written;
        self.boundary_bytes += s.boundary_bytes;
        self.cache_lookups += s.cache_lookups;
        self.cache_hits += s.cache_hits;
    }

    /// The counters gathered since `before` was taken.
    pub fn since(&self, before: &EngineStats) -> EngineStats {
        EngineStats {
            device_bytes_read: self.device_bytes_read - before.device_bytes_read,
            device_bytes_written: self.device_bytes_written - before.device_bytes_written,
            boundary_bytes: self.boundary_bytes - before.boundary_bytes,
            cache_lookups: self.cache_lookups - before.cache_lookups,
            cache_hits: self.cache_hits - before.cache_hits,
            checksum_failures: self
                .checksum_failures
                .saturating_sub(before.checksum_failures),
            ring_failovers: self.ring_failovers.saturating_sub(before.ring_failovers),
        }
    }
}

/// Where the engine's attend calls spent their time (engine-wide, nanoseconds): the
/// benchmarks' per-step breakdown. Time in attend not listed is the attention itself, plus
/// planning and the page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttendProfile {
    /// Attend calls.
    pub calls: u64,
    /// Wall time inside attend.
    pub total_ns: u64,
    /// Sparse page selection (scoring pages against the probe queries).
    pub select_ns: u64,
    /// Estimating the pages sparse steps skipped.
    pub estimate_ns: u64,
    /// The engine's thread waiting for page reads with nothing else to do.
    pub read_wait_ns: u64,
    /// Layer reads queued ahead of their attend.
    pub readahead_queued: u64,
    /// Of those, the ones an attend used.
    pub readahead_used: u64,
}

impl AttendProfile {
    /// The time spent since `before` was taken.
    pub fn since(&self, before: &AttendProfile) -> AttendProfile {
        AttendProfile {
            calls: self.calls - before.calls,
            total_ns: self.total_ns - before.total_ns,
            select_ns: self.select_ns - before.select_ns,
            estimate_ns: self.estimate_ns - before.estimate_ns,
            read_wait_ns: self.read_wait_ns - before.read_wait_ns,
            readahead_queued: self.readahead_queued - before.readahead_queued,
            readahead_used: self.readahead_used - before.readahead_used,
        }
    }

    /// Attention compute and the rest: the time in attend not spent selecting,
    /// estimating or waiting for reads.
    pub fn compute_ns(&self) -> u64 {
        self.total_ns
            .saturating_sub(self.select_ns + self.estimate_ns + self.read_wait_ns)
    }
}

/// A candidate block holding this share of one head's attention marks a retrieval step.
pub(super) const SHARP_SHARE: f64 = 0.2;

/// What the sparse policy did for one sequence, or for the whole engine: per-layer block
/// counts over decode steps, and, with `measure_recall`, how much attention mass they held.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyStats {
    /// Decode steps (single-token attends of layer 0).
    pub decode_steps: u64,
    /// Per layer, over decode steps: blocks attended in total (sinks, recent, selected).
    pub attended_blocks: Vec<u64>,
    /// Per layer: blocks the policy selected among the candidates.
    pub selected_blocks: Vec<u64>,
    /// Per layer: candidate blocks the policy chose from.
    pub candidate_blocks: Vec<u64>,
    /// Most blocks the policy selected in any one decode step, over all layers.
    pub max_step_selected: u64,
    /// Per layer, with `measure_recall`: the summed share of the exact softmax mass held by
    /// what sparse steps attended (averaged over query heads).
    pub recall_sum: Vec<f64>,
    /// Per layer: the number of steps measured.
    pub recall_count: Vec<u64>,
    /// Per layer, with `measure_recall`: the mass an oracle would have held choosing as many
    /// candidate blocks by their exact mass (the ceiling of any scoring at that count).
    pub oracle_recall_sum: Vec<f64>,
    /// Per layer, with `measure_recall`: the relative error of the attention output against
    /// exact attention over every page (mean over query heads).
    pub output_error_sum: Vec<f64>,
    /// Per layer, with `measure_recall`: (step, query head) pairs whose heaviest candidate
    /// block held at least a fifth of the head's exact mass (a retrieval step).
    pub sharp_heads: Vec<u64>,
    /// Per layer: how many of those sharp blocks the step did not attend.
    pub sharp_missed: Vec<u64>,
    /// Of those sharp blocks, how many ranked in the top 1, 4 and 16 by the Quest bound, then
    /// by the mean key.
    pub sharp_found: [u64; 6],
}

impl PolicyStats {
    /// Zeroed counters for `layers` layers.
    pub fn new(layers: usize) -> Self {
        PolicyStats {
            attended_blocks: vec![0; layers],
            selected_blocks: vec![0; layers],
            candidate_blocks: vec![0; layers],
            recall_sum: vec![0.0; layers],
            recall_count: vec![0; layers],
            oracle_recall_sum: vec![0.0; layers],
            output_error_sum: vec![0.0; layers],
            sharp_heads: vec![0; layers],
            sharp_missed: vec![0; layers],
            ..Default::default()
        }
    }

    /// Add `s` to these counters (the step maximum is a maximum).
    pub fn add(&mut self, s: &PolicyStats) {
        self.decode_steps += s.decode_steps;
        self.max_step_selected = self.max_step_selected.max(s.max_step_selected);
        for (a, b) in self.sharp_found.iter_mut().zip(&s.sharp_found) {
            *a += b;
        }
        for (a, b) in [
            (&mut self.attended_blocks, &s.attended_blocks),
            (&mut self.selected_blocks, &s.selected_blocks),
            (&mut self.candidate_blocks, &s.candidate_blocks),
            (&mut self.recall_count, &s.recall_count),
            (&mut self.sharp_heads, &s.sharp_heads),
            (&mut self.sharp_missed, &s.sharp_missed),
        ] {
            add_per_layer(a, b);
        }
        for (a, b) in [
            (&mut self.recall_sum, &s.recall_sum),
            (&mut self.oracle_recall_sum, &s.oracle_recall_sum),
            (&mut self.output_error_sum, &s.output_error_sum),
        ] {
            add_per_layer(a, b);
        }
    }
}

impl PolicyStats {
    /// The block counts gathered since `before` was taken (decode steps, attended, selected
    /// and candidate blocks; the recall sums and the step maximum are not differences and
    /// stay zero).
    pub fn since(&self, before: &PolicyStats) -> PolicyStats {
        let diff = |a: &[u64], b: &[u64]| -> Vec<u64> {
            a.iter()
                .enumerate()
                .map(|(i, x)| x - b.get(i).copied().unwrap_or(0))
                .collect()
        };
        PolicyStats {
            decode_steps: self.decode_steps - before.decode_steps,
            attended_blocks: diff(&self.attended_blocks, &before.attended_blocks),
            selected_blocks: diff(&self.selected_blocks, &before.selected_blocks),
            candidate_blocks: diff(&self.candidate_blocks, &before.candidate_blocks),
            ..Default::default()
        }
    }
}

/// Add per-layer counters `b` into `a`, growing `a` to `b`'s length.
fn add_per_layer<T: Copy + Default + std::ops::AddAssign>(a: &mut Vec<T>, b: &[T]) {
    if a.len() < b.len() {
        a.resize(b.len(), T::default());
    }
    for (x, &y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// Engine-wide figures beyond the per-sequence counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineTotals {
    /// Traffic counters, released sequences included.
    pub stats: EngineStats,
    /// Policy counters, released sequences included.
    pub policy: PolicyStats,
    /// Bytes of pages the RAM page cache holds.
    pub cache_bytes_held: u64,
    /// The page cache's budget in bytes.
    pub cache_budget_bytes: u64,
    /// RAM held by page summaries and activation statistics.
    pub summary_bytes: u64,
    /// Open sequences.
    pub sequences: usize,
}

impl Engine {
    /// Where attend calls spent their time so far.
    pub fn attend_profile(&self) -> AttendProfile {
        AttendProfile {
            read_wait_ns: self.reads.wait_ns,
            readahead_queued: self.reads.ahead_queued,
            ..self.profile
        }
    }

    /// Counters of one open sequence.
    pub fn seq_stats(&self, seq: SeqId) -> Option<EngineStats> {
        self.seqs.get(&seq).map(|s| s.stats)
    }

    /// What the sparse policy did for one open sequence.
    pub fn seq_policy_stats(&self, seq: SeqId) -> Option<&PolicyStats> {
        self.seqs.get(&seq).map(|s| &s.policy)
    }

    /// Engine-wide counters and RAM use.
    pub fn totals(&self) -> EngineTotals {
        let mut stats = self.retired;
        let mut policy = self.retired_policy.clone();
        let mut summary_bytes = 0u64;
        for s in self.seqs.values() {
            stats.add(&s.stats);
            policy.add(&s.policy);
            for l in &s.layers {
                summary_bytes += (l.summ.bytes() + l.act.bytes()) as u64;
            }
        }
        let c = self
            .store
            .read()
            .map(|s| s.counters())
            .unwrap_or_else(|p| p.into_inner().counters());
        stats.device_bytes_written = c.bytes_written;
        stats.checksum_failures = c.checksum_failures;
        stats.ring_failovers = c.ring_failovers;
        EngineTotals {
            stats,
            policy,
            cache_bytes_held: self.cache.held_bytes(),
            cache_budget_bytes: self.cache.budget_bytes(),
            summary_bytes,
            sequences: self.seqs.len(),
        }
    }
}
