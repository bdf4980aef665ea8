//! What the engine's policy counters say about sparse runs: per-run means over layers of the
//! attention-mass recall and output error, and per-layer figures summed over many runs.

use csd_engine::PolicyStats;
use serde::Serialize;

/// Per layer, `sum / count` where anything was counted.
fn per_layer(sum: &[f64], count: &[u64]) -> Vec<Option<f64>> {
    sum.iter()
        .zip(count)
        .map(|(&s, &c)| (c > 0).then(|| s / c as f64))
        .collect()
}

/// Mean over the layers where anything was counted of `sum / count`.
fn mean_per_layer(sum: &[f64], count: &[u64]) -> Option<f64> {
    let v: Vec<f64> = per_layer(sum, count).into_iter().flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// One sparse run's recall figures, means over layers (none where recall was not measured).
#[derive(Serialize, Clone, Copy)]
pub struct Recall {
    /// Mean over layers of this run's attention-mass recall.
    pub recall: Option<f64>,
    /// What an oracle choosing as many pages by their exact mass would have held.
    pub oracle_recall: Option<f64>,
    /// Relative error of the attention outputs against exact attention, mean over layers.
    pub output_error: Option<f64>,
}

impl Recall {
    /// The figures of a run's counters.
    pub fn of(st: &PolicyStats) -> Recall {
        Recall {
            recall: mean_per_layer(&st.recall_sum, &st.recall_count),
            oracle_recall: mean_per_layer(&st.oracle_recall_sum, &st.recall_count),
            output_error: mean_per_layer(&st.output_error_sum, &st.recall_count),
        }
    }

    /// "recall R (oracle O) err E", when all three were measured.
    pub fn line(&self) -> Option<String> {
        self.recall
            .zip(self.oracle_recall)
            .zip(self.output_error)
            .map(|((r, o), e)| format!("recall {r:.3} (oracle {o:.3}) err {e:.3}"))
    }
}

/// "layer:missed/sharp" for the layers where a head's heaviest block was skipped, then how
/// many sharp heads quest and mean-key scoring found in their top 1, 4 and 16.
pub fn sharp_missed(st: &PolicyStats) -> String {
    let parts: Vec<String> = st
        .sharp_heads
        .iter()
        .zip(&st.sharp_missed)
        .enumerate()
        .filter(|(_, (_, &m))| m > 0)
        .map(|(l, (h, m))| format!("{l}:{m}/{h}"))
        .collect();
    format!(
        "{} found quest/mean top1 {}/{} top4 {}/{} top16 {}/{} of {}",
        parts.join(","),
        st.sharp_found[0],
        st.sharp_found[3],
        st.sharp_found[1],
        st.sharp_found[4],
        st.sharp_found[2],
        st.sharp_found[5],
        st.sharp_heads.iter().sum::<u64>()
    )
}

/// Per-layer policy counters summed over sparse runs.
#[derive(Clone, Debug, Default)]
pub struct LayerAgg {
    /// Runs added.
    pub runs: usize,
    steps: u64,
    attended: Vec<u64>,
    selected: Vec<u64>,
    candidates: Vec<u64>,
    recall_sum: Vec<f64>,
    oracle_sum: Vec<f64>,
    recall_count: Vec<u64>,
    max_step_selected: u64,
}

impl LayerAgg {
    /// Adds one run's counters.
    pub fn add(&mut self, s: &PolicyStats) {
        let layers = s.attended_blocks.len();
        if self.attended.is_empty() {
            self.attended = vec![0; layers];
            self.selected = vec![0; layers];
            self.candidates = vec![0; layers];
            self.recall_sum = vec![0.0; layers];
            self.oracle_sum = vec![0.0; layers];
            self.recall_count = vec![0; layers];
        }
        self.runs += 1;
        self.steps += s.decode_steps;
        self.max_step_selected = self.max_step_selected.max(s.max_step_selected);
        for l in 0..layers {
            self.attended[l] += s.attended_blocks[l];
            self.selected[l] += s.selected_blocks[l];
            self.candidates[l] += s.candidate_blocks[l];
            self.recall_sum[l] += s.recall_sum.get(l).copied().unwrap_or(0.0);
            self.oracle_sum[l] += s.oracle_recall_sum.get(l).copied().unwrap_or(0.0);
            self.recall_count[l] += s.recall_count.get(l).copied().unwrap_or(0);
        }
    }

    /// Adds another sum.
    pub fn merge(&mut self, o: &LayerAgg) {
        if self.attended.is_empty() {
            *self = o.clone();
            return;
        }
        self.runs += o.runs;
        self.steps += o.steps;
        self.max_step_selected = self.max_step_selected.max(o.max_step_selected);
        for l in 0..self.attended.len().min(o.attended.len()) {
            self.attended[l] += o.attended[l];
            self.selected[l] += o.selected[l];
            self.candidates[l] += o.candidates[l];
            self.recall_sum[l] += o.recall_sum[l];
            self.oracle_sum[l] += o.oracle_sum[l];
            self.recall_count[l] += o.recall_count[l];
        }
    }

    /// Per-layer means over the decode steps, and their spread over layers.
    pub fn report(&self) -> LayerReport {
        let per_step = |v: &[u64]| -> Vec<f64> {
            v.iter()
                .map(|&x| x as f64 / self.steps.max(1) as f64)
                .collect()
        };
        let recall = per_layer(&self.recall_sum, &self.recall_count);
        let oracle = per_layer(&self.oracle_sum, &self.recall_count);
        let attended = per_step(&self.attended);
        let selected = per_step(&self.selected);
        let selected_spread = Spread::of(&selected);
        LayerReport {
            runs: self.runs,
            decode_steps: self.steps,
            mean_recall: mean_per_layer(&self.recall_sum, &self.recall_count),
            mean_oracle_recall: mean_per_layer(&self.oracle_sum, &self.recall_count),
            min_layer_recall: recall.iter().flatten().copied().reduce(f64::min),
            selected_spread,
            attended_spread: Spread::of(&attended),
            counts_vary_across_layers: selected_spread.max - selected_spread.min >= 1.0,
            max_step_selected: self.max_step_selected,
            recall,
            oracle_recall: oracle,
            attended_per_step: attended,
            selected_per_step: selected,
            candidates_per_step: per_step(&self.candidates),
        }
    }
}

/// How a per-layer figure spreads over the layers.
#[derive(Serialize, Clone, Copy)]
pub struct Spread {
    /// The smallest value.
    pub min: f64,
    /// Its layer (the first of equals).
    pub min_layer: usize,
    /// The largest value.
    pub max: f64,
    /// Its layer (the first of equals).
    pub max_layer: usize,
    /// The mean over layers.
    pub mean: f64,
    /// Coefficient of variation over layers.
    pub cv: f64,
}

impl Spread {
    /// The spread of `v` (all zero when empty).
    fn of(v: &[f64]) -> Spread {
        let (mut lo, mut hi) = (0, 0);
        for i in 0..v.len() {
            if v[i] < v[lo] {
                lo = i;
            }
            if v[i] > v[hi] {
                hi = i;
            }
        }
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len().max(1) as f64;
        Spread {
            min: v.get(lo).copied().unwrap_or(0.0),
            min_layer: lo,
            max: v.get(hi).copied().unwrap_or(0.0),
            max_layer: hi,
            mean,
            cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
        }
    }
}

/// Per-layer figures of summed sparse runs (see [`LayerAgg::report`]).
#[derive(Serialize)]
pub struct LayerReport {
    /// Runs summed.
    pub runs: usize,
    /// Decode steps summed.
    pub decode_steps: u64,
    /// Mean over layers of the attention-mass recall.
    pub mean_recall: Option<f64>,
    /// The recall of an oracle choosing as many candidate pages by their exact mass.
    pub mean_oracle_recall: Option<f64>,
    /// The lowest layer's recall.
    pub min_layer_recall: Option<f64>,
    /// Spread over layers of the pages selected per step.
    pub selected_spread: Spread,
    /// Spread over layers of the pages attended per step.
    pub attended_spread: Spread,
    /// Whether the per-layer mean selected pages differ by at least one page between layers.
    pub counts_vary_across_layers: bool,
    /// Most pages selected in one step.
    pub max_step_selected: u64,
    /// Per layer: attention-mass recall.
    pub recall: Vec<Option<f64>>,
    /// Per layer: the oracle's recall.
    pub oracle_recall: Vec<Option<f64>>,
    /// Per layer: pages attended per step.
    pub attended_per_step: Vec<f64>,
    /// Per layer: pages selected per step.
    pub selected_per_step: Vec<f64>,
    /// Per layer: candidate pages per step.
    pub candidates_per_step: Vec<f64>,
}
