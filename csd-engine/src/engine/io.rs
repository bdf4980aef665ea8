//! The engine's two background threads: the writer, which appends K/V to the store in the
//! order they were submitted (so a layer's page writes overlap the next layer's compute), and
//! the reader, which serves page reads for one sequence while the caller computes another's
//! attention. Both share the store; reads take its read lock, appends its write lock.

use crossbeam_channel::{unbounded, Receiver, Sender};
use half::f16;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use crate::error::{KvError, SeqId};
use crate::read::LayerRead;
use crate::store::KvStore;

/// What the writer reports back to the engine about one sequence.
pub struct SeqShared {
    /// Per layer: blocks confirmed on flash.
    pub confirmed: Vec<AtomicU32>,
    /// The first failed append, which ends the sequence.
    pub error: Mutex<Option<Arc<KvError>>>,
    /// Appends submitted to the writer and not yet applied.
    pub pending: AtomicUsize,
}

impl SeqShared {
    pub fn new(layers: usize) -> Self {
        SeqShared {
            confirmed: (0..layers).map(|_| AtomicU32::new(0)).collect(),
            error: Mutex::new(None),
            pending: AtomicUsize::new(0),
        }
    }

    pub fn error(&self) -> Option<Arc<KvError>> {
        self.error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn fail(&self, cause: KvError) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        e.get_or_insert(Arc::new(cause));
    }

    pub fn confirmed(&self, layer: usize) -> u32 {
        self.confirmed[layer].load(Ordering::Acquire)
    }
}

enum WriteJob {
    Append {
        seq: SeqId,
        layer: u32,
        k: Vec<f16>,
        v: Vec<f16>,
        shared: Arc<SeqShared>,
    },
    Barrier(Sender<()>),
}

pub struct Writer {
    tx: Option<Sender<WriteJob>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(store: Arc<RwLock<KvStore>>) -> Writer {
        let (tx, rx) = unbounded::<WriteJob>();
        let thread = std::thread::Builder::new()
            .name("csd-writer".into())
            .spawn(move || write_loop(store, rx))
            .expect("spawn the engine's writer thread");
        Writer {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queue an append; a failure is recorded in `shared` (the writer thread being gone
    /// too: an append is never dropped silently).
    pub fn append(&self, seq: SeqId, layer: u32, k: Vec<f16>, v: Vec<f16>, shared: Arc<SeqShared>) {
        let Some(tx) = &self.tx else {
            shared.fail(KvError::WriterStopped);
            return;
        };
        shared.pending.fetch_add(1, Ordering::AcqRel);
        let job = WriteJob::Append {
            seq,
            layer,
            k,
            v,
            shared,
        };
        if let Err(e) = tx.send(job) {
            if let WriteJob::Append { shared, .. } = e.into_inner() {
                shared.fail(KvError::WriterStopped);
                shared.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Wait until every append submitted so far has been applied.
    pub fn barrier(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if let Some(w) = &self.tx {
            if w.send(WriteJob::Barrier(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(store: Arc<RwLock<KvStore>>, rx: Receiver<WriteJob>) {
    for job in rx {
        match job {
            WriteJob::Append {
                seq,
                layer,
                k,
                v,
                shared,
            } => {
                if shared.error().is_none() {
                    let mut st = store.write().unwrap_or_else(|p| p.into_inner());
                    let _span = tracing::trace_span!("append", seq, layer).entered();
                    // A panic (a bug) fails this sequence only; the thread goes on.
                    let applied = catch_unwind(AssertUnwindSafe(|| {
                        apply_append(&mut st, seq, layer, &k, &v, &shared)
                    }));
                    if let Err(payload) = applied {
                        let e = KvError::panicked("writer thread", payload.as_ref());
                        tracing::error!(seq, layer, error = %e, "append panicked; the sequence fails");
                        shared.fail(e);
                    }
                }
                shared.pending.fetch_sub(1, Ordering::AcqRel);
            }
            WriteJob::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Apply one append to the store and report the blocks now on flash (or the failure).
pub fn apply_append(
    st: &mut KvStore,
    seq: SeqId,
    layer: u32,
    k: &[f16],
    v: &[f16],
    shared: &SeqShared,
) {
    match st.append(seq, layer, k, v) {
        Ok(()) => {
            let full = st.full_blocks(seq, layer).unwrap_or(0);
            shared.confirmed[layer as usize].store(full, Ordering::Release);
        }
        Err(e) => shared.fail(e),
    }
}

/// A page read of one (sequence, layer); its result comes back tagged with `id`.
pub struct ReadJob {
    pub id: u64,
    pub seq: SeqId,
    pub layer: u32,
    pub blocks: Vec<u32>,
    pub buf: LayerRead,
}

pub type ReadDone = (u64, Result<(), KvError>, LayerRead);

/// The reader threads: one per device ring, taking jobs from one queue, so that one
/// thread's read fills the device while another's last requests drain and its checksums
/// run (a single thread left the queue empty at the end of every read).
pub struct Reader {
    tx: Option<Sender<(ReadJob, Sender<ReadDone>)>>,
    threads: Vec<JoinHandle<()>>,
}

impl Reader {
    pub fn start(store: Arc<RwLock<KvStore>>, threads: usize) -> Reader {
        let (tx, rx) = unbounded::<(ReadJob, Sender<ReadDone>)>();
        let threads = (0..threads.max(1))
            .map(|i| {
                let (store, rx) = (store.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("csd-reader-{i}"))
                    .spawn(move || read_loop(store, rx))
                    .expect("spawn the engine's reader thread")
            })
            .collect();
        Reader {
            tx: Some(tx),
            threads,
        }
    }

    /// Queue a read; its result arrives on `reply`. Reads start in submission order.
    pub fn submit(&self, job: ReadJob, reply: &Sender<ReadDone>) {
        if let Some(tx) = &self.tx {
            if let Err(e) = tx.send((job, reply.clone())) {
                let (job, reply) = e.into_inner();
                let _ = reply.send((job.id, Err(KvError::ReaderStopped), job.buf));
            }
        }
    }
}

fn read_loop(store: Arc<RwLock<KvStore>>, rx: Receiver<(ReadJob, Sender<ReadDone>)>) {
    for (mut job, reply) in rx {
        let _span = tracing::trace_span!("read", seq = job.seq, layer = job.layer).entered();
        // A panic (a bug) fails this read only, and the caller still gets its answer: it
        // waits on the reply, never hanging.
        let read = catch_unwind(AssertUnwindSafe(|| read_job(&store, &mut job)));
        let r = read.unwrap_or_else(|payload| {
            job.buf = LayerRead::new();
            let e = KvError::panicked("reader thread", payload.as_ref());
            tracing::error!(seq = job.seq, layer = job.layer, error = %e, "page read panicked");
            Err(e)
        });
        let _ = reply.send((job.id, r, job.buf));
    }
}

/// One read, with the store's read lock held only to plan it and to count it: the device
/// I/O runs without it, so appends (which take the write lock) never wait for a read.
fn read_job(store: &RwLock<KvStore>, job: &mut ReadJob) -> Result<(), KvError> {
    let lock = || store.read().unwrap_or_else(|p| p.into_inner());
    let plan = lock().plan_read(job.seq, job.layer, &job.blocks, &mut job.buf)?;
    let io = plan.run(&mut job.buf);
    lock().finish_read(plan, io, &mut job.buf)
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
