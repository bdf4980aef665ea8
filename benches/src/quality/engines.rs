//! The engines of one run, seen by the model as one [`KvPool`]: the reference engine (index 0:
//! exact `full` sequences) and one engine per sparse policy, each over its own store file.
//! Appends go to every engine holding the sequence; attention comes from one of them.

use anyhow::{Context, Result};
use csd_engine::{EngineConfig, PolicyStats};
use instinfer_runtime::kv::{
    AttendReq, AttentionMode, EnginePool, KvError, KvPool, KvShape, SeqId,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which engines hold a sequence.
#[derive(Clone, Copy, Debug)]
enum Owner {
    /// Every engine (a prompt being prefilled); the reference engine attends.
    All,
    /// One engine.
    One(usize),
}

/// The reference engine and the policies' engines, as one [`KvPool`].
pub struct Engines {
    pools: Vec<EnginePool>,
    owner: HashMap<SeqId, Owner>,
    paths: Vec<PathBuf>,
}

/// `base` with `suffix` appended to its file name.
fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl Engines {
    /// One new engine per config of `cfgs` (the reference's first), engine `i` over a new
    /// `store_bytes` store at `store` + ".ref" (i = 0) or + ".v{i}", for KV of `shape`.
    pub fn create(
        store: &Path,
        store_bytes: u64,
        shape: KvShape,
        cfgs: &[EngineConfig],
    ) -> Result<Engines> {
        let mut pools = Vec::new();
        let mut paths = Vec::new();
        for (i, &cfg) in cfgs.iter().enumerate() {
            let path = if i == 0 {
                with_suffix(store, ".ref")
            } else {
                with_suffix(store, &format!(".v{i}"))
            };
            let pool = EnginePool::create(&path, store_bytes, shape, cfg)
                .with_context(|| format!("creating the KV store {}", path.display()))?;
            pools.push(pool);
            paths.push(path);
        }
        Ok(Engines {
            pools,
            owner: HashMap::new(),
            paths,
        })
    }

    /// The engines, the reference first.
    pub fn pools(&self) -> &[EnginePool] {
        &self.pools
    }

    /// How the last engine's store does its I/O.
    pub fn io_mode(&self) -> String {
        self.pools
            .last()
            .map(|p| p.engine_ref().with_store(|s| s.mode().to_string()))
            .unwrap_or_default()
    }

    fn owner(&self, seq: SeqId) -> Result<Owner, KvError> {
        self.owner
            .get(&seq)
            .copied()
            .ok_or(KvError::UnknownSequence(seq))
    }

    fn holders(&self, seq: SeqId) -> Vec<usize> {
        match self.owner.get(&seq) {
            Some(Owner::All) => (0..self.pools.len()).collect(),
            Some(Owner::One(i)) => vec![*i],
            None => Vec::new(),
        }
    }

    /// The engine whose attention a sequence uses.
    fn attender(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(match self.owner(seq)? {
            Owner::All => 0,
            Owner::One(i) => i,
        })
    }

    /// Copy `src` (held by all) to a new `dst` held by all, in `mode`.
    pub fn clone_all(&mut self, src: SeqId, dst: SeqId, mode: AttentionMode) -> Result<()> {
        for (i, p) in self.pools.iter_mut().enumerate() {
            if let Err(e) = p.engine().clone_seq(src, dst, mode) {
                for q in &mut self.pools[..i] {
                    q.release(dst);
                }
                return Err(e).with_context(|| format!("cloning sequence {src} into {dst}"));
            }
        }
        self.owner.insert(dst, Owner::All);
        Ok(())
    }

    /// Copy engine `i`'s copy of `src` to a new `dst` held by engine `i` only.
    pub fn clone_into(
        &mut self,
        src: SeqId,
        dst: SeqId,
        i: usize,
        mode: AttentionMode,
    ) -> Result<()> {
        self.pools[i]
            .engine()
            .clone_seq(src, dst, mode)
            .with_context(|| format!("cloning sequence {src} into {dst} in engine {i}"))?;
        self.owner.insert(dst, Owner::One(i));
        Ok(())
    }

    /// Keep `seq` in engine `i` only.
    pub fn narrow(&mut self, seq: SeqId, i: usize) {
        for (j, p) in self.pools.iter_mut().enumerate() {
            if j != i {
                p.release(seq);
            }
        }
        self.owner.insert(seq, Owner::One(i));
    }

    /// The policy counters of `seq` in the engine that attends for it.
    pub fn stats(&self, seq: SeqId) -> Result<PolicyStats> {
        let i = self.attender(seq)?;
        self.pools[i]
            .engine_ref()
            .seq_policy_stats(seq)
            .cloned()
            .with_context(|| format!("no counters for sequence {seq}"))
    }

    /// Device bytes read and written, over all engines.
    pub fn device_bytes(&self) -> (u64, u64) {
        let mut read = 0u64;
        let mut written = 0u64;
        for p in &self.pools {
            let t = p.engine_ref().totals();
            read += t.stats.device_bytes_read;
            written += t.stats.device_bytes_written;
        }
        (read, written)
    }

    /// Stops the engines and removes their store files (one already gone is fine).
    pub fn remove_stores(self) -> Result<()> {
        let paths = self.paths.clone();
        drop(self);
        for p in &paths {
            remove_store(p)?;
        }
        Ok(())
    }
}

fn remove_store(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the KV store {}", path.display())),
    }
}

impl KvPool for Engines {
    fn shape(&self) -> KvShape {
        self.pools[0].shape()
    }

    fn open(&mut self, seq: SeqId, mode: AttentionMode, capacity: usize) -> Result<(), KvError> {
        for i in 0..self.pools.len() {
            if let Err(e) = self.pools[i].open(seq, mode, capacity) {
                for p in &mut self.pools[..i] {
                    p.release(seq);
                }
                return Err(e);
            }
        }
        self.owner.insert(seq, Owner::All);
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        for i in self.holders(seq) {
            self.pools[i].release(seq);
        }
        self.owner.remove(&seq);
    }

    fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        self.pools[self.attender(seq)?].len(seq)
    }

    fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
        self.pools[self.attender(seq)?].capacity(seq)
    }

    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError> {
        let holders = self.holders(seq);
        if holders.is_empty() {
            return Err(KvError::UnknownSequence(seq));
        }
        for i in holders {
            self.pools[i].append(seq, layer, k, v, q)?;
        }
        Ok(())
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendReq<'_>]) -> Vec<Result<(), KvError>> {
        let mut results: Vec<Result<(), KvError>> = (0..items.len()).map(|_| Ok(())).collect();
        let mut groups: Vec<Vec<(usize, AttendReq<'_>)>> =
            (0..self.pools.len()).map(|_| Vec::new()).collect();
        for (idx, it) in items.iter_mut().enumerate() {
            match self.attender(it.seq) {
                Ok(p) => groups[p].push((
                    idx,
                    AttendReq {
                        seq: it.seq,
                        q: it.q,
                        first_pos: it.first_pos,
                        out: &mut *it.out,
                    },
                )),
                Err(e) => results[idx] = Err(e),
            }
        }
        for (p, group) in groups.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let (idxs, mut batch): (Vec<usize>, Vec<AttendReq<'_>>) = group.into_iter().unzip();
            for (idx, r) in idxs
                .into_iter()
                .zip(self.pools[p].attend(layer, &mut batch))
            {
                results[idx] = r;
            }
        }
        results
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        for i in self.holders(seq) {
            self.pools[i].truncate(seq, len);
        }
    }
}
