//! Per-sequence state of the engine: each layer's RAM stage, summaries and activation
//! statistics, the sparse policy's per-layer density and caps, the counters; and the commands
//! that open a sequence, change its mode, report its size and mark it broken.

use half::f16;
use instinfer_kernels::attention::KvSegment;
use std::sync::Arc;

use super::io::SeqShared;
use super::probe::ActivationStats;
use super::summary::LayerSummaries;
use super::{AttentionMode, Engine, EngineStats, PageScore, PolicyStats};
use crate::error::{KvError, SeqId};

/// One layer of one sequence.
pub(super) struct LayerState {
    /// Tokens appended.
    pub(super) len: usize,
    /// Position of the first staged token (a block boundary).
    pub(super) stage_first: usize,
    /// Per kv head, staged K and V rows (`tokens × head_dim`).
    pub(super) stage_k: Vec<Vec<f16>>,
    pub(super) stage_v: Vec<Vec<f16>>,
    pub(super) summ: LayerSummaries,
    pub(super) act: ActivationStats,
}

impl LayerState {
    /// The staged (not yet on flash) rows of kv head `head`, if any.
    pub(super) fn stage_segment(&self, head: usize) -> Option<KvSegment<'_>> {
        (!self.stage_k[head].is_empty()).then(|| KvSegment {
            keys: &self.stage_k[head],
            values: &self.stage_v[head],
            first_pos: self.stage_first,
        })
    }
}

/// One open sequence.
pub(super) struct SeqState {
    pub(super) mode: AttentionMode,
    pub(super) capacity: usize,
    pub(super) layers: Vec<LayerState>,
    pub(super) shared: Arc<SeqShared>,
    /// Recent blocks needed per layer (information density), for sharing the step budget.
    pub(super) density: Vec<f32>,
    pub(super) caps: Vec<usize>,
    /// Blocks selected so far in the current decode step (all layers).
    pub(super) step_selected: u64,
    pub(super) stats: EngineStats,
    pub(super) policy: PolicyStats,
    pub(super) broken: Option<Arc<KvError>>,
}

impl Engine {
    pub(super) fn new_state(&self, mode: AttentionMode, capacity: usize) -> SeqState {
        let (h, d, layers) = (self.shape.kv_heads, self.shape.head_dim, self.layers());
        SeqState {
            mode,
            capacity,
            layers: (0..layers)
                .map(|_| LayerState {
                    len: 0,
                    stage_first: 0,
                    stage_k: vec![Vec::new(); h],
                    stage_v: vec![Vec::new(); h],
                    summ: LayerSummaries::with_runs(h, d, self.cfg.quest_runs)
                        .sketched(self.cfg.score == PageScore::Sketch),
                    act: ActivationStats::default(),
                })
                .collect(),
            shared: Arc::new(SeqShared::new(layers)),
            density: vec![1.0; layers],
            caps: vec![self.cfg.max_blocks; layers],
            step_selected: 0,
            stats: EngineStats::default(),
            policy: PolicyStats::new(layers),
            broken: None,
        }
    }

    /// Start an empty sequence.
    pub fn open(
        &mut self,
        seq: SeqId,
        mode: AttentionMode,
        capacity: usize,
    ) -> Result<(), KvError> {
        if self.seqs.contains_key(&seq) || self.with_store(|s| s.info(seq).is_some()) {
            return Err(KvError::SequenceExists(seq));
        }
        let st = self.new_state(mode, capacity);
        self.seqs.insert(seq, st);
        Ok(())
    }

    /// Change how a sequence's decode attention reads its KV.
    pub fn set_mode(&mut self, seq: SeqId, mode: AttentionMode) -> Result<(), KvError> {
        self.state(seq)?.mode = mode;
        self.reads.forget_seq(seq);
        Ok(())
    }

    fn state(&mut self, seq: SeqId) -> Result<&mut SeqState, KvError> {
        self.seqs.get_mut(&seq).ok_or(KvError::UnknownSequence(seq))
    }

    /// Tokens a sequence holds (all layers).
    pub fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        let st = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        Ok(st.layers.iter().map(|l| l.len).min().unwrap_or(0))
    }

    /// Tokens a sequence may hold (as opened).
    pub fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(self
            .seqs
            .get(&seq)
            .ok_or(KvError::UnknownSequence(seq))?
            .capacity)
    }

    /// Open sequences, ascending.
    pub fn sequences(&self) -> Vec<SeqId> {
        let mut v: Vec<SeqId> = self.seqs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Forget everything of `seq` after its first `len` tokens. The store only appends, so
    /// anything but a no-op leaves the sequence unusable until it is reclaimed.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(st) = self.seqs.get_mut(&seq) {
            if st.layers.iter().any(|l| l.len != len) {
                st.broken = Some(Arc::new(KvError::StepLost { seq }));
            }
        }
    }
}

/// `SequenceBroken` if an earlier failure or truncation ended the sequence.
pub(super) fn check_usable(seq: SeqId, st: &SeqState) -> Result<(), KvError> {
    if let Some(b) = &st.broken {
        return Err(KvError::SequenceBroken {
            seq,
            cause: b.clone(),
        });
    }
    if let Some(e) = st.shared.error() {
        return Err(KvError::SequenceBroken { seq, cause: e });
    }
    Ok(())
}
