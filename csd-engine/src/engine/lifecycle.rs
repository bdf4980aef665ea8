//! Sequence lifecycle beyond appends: reclaim, persist, restore after a restart, and clone.

use half::f16;

use super::sequence::check_usable;
use super::{AttentionMode, Engine};
use crate::error::{KvError, SeqId};
use crate::read::LayerRead;

impl Engine {
    /// Free a sequence's pages and state at once (persisted state included).
    pub fn reclaim(&mut self, seq: SeqId) -> Result<(), KvError> {
        let known = self.seqs.remove(&seq);
        self.reads.forget_seq(seq);
        self.writer.barrier();
        self.cache.forget_seq(seq);
        let r = {
            let mut st = self.store.write().unwrap_or_else(|p| p.into_inner());
            if st.info(seq).is_some() {
                st.reclaim(seq)
            } else if known.is_some() {
                Ok(())
            } else {
                Err(KvError::UnknownSequence(seq))
            }
        };
        if let Some(k) = known {
            self.retired.add(&k.stats);
            self.retired_policy.add(&k.policy);
        }
        r
    }

    /// Make `seq` as it is now survive a restart.
    pub fn persist(&mut self, seq: SeqId) -> Result<(), KvError> {
        let st = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        check_usable(seq, st)?;
        self.writer.barrier();
        if let Some(e) = st.shared.error() {
            return Err(KvError::SequenceBroken { seq, cause: e });
        }
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        store.persist(seq)
    }

    /// Take up a sequence the store restored at open: its summaries are rebuilt from its
    /// pages (one sequential read per layer). Returns the tokens it holds.
    pub fn restore(
        &mut self,
        seq: SeqId,
        mode: AttentionMode,
        capacity: usize,
    ) -> Result<usize, KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::SequenceExists(seq));
        }
        self.writer.barrier();
        let mut st = self.new_state(mode, capacity);
        let (h, d, t) = (
            self.shape.kv_heads,
            self.shape.head_dim,
            self.geo.block_tokens(),
        );
        {
            let store = self.store.read().unwrap_or_else(|p| p.into_inner());
            let info = store.restore(seq)?;
            let mut buf = LayerRead::new();
            for (layer, ls) in st.layers.iter_mut().enumerate() {
                store.read_layer(seq, layer as u32, &mut buf)?;
                for i in 0..buf.len() {
                    ls.summ.push_block(
                        |head| &buf.keys(i, head)[..t * d],
                        |head| &buf.values(i, head)[..t * d],
                    );
                }
                ls.len = info.tokens[layer];
                ls.stage_first = buf.tail_first_pos();
                for head in 0..h {
                    ls.stage_k[head] = buf.tail_keys(head).to_vec();
                    ls.stage_v[head] = buf.tail_values(head).to_vec();
                }
                st.shared.confirmed[layer]
                    .store(buf.len() as u32, std::sync::atomic::Ordering::Release);
            }
        }
        let tokens = st.layers.iter().map(|l| l.len).min().unwrap_or(0);
        if tokens > capacity {
            return Err(KvError::SequenceFull {
                needed: tokens,
                capacity,
            });
        }
        self.seqs.insert(seq, st);
        Ok(tokens)
    }

    /// Copy sequence `src` (pages, tail, summaries, statistics) to a new sequence `dst`.
    pub fn clone_seq(
        &mut self,
        src: SeqId,
        dst: SeqId,
        mode: AttentionMode,
    ) -> Result<(), KvError> {
        if self.seqs.contains_key(&dst) {
            return Err(KvError::SequenceExists(dst));
        }
        let s = self.seqs.get(&src).ok_or(KvError::UnknownSequence(src))?;
        check_usable(src, s)?;
        self.writer.barrier();
        let mut st = self.new_state(mode, s.capacity);
        let (h, d) = (self.shape.kv_heads, self.shape.head_dim);
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        let mut buf = LayerRead::new();
        let mut result = Ok(());
        for layer in 0..self.layers() {
            if let Err(e) = store.read_layer(src, layer as u32, &mut buf) {
                result = Err(e);
                break;
            }
            let (k, v) = token_major(&buf, h, d);
            if let Err(e) = store.append(dst, layer as u32, &k, &v) {
                result = Err(e);
                break;
            }
            let full = store.full_blocks(dst, layer as u32).unwrap_or(0);
            let sl = &s.layers[layer];
            let dl = &mut st.layers[layer];
            dl.len = sl.len;
            dl.summ = sl.summ.clone();
            dl.act = sl.act.clone();
            dl.stage_first = full as usize * self.geo.block_tokens();
            for head in 0..h {
                dl.stage_k[head] = buf.tail_keys(head).to_vec();
                dl.stage_v[head] = buf.tail_values(head).to_vec();
            }
            st.shared.confirmed[layer].store(full, std::sync::atomic::Ordering::Release);
        }
        if let Err(e) = result {
            if store.info(dst).is_some() {
                let _ = store.reclaim(dst);
            }
            return Err(e);
        }
        st.density = s.density.clone();
        drop(store);
        self.seqs.insert(dst, st);
        Ok(())
    }
}

/// The blocks and tail of a read, token-major (`tokens × kv_heads × head_dim`) as appends
/// take them.
fn token_major(buf: &LayerRead, h: usize, d: usize) -> (Vec<f16>, Vec<f16>) {
    let mut rows_k: Vec<Vec<&[f16]>> = vec![Vec::new(); h];
    let mut rows_v: Vec<Vec<&[f16]>> = vec![Vec::new(); h];
    for head in 0..h {
        for i in 0..buf.len() {
            rows_k[head].extend(buf.keys(i, head).chunks_exact(d));
            rows_v[head].extend(buf.values(i, head).chunks_exact(d));
        }
        rows_k[head].extend(buf.tail_keys(head).chunks_exact(d));
        rows_v[head].extend(buf.tail_values(head).chunks_exact(d));
    }
    let n = rows_k[0].len();
    let (mut k, mut v) = (Vec::with_capacity(n * h * d), Vec::with_capacity(n * h * d));
    for tok in 0..n {
        for head in 0..h {
            k.extend_from_slice(rows_k[head][tok]);
            v.extend_from_slice(rows_v[head][tok]);
        }
    }
    (k, v)
}
