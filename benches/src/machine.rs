//! The machine a run measured: CPU, SIMD level of the kernels, the store's filesystem and
//! disk, and the load average around the run.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// What the report says about the machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Logical CPUs this process may use.
    pub cpus: usize,
    /// The kernels' instruction-set level on this CPU.
    pub simd: String,
    /// The mount the store lives on: its mount point, filesystem type and source device.
    pub store_mount: String,
    /// Filesystem type of that mount.
    pub store_fs: String,
    /// Source device of that mount.
    pub store_device: String,
    /// Whether the kernel calls that device rotational (`None`: unknown).
    pub store_rotational: Option<bool>,
    /// Kernel release.
    pub kernel: String,
    /// /proc/loadavg when the run began.
    pub load_before: String,
}

impl Machine {
    /// Describe this machine, with the KV store at `store`.
    pub fn describe(store: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let (store_mount, store_fs, store_device) = mount_of(store)
            .unwrap_or_else(|| ("unknown".into(), "unknown".into(), "unknown".into()));
        let store_rotational = rotational(&store_device);
        Machine {
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            simd: instinfer_kernels::simd::level_name().to_string(),
            store_mount,
            store_fs,
            store_device,
            store_rotational,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            load_before: load_average(),
        }
    }
}

/// /proc/loadavg's first three figures.
pub fn load_average() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The mount holding `path` (the longest mount point that is a prefix of it), from
/// /proc/self/mountinfo: (mount point, filesystem type, source).
fn mount_of(path: &Path) -> Option<(String, String, String)> {
    let dir = if path.exists() {
        path.canonicalize().ok()?
    } else {
        path.parent()?.canonicalize().ok()?
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(String, String, String)> = None;
    for line in info.lines() {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split_whitespace().nth(4)?.replace("\\040", " ");
        let mut r = right.split_whitespace();
        let (fs, source) = (r.next()?.to_string(), r.next()?.to_string());
        if dir.starts_with(&point) && best.as_ref().is_none_or(|b| point.len() >= b.0.len()) {
            best = Some((point, fs, source));
        }
    }
    best
}

/// Whether the block device `source` (e.g. `/dev/vda1`) is rotational, from sysfs.
fn rotational(source: &str) -> Option<bool> {
    let name = source.strip_prefix("/dev/")?;
    let mut candidates = vec![name.to_string()];
    // A partition's queue is its disk's: vda1 → vda, nvme0n1p2 → nvme0n1.
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if let Some(disk) = trimmed.strip_suffix('p').filter(|d| d.contains("nvme")) {
        candidates.push(disk.to_string());
    } else if trimmed != name {
        candidates.push(trimmed.to_string());
    }
    candidates.iter().find_map(|d| {
        let v = std::fs::read_to_string(format!("/sys/block/{d}/queue/rotational")).ok()?;
        Some(v.trim() == "1")
    })
}
