//! The fio-like raw I/O workload, driven through csd-engine's raw I/O queue
//! ([`csd_engine::rawio`]: ring-owned, registered, aligned buffers; the queue is refilled as
//! each completion is reaped) or through pread/pwrite.

// `%` reads as well as `is_multiple_of` here.
#![allow(clippy::manual_is_multiple_of)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use csd_engine::rawio::{Completion, QueueOptions, RawFile};
use csd_engine::AlignedBuf;
use hdrhistogram::Histogram;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// The access pattern (fio's `--rw`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, `rwmixread` percent reads.
    Randrw,
    /// Sequential reads and writes, `rwmixread` percent reads.
    Rw,
}

/// The I/O engine (fio's `--ioengine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// io_uring with `iodepth` operations in flight.
    #[value(name = "io_uring")]
    IoUring,
    /// pread/pwrite, one operation at a time.
    Psync,
}

/// One raw I/O job, as fio's flags describe it.
#[derive(Clone, Debug)]
pub struct RawJob {
    /// Job name (in the report).
    pub name: String,
    /// File or block device to run on.
    pub filename: PathBuf,
    /// Access pattern.
    pub rw: Rw,
    /// Bytes per operation.
    pub bs: usize,
    /// Operations in flight per job (io_uring).
    pub iodepth: u32,
    /// Bytes of the file to use.
    pub size: u64,
    /// Time limit in seconds.
    pub runtime: Option<f64>,
    /// Keep going until `runtime` even after `size` bytes.
    pub time_based: bool,
    /// Jobs (threads), each with its own queue.
    pub numjobs: usize,
    /// O_DIRECT.
    pub direct: bool,
    /// The I/O engine.
    pub engine: Engine,
    /// Read percentage for mixed patterns.
    pub rwmixread: u32,
    /// Seconds run before measuring.
    pub ramp_time: f64,
    /// Register the ring buffers with the kernel (fio's `fixedbufs`).
    pub fixedbufs: bool,
    /// Register the file with the kernel (fio's `registerfiles`).
    pub registerfiles: bool,
}

/// Per-direction results.
pub struct DirStats {
    /// Operations completed while measuring.
    pub ios: u64,
    /// Bytes transferred while measuring.
    pub bytes: u64,
    /// Completion latency, ns.
    pub clat: Histogram<u64>,
}

impl DirStats {
    fn new() -> DirStats {
        DirStats {
            ios: 0,
            bytes: 0,
            clat: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds"),
        }
    }
    fn add(&mut self, o: &DirStats) {
        self.ios += o.ios;
        self.bytes += o.bytes;
        let _ = self.clat.add(&o.clat);
    }
}

/// The merged results of all jobs.
pub struct RawResult {
    /// Reads.
    pub read: DirStats,
    /// Writes.
    pub write: DirStats,
    /// Wall time measured (ramp time excluded).
    pub elapsed: Duration,
    /// Whether every job's io_uring buffers were registered with the kernel.
    pub registered_buffers: bool,
}

fn is_write(rw: Rw, rng: &mut ChaCha8Rng, mix: u32) -> bool {
    match rw {
        Rw::Read | Rw::Randread => false,
        Rw::Write | Rw::Randwrite => true,
        Rw::Randrw | Rw::Rw => rng.random_range(0..100u32) >= mix,
    }
}

struct Offsets {
    rand: bool,
    blocks: u64,
    bs: u64,
    pos: u64,
    rng: ChaCha8Rng,
}

impl Offsets {
    /// Job `j`'s offsets for `job`: block-aligned, random or sequential (wrapping).
    fn new(job: &RawJob, j: u64) -> Offsets {
        Offsets {
            rand: matches!(job.rw, Rw::Randread | Rw::Randwrite | Rw::Randrw),
            blocks: job.size / job.bs as u64,
            bs: job.bs as u64,
            pos: 0,
            rng: ChaCha8Rng::seed_from_u64(0x2545_f491_4f6c_dd1d ^ ((j + 1) * 0x9e37)),
        }
    }

    fn next(&mut self) -> u64 {
        if self.rand {
            self.rng.random_range(0..self.blocks) * self.bs
        } else {
            let o = self.pos;
            self.pos = (self.pos + 1) % self.blocks;
            o * self.bs
        }
    }
}

/// Make sure the file exists and holds `size` bytes of data (so reads read real blocks).
pub fn layout_file(job: &RawJob) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&job.filename)
        .with_context(|| format!("opening {}", job.filename.display()))?;
    let meta = f.metadata()?;
    if meta.file_type().is_file() && meta.len() < job.size {
        let chunk = 1usize << 20;
        let mut buf = vec![0u8; chunk];
        ChaCha8Rng::seed_from_u64(0x1234_5678).fill_bytes(&mut buf);
        let mut off = meta.len() / chunk as u64 * chunk as u64;
        while off < job.size {
            let n = (job.size - off).min(chunk as u64) as usize;
            f.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
        f.sync_all()?;
    }
    Ok(())
}

