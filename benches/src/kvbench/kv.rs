//! The KV workload: write S sequences of N tokens for a model shape through the KV store,
//! then replay decode steps (every layer of every sequence: a whole-layer scan, or a random
//! page set of a given fraction), appending one token per layer per step as decode does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use csd_engine::device::{EngineChoice, OpenDeviceOptions};
use csd_engine::{KvStore, LayerRead, PageShape, StoreConfig, StoreOptions};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// One KV-store workload.
#[derive(Clone, Debug)]
pub struct KvJob {
    /// Store file (or block device).
    pub filename: PathBuf,
    /// Store size in bytes.
    pub capacity: u64,
    /// The page layout.
    pub shape: PageShape,
    /// Sequences written.
    pub sequences: u64,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Decode steps replayed per fraction.
    pub steps: usize,
    /// Fractions of blocks per layer to read in sparse steps (1.0 = whole-layer scan).
    pub fractions: Vec<f64>,
    /// Reader threads per step.
    pub threads: usize,
    /// The store's I/O engine.
    pub engine: EngineChoice,
    /// O_DIRECT.
    pub direct: bool,
    /// Seed of the data and page-set generator.
    pub seed: u64,
    /// Tokens per prefill append.
    pub prefill_chunk: usize,
}

/// What the steps of one fraction measured (per step: averages over the steps).
pub struct StepReport {
    /// Fraction of each layer's blocks read.
    pub fraction: f64,
    /// Steps replayed.
    pub steps: usize,
    /// Bytes read per step.
    pub bytes_per_step: f64,
    /// Milliseconds of reads per step.
    pub ms_per_step: f64,
    /// Device read requests per step.
    pub requests_per_step: f64,
    /// Block groups per step that rode along in a neighbour's request.
    pub coalesced_per_step: f64,
    /// Read throughput, GB/s.
    pub gbps: f64,
    /// Median step time, ms.
    pub p50_ms: f64,
    /// 99th percentile step time, ms.
    pub p99_ms: f64,
}

/// The results of a KV-store workload.
pub struct KvReport {
    /// The store's I/O mode, as it reports it.
    pub mode: String,
    /// Bytes the prefill wrote.
    pub write_bytes: u64,
    /// Seconds the prefill took (sync included).
    pub write_secs: f64,
    /// Per fraction, the decode steps' reads.
    pub steps: Vec<StepReport>,
    /// Pages that failed their checksum.
    pub checksum_failures: u64,
}

