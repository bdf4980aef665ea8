//! A small team of threads that spin between single-token matrix products.
//!
//! Decode runs about 150 matrix products per token, 50-100 µs each. A pool whose idle
//! workers go to sleep (rayon) pays a wake-up on most of them, and on a busy host the late
//! worker shows as run-to-run spread (measured in `docs/BENCHMARKS.md`). The team keeps its
//! helpers spinning between the products of one layer, the way llama.cpp's CPU backend does,
//! and splits each product's rows between the caller and the helpers. A helper that has
//! waited about a millisecond (the layer's attention is running, which can take tens of
//! milliseconds over a long context on flash) goes to sleep until the next product, so it
//! does not take the cores the attention and the storage engine's reader threads need. It is
//! safe code: the activations sit behind a read-write lock and each helper hands its rows
//! back through its own mutex.

use crate::matmul::{gemv_range, QMatrix, QuantizedActs};
use crate::quant::x8;
use crate::quant::{GgmlType, QuantError};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Spins (about 150 µs) before a waiting thread starts yielding its core: long enough to bridge
/// the gap between two products of one token, short enough not to starve other processes
/// when the machine is oversubscribed.
const SPINS_BEFORE_YIELD: u32 = 6_000;

/// Spin, then yield, until `ready()` holds.
fn wait_until(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// How long a helper waits for the next product, spinning then yielding, before it sleeps.
const WAIT_BEFORE_SLEEP: Duration = Duration::from_millis(1);

type Work<'w> = Vec<(QMatrix<'w>, Range<usize>)>;

struct Shared<'w> {
    /// Helpers asleep on `bell`.
    sleepers: AtomicUsize,
    bell: Mutex<()>,
    ring: Condvar,
    epoch: AtomicUsize,
    done: AtomicUsize,
    stop: AtomicBool,
    acts: RwLock<QuantizedActs>,
    work: Vec<Mutex<Work<'w>>>,
    results: Vec<Mutex<Result<Vec<f32>, QuantError>>>,
}

/// Handle the forward pass uses to run single-token products on the team.
pub struct Team<'s, 'w> {
    shared: &'s Shared<'w>,
    expected: AtomicUsize,
}

/// Run `f` with `helpers` extra threads spinning for work. With zero helpers the products
/// run on the calling thread alone.
pub fn with_team<'w, R>(helpers: usize, f: impl FnOnce(&Team<'_, 'w>) -> R) -> R {
    let shared = Shared {
        sleepers: AtomicUsize::new(0),
        bell: Mutex::new(()),
        ring: Condvar::new(),
        epoch: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        acts: RwLock::new(QuantizedActs::default()),
        work: (0..helpers).map(|_| Mutex::new(Vec::new())).collect(),
        results: (0..helpers).map(|_| Mutex::new(Ok(Vec::new()))).collect(),
    };
    std::thread::scope(|s| {
        for h in 0..helpers {
            let shared = &shared;
            s.spawn(move || helper(shared, h));
        }
        // Stops the helpers however `f` ends, so the scope can join them.
        struct Stop<'a, 'w>(&'a Shared<'w>);
        impl Drop for Stop<'_, '_> {
            fn drop(&mut self) {
                self.0.stop.store(true, Ordering::Release);
                self.0.next_epoch();
            }
        }
        let _stop = Stop(&shared);
        f(&Team {
            shared: &shared,
            expected: AtomicUsize::new(0),
        })
    })
}

impl Shared<'_> {
    /// Start the next round of work (or the stop), waking sleeping helpers.
    fn next_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.bell.lock().unwrap_or_else(|e| e.into_inner());
            self.ring.notify_all();
        }
    }
}