fn open(job: &RawJob) -> Result<RawFile> {
    RawFile::open(&job.filename, job.direct).with_context(|| {
        format!(
            "opening {} (direct={})",
            job.filename.display(),
            job.direct as u8
        )
    })
}

/// Run all jobs (one thread each) and merge their results.
pub fn run(job: &RawJob) -> Result<RawResult> {
    if job.bs == 0 || job.size < job.bs as u64 {
        bail!("--size must be at least --bs");
    }
    layout_file(job)?;
    let file = open(job)?;
    let probe = file.probe()?;
    let align = probe.mem_align.max(probe.logical_block) as usize;
    if job.direct && job.bs % probe.logical_block as usize != 0 {
        bail!(
            "--bs={} is not a multiple of the device's logical block size {}",
            job.bs,
            probe.logical_block
        );
    }
    let start = Instant::now();
    let results: Vec<Result<(DirStats, DirStats, bool)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..job.numjobs.max(1))
            .map(|j| {
                let file = &file;
                s.spawn(move || match job.engine {
                    Engine::IoUring => run_uring(job, file, j as u64, align),
                    Engine::Psync => run_psync(job, file, j as u64, align),
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("job thread panicked"))?)
            .collect()
    });
    let elapsed = start
        .elapsed()
        .saturating_sub(Duration::from_secs_f64(job.ramp_time));
    let mut read = DirStats::new();
    let mut write = DirStats::new();
    let mut registered = true;
    for r in results {
        let (rd, wr, reg) = r?;
        read.add(&rd);
        write.add(&wr);
        registered &= reg;
    }
    Ok(RawResult {
        read,
        write,
        elapsed,
        registered_buffers: registered && job.engine == Engine::IoUring,
    })
}

struct Clock {
    t0: Instant,
    ramp: Duration,
    end: Option<Duration>,
}

impl Clock {
    fn new(job: &RawJob) -> Clock {
        let ramp = Duration::from_secs_f64(job.ramp_time);
        Clock {
            t0: Instant::now(),
            ramp,
            end: job.runtime.map(|r| ramp + Duration::from_secs_f64(r)),
        }
    }
    fn measuring(&self) -> bool {
        self.t0.elapsed() >= self.ramp
    }
    fn expired(&self) -> bool {
        self.end.is_some_and(|e| self.t0.elapsed() >= e)
    }
}

fn run_uring(
    job: &RawJob,
    file: &RawFile,
    j: u64,
    align: usize,
) -> Result<(DirStats, DirStats, bool)> {
    let depth = job.iodepth.max(1);
    let opts = QueueOptions {
        register_buffers: job.fixedbufs,
        register_file: job.registerfiles,
        single_issuer: true,
        ..QueueOptions::new(depth, job.bs, align.max(4096))
    };
    let mut queue = file.queue(&opts).context("setting up io_uring")?;
    let reg = queue.registered_buffers();
    for b in 0..queue.buffer_count() as u16 {
        let mut rng = ChaCha8Rng::seed_from_u64(0x9e37_79b9 ^ ((b as u64 + 1) * 0x1000_0001));
        rng.fill_bytes(queue.buffer_mut(b).expect("idle"));
    }
    let mut offs = Offsets::new(job, j);
    let mut mix_rng = ChaCha8Rng::seed_from_u64(0x1357_9bdf_u64 ^ j);
    let (mut rd, mut wr) = (DirStats::new(), DirStats::new());
    let mut issued: u64 = 0;
    let limit = if job.time_based { u64::MAX } else { job.size };
    let mut t_sub: Vec<(Instant, bool)> = vec![(Instant::now(), false); queue.buffer_count()];
    let mut free: Vec<u16> = (0..queue.buffer_count() as u16).rev().collect();
    let mut done: Vec<Completion> = Vec::with_capacity(depth as usize);
    let clock = Clock::new(job);
    let mut err = None;
    loop {
        let stop = clock.expired() || issued >= limit || err.is_some();
        if !stop {
            while let Some(b) = free.pop() {
                let w = is_write(job.rw, &mut mix_rng, job.rwmixread);
                let off = offs.next();
                let r = if w {
                    queue.push_write(b, job.bs, off, b as u64)
                } else {
                    queue.push_read(b, job.bs, off, b as u64)
                };
                if let Err(e) = r {
                    free.push(b);
                    err = Some(anyhow!(e));
                    break;
                }
                t_sub[b as usize] = (Instant::now(), w);
                issued += job.bs as u64;
                if issued >= limit {
                    break;
                }
            }
        }
        if queue.in_flight() == 0 {
            break;
        }
        queue.submit_and_wait(1).context("io_uring wait")?;
        done.clear();
        queue.reap(&mut done);
        let now = Instant::now();
        let measuring = clock.measuring();
        for c in &done {
            free.push(c.buf);
            let (t0, w) = t_sub[c.buf as usize];
            if c.result < 0 {
                err.get_or_insert(
                    anyhow!(std::io::Error::from_raw_os_error(-c.result)).context("I/O failed"),
                );
                continue;
            }
            if !measuring {
                continue;
            }
            let st = if w { &mut wr } else { &mut rd };
            st.ios += 1;
            st.bytes += c.result as u64;
            st.clat
                .saturating_record(now.duration_since(t0).as_nanos() as u64);
        }
    }
    if let Some(e) = err {
        return Err(e);
    }
    Ok((rd, wr, reg))
}

