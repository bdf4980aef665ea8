//! Appends: K/V of a prefill chunk or decode token go to the sequence's RAM stage at once
//! (summarising every block they complete) and to flash through the writer thread.

use half::f16;

use super::io;
use super::sequence::check_usable;
use super::Engine;
use crate::error::{KvError, SeqId};

impl Engine {
    /// Append `n` tokens' K and V (`n × kv_heads·head_dim`, token-major) of one layer, with
    /// their queries `q` (`n × q_heads·head_dim`) for the activation statistics.
    pub fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError> {
        let (hd, t) = (self.shape.heads(), self.geo.block_tokens());
        let (h, d) = (hd.kv_heads, hd.head_dim);
        let st = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        check_usable(seq, st)?;
        let held = st.layers.get(layer).map_or(0, |l| l.len);
        let n = self.shape.check_append(layer, k, v, held, st.capacity)?;
        if !q.is_empty() && q.len() != n * hd.q_dim() {
            return Err(KvError::BadInput(format!(
                "append to sequence {seq}: {} query values for {n} tokens",
                q.len()
            )));
        }
        let row = h * d;
        let ls = &mut st.layers[layer];
        let before = ls.len;
        let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
        let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        for tok in 0..n {
            for head in 0..h {
                let r = tok * row + head * d..tok * row + (head + 1) * d;
                ls.stage_k[head].extend_from_slice(&k16[r.clone()]);
                ls.stage_v[head].extend_from_slice(&v16[r]);
            }
        }
        ls.len += n;
        // Summarise blocks completed by this append (their keys are all still staged).
        while (ls.summ.blocks() + 1) * t <= ls.len {
            let b = ls.summ.blocks();
            let at = (b * t - ls.stage_first) * d;
            let (sk, sv) = (&ls.stage_k, &ls.stage_v);
            ls.summ.push_block(
                |head| &sk[head][at..at + t * d],
                |head| &sv[head][at..at + t * d],
            );
        }
        ls.act.observe(q, hd.q_dim());
        st.stats.boundary_bytes += ((k.len() + v.len() + q.len()) * 4) as u64;
        // An append that only fills the store's RAM tail is a copy: do it here rather than
        // wake the writer, unless earlier appends are still queued (order matters).
        let fills_block = before % t + n >= t;
        if !fills_block && st.shared.pending.load(std::sync::atomic::Ordering::Acquire) == 0 {
            let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
            io::apply_append(&mut store, seq, layer as u32, &k16, &v16, &st.shared);
            drop(store);
            if let Some(e) = st.shared.error() {
                return Err(KvError::SequenceBroken { seq, cause: e });
            }
        } else {
            self.writer
                .append(seq, layer as u32, k16, v16, st.shared.clone());
        }
        Ok(())
    }
}