/// Wait until the epoch moves past `seen`: spin, then yield, then sleep.
fn wait_for(shared: &Shared<'_>, seen: &mut usize) {
    let moved = || shared.epoch.load(Ordering::SeqCst) != *seen;
    let start = Instant::now();
    let mut spins = 0u32;
    while !moved() {
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            std::hint::spin_loop();
        } else if start.elapsed() < WAIT_BEFORE_SLEEP {
            std::thread::yield_now();
        } else {
            let mut g = shared.bell.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            while !moved() {
                // The timeout only bounds the cost of a missed wake-up; next_epoch's
                // sleeper count (read after the epoch moved) makes one unlikely.
                g = shared
                    .ring
                    .wait_timeout(g, Duration::from_millis(5))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }
    *seen = shared.epoch.load(Ordering::SeqCst);
}

fn helper(shared: &Shared<'_>, h: usize) {
    let mut seen = 0;
    loop {
        wait_for(shared, &mut seen);
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let work = std::mem::take(&mut *shared.work[h].lock().unwrap_or_else(|e| e.into_inner()));
        // A panic here must still count as done, or the caller would wait forever.
        let run = std::panic::AssertUnwindSafe(|| {
            let acts = shared.acts.read().unwrap_or_else(|e| e.into_inner());
            let mut out = Vec::with_capacity(work.iter().map(|(_, r)| r.len()).sum());
            work.iter()
                .try_for_each(|(w, rows)| {
                    let start = out.len();
                    out.resize(start + rows.len(), 0.0);
                    gemv_range(w, &acts, rows.clone(), &mut out[start..])
                })
                .map(|()| out)
        });
        let result = std::panic::catch_unwind(run)
            .unwrap_or_else(|_| Err(QuantError::Worker("a helper thread panicked".into())));
        *shared.results[h].lock().unwrap_or_else(|e| e.into_inner()) = result;
        shared.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl<'w> Team<'_, 'w> {
    /// Quantize the single activation row `x` to `ty` for the products that follow.
    pub fn quantize(&self, ty: GgmlType, x: &[f32]) -> Result<(), QuantError> {
        let mut acts = self.shared.acts.write().unwrap_or_else(|e| e.into_inner());
        acts.quantize(ty, x, 1, x.len())
    }

    /// `out_k = w_k · x` for every job, with `x` from the last [`Team::quantize`]. Rows are
    /// split in contiguous runs (multiples of 4) between the caller and the helpers.
    pub fn matmul_many(&self, jobs: &mut [(QMatrix<'w>, &mut [f32])]) -> Result<(), QuantError> {
        let helpers = self.shared.work.len();
        let total: usize = jobs.iter().map(|(w, _)| w.rows()).sum();
        let share = (total / (helpers + 1)).div_ceil(x8::ROWS) * x8::ROWS;
        // Walk the rows of all jobs in order: the caller takes the first `share`, each helper
        // the next `share`, the last helper the rest.
        let mut plans: Vec<Work<'w>> = vec![Vec::new(); helpers + 1];
        let (mut who, mut left) = (0, share);
        for (w, out) in jobs.iter() {
            assert_eq!(
                out.len(),
                w.rows(),
                "output buffer is not one row per matrix row"
            );
            let mut r = 0;
            while r < w.rows() {
                let take = if who == helpers {
                    w.rows() - r
                } else if w.is_interleaved() {
                    // Whole groups of eight rows: rounding up keeps every start aligned.
                    left.div_ceil(x8::ROWS)
                        .saturating_mul(x8::ROWS)
                        .min(w.rows() - r)
                } else {
                    left.min(w.rows() - r)
                };
                plans[who].push((*w, r..r + take));
                r += take;
                left -= take.min(left);
                if left == 0 && who < helpers {
                    who += 1;
                    left = share;
                }
            }
        }
        let mine = plans.remove(0);
        for (h, plan) in plans.iter().enumerate() {
            *self.shared.work[h]
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = plan.clone();
        }
        let target = self.expected.fetch_add(helpers, Ordering::Relaxed) + helpers;
        self.shared.next_epoch();
        {
            let acts = self.shared.acts.read().unwrap_or_else(|e| e.into_inner());
            for (w, rows) in &mine {
                let out = out_slice(jobs, w, rows.clone());
                gemv_range(w, &acts, rows.clone(), out)?;
            }
        }
        wait_until(|| self.shared.done.load(Ordering::Acquire) >= target);
        for (h, plan) in plans.iter().enumerate() {
            let got = std::mem::replace(
                &mut *self.shared.results[h]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
                Ok(Vec::new()),
            )?;
            let mut at = 0;
            for (w, rows) in plan {
                out_slice(jobs, w, rows.clone()).copy_from_slice(&got[at..at + rows.len()]);
                at += rows.len();
            }
        }
        Ok(())
    }
}

/// The part of the output of the job whose matrix is `w` that covers `rows`.
fn out_slice<'a>(
    jobs: &'a mut [(QMatrix, &mut [f32])],
    w: &QMatrix,
    rows: Range<usize>,
) -> &'a mut [f32] {
    let job = jobs
        .iter_mut()
        .find(|(m, _)| std::ptr::eq(m.data_ptr(), w.data_ptr()))
        .expect("plan entries come from the jobs");
    &mut job.1[rows]
}