fn run_psync(
    job: &RawJob,
    file: &RawFile,
    j: u64,
    align: usize,
) -> Result<(DirStats, DirStats, bool)> {
    let file = file.file();
    let mut buf = AlignedBuf::new(job.bs, align.max(4096));
    ChaCha8Rng::seed_from_u64(0x9e37_79b9).fill_bytes(buf.as_mut_slice());
    let mut offs = Offsets::new(job, j);
    let mut mix_rng = ChaCha8Rng::seed_from_u64(0x1357_9bdf_u64 ^ j);
    let (mut rd, mut wr) = (DirStats::new(), DirStats::new());
    let mut issued = 0u64;
    let limit = if job.time_based { u64::MAX } else { job.size };
    let clock = Clock::new(job);
    while !clock.expired() && issued < limit {
        let w = is_write(job.rw, &mut mix_rng, job.rwmixread);
        let off = offs.next();
        let t0 = Instant::now();
        if w {
            file.write_all_at(buf.as_slice(), off)?;
        } else {
            file.read_exact_at(buf.as_mut_slice(), off)?;
        }
        issued += job.bs as u64;
        if clock.measuring() {
            let st = if w { &mut wr } else { &mut rd };
            st.ios += 1;
            st.bytes += job.bs as u64;
            st.clat.saturating_record(t0.elapsed().as_nanos() as u64);
        }
    }
    Ok((rd, wr, false))
}

fn dir_json(d: &DirStats, secs: f64) -> Value {
    let pct = |q: f64| d.clat.value_at_quantile(q);
    json!({
        "io_bytes": d.bytes,
        "io_kbytes": d.bytes / 1024,
        "bw_bytes": if secs > 0.0 { (d.bytes as f64 / secs) as u64 } else { 0 },
        "bw": if secs > 0.0 { (d.bytes as f64 / secs / 1024.0) as u64 } else { 0 },
        "iops": if secs > 0.0 { d.ios as f64 / secs } else { 0.0 },
        "runtime": (secs * 1000.0) as u64,
        "total_ios": d.ios,
        "clat_ns": {
            "min": if d.ios > 0 { d.clat.min() } else { 0 },
            "max": d.clat.max(),
            "mean": d.clat.mean(),
            "percentile": {
                "50.000000": pct(0.50),
                "99.000000": pct(0.99),
                "99.900000": pct(0.999),
            }
        }
    })
}

/// fio-compatible JSON (the subset: jobs[0].read/write with io_bytes, bw_bytes, bw, iops,
/// runtime, clat_ns percentiles), one aggregated job as with group_reporting.
pub fn to_json(job: &RawJob, r: &RawResult) -> Value {
    let secs = r.elapsed.as_secs_f64();
    json!({
        "tool": "kvbench",
        "jobs": [{
            "jobname": job.name,
            "groupid": 0,
            "job options": {
                "rw": format!("{:?}", job.rw).to_lowercase(),
                "bs": job.bs,
                "iodepth": job.iodepth,
                "size": job.size,
                "numjobs": job.numjobs,
                "direct": job.direct as u8,
                "ioengine": match job.engine { Engine::IoUring => "io_uring", Engine::Psync => "psync" },
                "filename": job.filename.display().to_string(),
                "registered_buffers": r.registered_buffers,
            },
            "read": dir_json(&r.read, secs),
            "write": dir_json(&r.write, secs),
        }]
    })
}

/// Print fio's human-readable summary.
pub fn print_normal(job: &RawJob, r: &RawResult) {
    let secs = r.elapsed.as_secs_f64();
    println!(
        "{}: (rw={:?}, bs={}, iodepth={}, numjobs={}, ioengine={}, direct={}{})",
        job.name,
        job.rw,
        job.bs,
        job.iodepth,
        job.numjobs,
        match job.engine {
            Engine::IoUring => "io_uring",
            Engine::Psync => "psync",
        },
        job.direct as u8,
        if r.registered_buffers {
            ", registered buffers"
        } else {
            ""
        }
    );
    for (name, d) in [("read", &r.read), ("write", &r.write)] {
        if d.ios == 0 {
            continue;
        }
        let bw = d.bytes as f64 / secs;
        println!(
            "  {name}: IOPS={}, BW={} ({}MiB/{}msec)",
            super::fmt_count(d.ios as f64 / secs),
            super::fmt_bw(bw),
            d.bytes >> 20,
            (secs * 1000.0) as u64
        );
        let us = |q: f64| d.clat.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "    clat (usec): min={:.1}, avg={:.1}, p50={:.1}, p99={:.1}, p99.9={:.1}, max={:.1}",
            d.clat.min() as f64 / 1000.0,
            d.clat.mean() / 1000.0,
            us(0.5),
            us(0.99),
            us(0.999),
            d.clat.max() as f64 / 1000.0
        );
    }
}
