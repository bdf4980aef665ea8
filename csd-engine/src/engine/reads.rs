//! Page reads in flight, and read-ahead.
//!
//! Every read gets an id, and every result comes back on one channel that the engine owns,
//! so a read may outlive the attend call that started it. That is what read-ahead needs: a
//! decode step that reads every page of a layer (`full`, `flexgen`) also queues the reads of
//! the next `readahead_layers` layers, which need no query, so the device reads layer l+1
//! while layer l computes, and the step's last layers queue the next step's first ones.
//! A read-ahead covers the blocks on flash when it was queued; blocks confirmed later stay
//! in the RAM stage for that attend (see [`super::Engine::prepare`]).

use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::io::{ReadDone, ReadJob, Reader};
use crate::error::{KvError, SeqId};
use crate::read::LayerRead;

/// A read's outcome and the buffer it filled (empty on error).
pub(super) type Arrived = (Result<(), KvError>, LayerRead);

/// A read queued ahead of its attend.
#[derive(Clone, Debug)]
pub(super) struct Ahead {
    /// The read's id.
    pub(super) id: u64,
    /// It covers blocks `0..blocks`: it reads them all but `cached`.
    pub(super) blocks: u32,
    /// Blocks the page cache held when the read was queued (`full` mode), left to it.
    pub(super) cached: Vec<u32>,
    bytes: u64,
}

/// The engine's reads: the reader threads, what is in flight, what came back early, and
/// the buffers to reuse.
pub(super) struct Reads {
    reader: Reader,
    tx: Sender<ReadDone>,
    rx: Receiver<ReadDone>,
    next_id: u64,
    /// Reads queued whose result someone still wants.
    wanted: HashSet<u64>,
    /// Results that came back before they were asked for.
    arrived: HashMap<u64, Arrived>,
    /// Read-ahead per (sequence, layer).
    ahead: HashMap<(SeqId, u32), Ahead>,
    /// Bytes the read-ahead holds or is reading.
    ahead_bytes: u64,
    /// Buffers to reuse.
    pub(super) spare: Vec<LayerRead>,
    /// Nanoseconds the engine's thread waited for reads.
    pub(super) wait_ns: u64,
    /// Read-aheads queued so far.
    pub(super) ahead_queued: u64,
}

impl Reads {
    pub(super) fn new(reader: Reader) -> Reads {
        let (tx, rx) = unbounded();
        Reads {
            reader,
            tx,
            rx,
            next_id: 0,
            wanted: HashSet::new(),
            arrived: HashMap::new(),
            ahead: HashMap::new(),
            ahead_bytes: 0,
            spare: Vec::new(),
            wait_ns: 0,
            ahead_queued: 0,
        }
    }

    /// Queue a read of `blocks` of (seq, layer); returns its id.
    pub(super) fn submit(&mut self, seq: SeqId, layer: u32, blocks: Vec<u32>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let buf = self.spare.pop().unwrap_or_default();
        self.wanted.insert(id);
        let job = ReadJob {
            id,
            seq,
            layer,
            blocks,
            buf,
        };
        self.reader.submit(job, &self.tx);
        id
    }

    /// Whether (seq, layer) has a read-ahead queued.
    pub(super) fn has_ahead(&self, seq: SeqId, layer: u32) -> bool {
        self.ahead.contains_key(&(seq, layer))
    }

    /// Queue the read of blocks `0..blocks` of (seq, layer) but `cached` ahead of its
    /// attend, unless the read-ahead would then hold more than `budget` bytes
    /// (`unit_bytes` per block).
    pub(super) fn read_ahead(
        &mut self,
        seq: SeqId,
        layer: u32,
        (blocks, cached): (u32, Vec<u32>),
        unit_bytes: u64,
        budget: u64,
    ) {
        let read: Vec<u32> = (0..blocks)
            .filter(|b| cached.binary_search(b).is_err())
            .collect();
        let bytes = read.len() as u64 * unit_bytes;
        if read.is_empty() || self.ahead_bytes + bytes > budget {
            return;
        }
        let id = self.submit(seq, layer, read);
        self.ahead_bytes += bytes;
        self.ahead_queued += 1;
        let a = Ahead {
            id,
            blocks,
            cached,
            bytes,
        };
        self.ahead.insert((seq, layer), a);
    }

    /// Take the read-ahead of (seq, layer), if any: its result is then the caller's to wait
    /// for (or to [`Reads::abandon`]).
    pub(super) fn take_ahead(&mut self, seq: SeqId, layer: u32) -> Option<Ahead> {
        let a = self.ahead.remove(&(seq, layer))?;
        self.ahead_bytes -= a.bytes;
        Some(a)
    }

    /// Drop every read-ahead of `seq` (it ended, or its mode changed).
    pub(super) fn forget_seq(&mut self, seq: SeqId) {
        let keys: Vec<(SeqId, u32)> = self.ahead.keys().filter(|k| k.0 == seq).copied().collect();
        for k in keys {
            if let Some(a) = self.take_ahead(k.0, k.1) {
                self.abandon(a.id);
            }
        }
    }

    /// Nobody wants read `id` any more: its buffer is reused once it is back.
    pub(super) fn abandon(&mut self, id: u64) {
        self.wanted.remove(&id);
        if let Some((_, buf)) = self.arrived.remove(&id) {
            self.spare.push(buf);
        }
    }

    /// Read `id`'s result if it is back, without waiting.
    pub(super) fn try_take(&mut self, id: u64) -> Option<Arrived> {
        self.drain();
        let got = self.arrived.remove(&id)?;
        self.wanted.remove(&id);
        Some(got)
    }

    /// Wait for the next result among `ids` (each still wanted): `(id, result)`.
    pub(super) fn wait_any(&mut self, ids: &HashSet<u64>) -> Result<(u64, Arrived), KvError> {
        if let Some(&id) = ids.iter().find(|id| self.arrived.contains_key(id)) {
            let got = self.arrived.remove(&id).expect("checked");
            self.wanted.remove(&id);
            return Ok((id, got));
        }
        let t0 = Instant::now();
        let r = loop {
            let Ok((id, r, buf)) = self.rx.recv() else {
                break Err(KvError::ReaderStopped);
            };
            if ids.contains(&id) {
                self.wanted.remove(&id);
                break Ok((id, (r, buf)));
            }
            self.stash(id, r, buf);
        };
        self.wait_ns += t0.elapsed().as_nanos() as u64;
        r
    }

    /// Wait for read `id`.
    pub(super) fn wait(&mut self, id: u64) -> Result<Arrived, KvError> {
        self.wait_any(&HashSet::from([id])).map(|(_, got)| got)
    }

    /// Keep results that came back without waiting for them.
    fn drain(&mut self) {
        while let Ok((id, r, buf)) = self.rx.try_recv() {
            self.stash(id, r, buf);
        }
    }

    fn stash(&mut self, id: u64, r: Result<(), KvError>, buf: LayerRead) {
        if self.wanted.contains(&id) {
            self.arrived.insert(id, (r, buf));
        } else {
            self.spare.push(buf);
        }
    }
}