/// Create the store, prefill every sequence and replay the decode steps.
pub fn run(job: &KvJob) -> Result<KvReport> {
    let device = OpenDeviceOptions {
        engine: job.engine,
        direct: job.direct,
        ..Default::default()
    };
    let cfg = StoreConfig {
        shape: job.shape,
        capacity: job.capacity,
        options: StoreOptions {
            device,
            ..Default::default()
        },
    };
    let mut store = KvStore::create(&job.filename, &cfg)
        .with_context(|| format!("creating {}", job.filename.display()))?;
    let mode = store.mode().to_string();
    let row = job.shape.token_elems();
    let mut rng = ChaCha8Rng::seed_from_u64(job.seed);

    // Prefill: every sequence, layer by layer, chunk by chunk (as a forward pass appends).
    let chunk = job.prefill_chunk.max(1);
    let mut k = vec![f16::ZERO; chunk * row];
    let mut v = vec![f16::ZERO; chunk * row];
    for x in k.iter_mut().chain(v.iter_mut()) {
        *x = f16::from_f32((rng.random_range(0..2000u32) as f32 - 1000.0) / 500.0);
    }
    let t0 = Instant::now();
    let before = store.counters();
    for seq in 0..job.sequences {
        store.reserve(seq, job.tokens + job.steps * job.fractions.len())?;
        let mut done = 0;
        while done < job.tokens {
            let n = (job.tokens - done).min(chunk);
            for layer in 0..job.shape.layers {
                store.append(seq, layer, &k[..n * row], &v[..n * row])?;
            }
            done += n;
        }
    }
    store.sync()?;
    let write_secs = t0.elapsed().as_secs_f64();
    let write_bytes = store.counters().bytes_written - before.bytes_written;

    let mut steps = Vec::new();
    for &fraction in &job.fractions {
        let mut lat = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let c0 = store.counters();
        let mut total = Duration::ZERO;
        for _ in 0..job.steps {
            // The page sets of this step, chosen up front (the policy's job, not timed).
            let mut plan: Vec<(u64, u32, Option<Vec<u32>>)> = Vec::new();
            for seq in 0..job.sequences {
                for layer in 0..job.shape.layers {
                    let full = store.full_blocks(seq, layer)?;
                    if fraction >= 1.0 {
                        plan.push((seq, layer, None));
                    } else {
                        let want = ((full as f64 * fraction).ceil() as usize)
                            .clamp(1, full.max(1) as usize);
                        let mut pick: Vec<u32> = Vec::with_capacity(want);
                        // Partial Fisher-Yates over block indices.
                        let mut all: Vec<u32> = (0..full).collect();
                        for i in 0..want.min(all.len()) {
                            let j = i + rng.random_range(0..all.len() - i);
                            all.swap(i, j);
                            pick.push(all[i]);
                        }
                        plan.push((seq, layer, Some(pick)));
                    }
                }
            }
            let t = Instant::now();
            let store_ref = &store;
            let per = plan.len().div_ceil(job.threads.max(1));
            std::thread::scope(|s| -> Result<()> {
                let hs: Vec<_> = plan
                    .chunks(per.max(1))
                    .map(|part| {
                        s.spawn(move || -> Result<()> {
                            let mut out = LayerRead::new();
                            for (seq, layer, pick) in part {
                                match pick {
                                    None => store_ref.read_layer(*seq, *layer, &mut out)?,
                                    Some(p) => store_ref.read_blocks(*seq, *layer, p, &mut out)?,
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
                }
                Ok(())
            })?;
            let dt = t.elapsed();
            total += dt;
            lat.saturating_record(dt.as_micros() as u64);
            // Decode appends one token per layer per sequence (lands in the RAM tail, flushed
            // as a page when full) — not part of the read timing.
            for seq in 0..job.sequences {
                for layer in 0..job.shape.layers {
                    store.append(seq, layer, &k[..row], &v[..row])?;
                }
            }
        }
        let c1 = store.counters();
        let n = job.steps.max(1) as f64;
        let bytes = (c1.bytes_read - c0.bytes_read) as f64;
        steps.push(StepReport {
            fraction,
            steps: job.steps,
            bytes_per_step: bytes / n,
            ms_per_step: total.as_secs_f64() * 1000.0 / n,
            requests_per_step: (c1.read_ios - c0.read_ios) as f64 / n,
            coalesced_per_step: (c1.reads_coalesced - c0.reads_coalesced) as f64 / n,
            gbps: bytes / total.as_secs_f64().max(1e-9) / 1e9,
            p50_ms: lat.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: lat.value_at_quantile(0.99) as f64 / 1000.0,
        });
    }
    let checksum_failures = store.counters().checksum_failures;
    Ok(KvReport {
        mode,
        write_bytes,
        write_secs,
        steps,
        checksum_failures,
    })
}

/// The report as JSON.
pub fn to_json(job: &KvJob, r: &KvReport) -> Value {
    json!({
        "tool": "kvbench",
        "workload": "kv",
        "mode": r.mode,
        "shape": {
            "layers": job.shape.layers, "kv_heads": job.shape.kv_heads,
            "head_dim": job.shape.head_dim, "block_tokens": job.shape.block_tokens,
        },
        "sequences": job.sequences,
        "tokens": job.tokens,
        "write": {
            "bytes": r.write_bytes,
            "secs": r.write_secs,
            "bw_bytes": (r.write_bytes as f64 / r.write_secs.max(1e-9)) as u64,
        },
        "steps": r.steps.iter().map(|s| json!({
            "fraction": s.fraction,
            "steps": s.steps,
            "bytes_per_step": s.bytes_per_step,
            "ms_per_step": s.ms_per_step,
            "p50_ms": s.p50_ms,
            "p99_ms": s.p99_ms,
            "requests_per_step": s.requests_per_step,
            "coalesced_per_step": s.coalesced_per_step,
            "gb_per_s": s.gbps,
        })).collect::<Vec<_>>(),
        "checksum_failures": r.checksum_failures,
    })
}

/// Print the report as a table.
pub fn print_normal(job: &KvJob, r: &KvReport) {
    let s = job.shape;
    println!(
        "kv: {} sequences × {} tokens, shape {}L×{}kvh×{}d, {} tokens/page ({} KiB per block group), mode {}",
        job.sequences,
        job.tokens,
        s.layers,
        s.kv_heads,
        s.head_dim,
        s.block_tokens,
        s.block_tokens as usize * s.head_dim as usize * 4 * s.kv_heads as usize / 1024,
        r.mode
    );
    println!(
        "  prefill write: {} MiB in {:.2} s = {}",
        r.write_bytes >> 20,
        r.write_secs,
        super::fmt_bw(r.write_bytes as f64 / r.write_secs.max(1e-9))
    );
    println!(
        "  {:>8} {:>12} {:>10} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "fraction", "MiB/step", "ms/step", "p50 ms", "p99 ms", "reqs/step", "coalesced", "GB/s"
    );
    for st in &r.steps {
        println!(
            "  {:>8.3} {:>12.2} {:>10.2} {:>9.2} {:>9.2} {:>10.0} {:>10.0} {:>8.2}",
            st.fraction,
            st.bytes_per_step / (1 << 20) as f64,
            st.ms_per_step,
            st.p50_ms,
            st.p99_ms,
            st.requests_per_step,
            st.coalesced_per_step,
            st.gbps
        );
    }
    println!("  checksum failures: {}", r.checksum_failures);
}
