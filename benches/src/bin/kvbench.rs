//! kvbench: fio-like storage benchmark over csd-engine's I/O layer, plus a KV-store workload.
//!
//! Raw I/O (fio flags):
//!   kvbench --name=r --filename=/path/f --rw=randread --bs=4k --iodepth=64 --size=4g \
//!           --runtime=20 --time_based --direct=1 --ioengine=io_uring --output-format=json
//! KV store:
//!   kvbench kv --filename=/path/kv.store --sequences=4 --tokens=8192 --steps=8 \
//!           --fractions=1,0.25,0.125

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use csd_engine::device::EngineChoice;
use csd_engine::PageShape;
use instinfer_benches::kvbench::{kv, parse_size, parse_time, raw};

#[derive(Parser, Debug)]
#[command(
    name = "kvbench",
    version,
    about = "fio-like storage benchmark on csd-engine's I/O layer, and a KV-store workload"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    raw: RawArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Drive the KV store: write S sequences of N tokens, then replay decode-step reads.
    Kv(KvArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OutFmt {
    Normal,
    Json,
}

#[derive(Args, Debug)]
struct RawArgs {
    /// Job name.
    #[arg(long, default_value = "kvbench")]
    name: String,
    /// File (or block device) to run on.
    #[arg(long)]
    filename: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "read")]
    rw: raw::Rw,
    /// Block size (4k, 128k, 1m...).
    #[arg(long, default_value = "4k")]
    bs: String,
    #[arg(long, default_value_t = 1)]
    iodepth: u32,
    /// Bytes of the file to use (and to lay out if the file is shorter).
    #[arg(long, default_value = "1g")]
    size: String,
    /// Run time limit (seconds, or with s/m/ms suffix).
    #[arg(long)]
    runtime: Option<String>,
    /// Keep going until --runtime even after --size bytes.
    #[arg(long = "time_based", alias = "time-based")]
    time_based: bool,
    /// Time to run before measuring.
    #[arg(long = "ramp_time", alias = "ramp-time", default_value = "0")]
    ramp_time: String,
    #[arg(long, default_value_t = 1)]
    numjobs: usize,
    /// 1: O_DIRECT; 0: buffered.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    direct: u8,
    #[arg(long, value_enum, default_value = "io_uring")]
    ioengine: raw::Engine,
    /// io_uring: register the buffers with the kernel (fio's fixedbufs; default on here).
    #[arg(long, default_value_t = 1, num_args = 0..=1, default_missing_value = "1",
          value_parser = clap::value_parser!(u8).range(0..=1))]
    fixedbufs: u8,
    /// io_uring: register the file with the kernel (fio's registerfiles; default on here).
    #[arg(long, default_value_t = 1, num_args = 0..=1, default_missing_value = "1",
          value_parser = clap::value_parser!(u8).range(0..=1))]
    registerfiles: u8,
    /// Read percentage for randrw/rw.
    #[arg(long, default_value_t = 50)]
    rwmixread: u32,
    /// Accepted for fio compatibility; results are always aggregated.
    #[arg(long = "group_reporting", alias = "group-reporting")]
    group_reporting: bool,
    #[arg(long = "output-format", value_enum, default_value = "normal")]
    output_format: OutFmt,
}

#[derive(Args, Debug)]
struct KvArgs {
    /// Store file (or raw block device).
    #[arg(long)]
    filename: PathBuf,
    /// Store capacity (default: fits the workload with 25% slack).
    #[arg(long)]
    size: Option<String>,
    #[arg(long, default_value_t = 30)]
    layers: u32,
    #[arg(long = "kv-heads", default_value_t = 3)]
    kv_heads: u32,
    #[arg(long = "head-dim", default_value_t = 64)]
    head_dim: u32,
    #[arg(long = "block-tokens", default_value_t = 32)]
    block_tokens: u32,
    /// Sequences (S).
    #[arg(long, default_value_t = 4)]
    sequences: u64,
    /// Tokens per sequence (N).
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Decode steps to replay per fraction.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Page-set fractions per step; 1 = whole-layer scans.
    #[arg(long, value_delimiter = ',', default_value = "1,0.25,0.125")]
    fractions: Vec<f64>,
    /// Reader threads per step.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long = "prefill-chunk", default_value_t = 512)]
    prefill_chunk: usize,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    direct: u8,
    #[arg(long, value_enum, default_value = "io_uring")]
    ioengine: raw::Engine,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long = "output-format", value_enum, default_value = "normal")]
    output_format: OutFmt,
}

fn main() -> Result<()> {
    instinfer_runtime::logging::init_from_env("warn");
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Kv(a)) => run_kv(a),
        None => run_raw(cli.raw),
    }
}

fn run_raw(a: RawArgs) -> Result<()> {
    let Some(filename) = a.filename else {
        bail!("--filename is required")
    };
    let runtime = a.runtime.as_deref().map(parse_time).transpose()?;
    if a.time_based && runtime.is_none() {
        bail!("--time_based needs --runtime");
    }
    let job = raw::RawJob {
        name: a.name,
        filename,
        rw: a.rw,
        bs: parse_size(&a.bs)? as usize,
        iodepth: a.iodepth,
        size: parse_size(&a.size)?,
        runtime,
        time_based: a.time_based,
        numjobs: a.numjobs,
        direct: a.direct == 1,
        engine: a.ioengine,
        rwmixread: a.rwmixread.min(100),
        ramp_time: parse_time(&a.ramp_time)?,
        fixedbufs: a.fixedbufs == 1,
        registerfiles: a.registerfiles == 1,
    };
    let r = raw::run(&job)?;
    match a.output_format {
        OutFmt::Json => println!("{}", serde_json::to_string_pretty(&raw::to_json(&job, &r))?),
        OutFmt::Normal => raw::print_normal(&job, &r),
    }
    Ok(())
}

fn run_kv(a: KvArgs) -> Result<()> {
    let shape = PageShape {
        layers: a.layers,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        block_tokens: a.block_tokens,
    };
    shape.validate()?;
    let per_seq = (a.tokens + a.steps * a.fractions.len() + a.block_tokens as usize) as u64
        * shape.bytes_per_token();
    let capacity = match &a.size {
        Some(s) => parse_size(s)?,
        None => (per_seq * a.sequences * 5 / 4).max(64 << 20) + (64 << 20),
    };
    if a.fractions.iter().any(|f| !(*f > 0.0 && *f <= 1.0)) {
        bail!("--fractions must be in (0, 1]");
    }
    let job = kv::KvJob {
        filename: a.filename,
        capacity,
        shape,
        sequences: a.sequences,
        tokens: a.tokens,
        steps: a.steps,
        fractions: a.fractions,
        threads: a.threads.max(1),
        engine: match a.ioengine {
            raw::Engine::IoUring => EngineChoice::IoUring,
            raw::Engine::Psync => EngineChoice::Psync,
        },
        direct: a.direct == 1,
        seed: a.seed,
        prefill_chunk: a.prefill_chunk,
    };
    let r = kv::run(&job)?;
    match a.output_format {
        OutFmt::Json => println!("{}", serde_json::to_string_pretty(&kv::to_json(&job, &r))?),
        OutFmt::Normal => kv::print_normal(&job, &r),
    }
    Ok(())
}
