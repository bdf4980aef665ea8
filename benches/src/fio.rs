//! fio's sequential read bandwidth on the filesystem a benchmark's KV store lives on, at
//! the request size and queue depth the store's io_uring device uses: the drive's limit
//! that `flexgen` is held against.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// One fio job: sequential O_DIRECT reads through io_uring.
#[derive(Clone, Copy, Debug)]
pub struct SeqRead {
    /// Bytes per request.
    pub block_bytes: usize,
    /// Requests in flight.
    pub queue_depth: u32,
    /// Size of the file read.
    pub file_bytes: u64,
    /// How long fio reads.
    pub seconds: u32,
}

impl SeqRead {
    /// fio's command line for this job over `file`.
    pub fn describe(&self) -> String {
        format!(
            "fio --rw=read --bs={}k --iodepth={} --direct=1 --ioengine=io_uring --size={}m --runtime={} --time_based",
            self.block_bytes / 1024,
            self.queue_depth,
            self.file_bytes >> 20,
            self.seconds
        )
    }

    /// Read bandwidth in bytes per second, reading a file in `dir` laid out by the first
    /// measurement and kept for the next (remove it with [`SeqRead::remove`]).
    pub fn measure(&self, dir: &Path) -> Result<f64> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = Self::file(dir);
        let laid_out = std::fs::metadata(&file).is_ok_and(|m| m.len() >= self.file_bytes);
        let r = if laid_out {
            Ok(())
        } else {
            self.lay_out(&file)
        };
        let r = r.and_then(|()| self.run(&file));
        if r.is_err() {
            Self::remove(dir);
        }
        r
    }

    /// Remove the file the measurements read.
    pub fn remove(dir: &Path) {
        let _ = std::fs::remove_file(Self::file(dir));
    }

    fn file(dir: &Path) -> std::path::PathBuf {
        dir.join("fio-seqread.tmp")
    }

    /// Write the file once, so that reads hit written blocks.
    fn lay_out(&self, file: &Path) -> Result<()> {
        let name = format!("--filename={}", file.display());
        let size = format!("--size={}", self.file_bytes);
        let layout = Command::new("fio")
            .args([
                "--name=layout",
                &name,
                &size,
                "--rw=write",
                "--bs=1m",
                "--iodepth=8",
            ])
            .args(["--direct=1", "--ioengine=io_uring", "--output-format=json"])
            .output()
            .context("running fio (Debian: apt-get install -y fio)")?;
        if !layout.status.success() {
            bail!(
                "fio layout failed: {}",
                String::from_utf8_lossy(&layout.stderr).trim()
            );
        }
        Ok(())
    }

    fn run(&self, file: &Path) -> Result<f64> {
        let name = format!("--filename={}", file.display());
        let size = format!("--size={}", self.file_bytes);
        let out = Command::new("fio")
            .args(["--name=seqread", &name, &size, "--rw=read"])
            .arg(format!("--bs={}", self.block_bytes))
            .arg(format!("--iodepth={}", self.queue_depth))
            .arg(format!("--runtime={}", self.seconds))
            .args([
                "--time_based",
                "--direct=1",
                "--ioengine=io_uring",
                "--numjobs=1",
            ])
            .arg("--output-format=json")
            .output()
            .context("running fio")?;
        if !out.status.success() {
            bail!(
                "fio failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        read_bandwidth(&String::from_utf8_lossy(&out.stdout))
    }
}

/// The read bandwidth (bytes/s) of fio's JSON report (anything before the JSON skipped).
pub fn read_bandwidth(report: &str) -> Result<f64> {
    let at = report.find('{').context("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&report[at..]).context("fio's JSON report")?;
    let bw = v["jobs"][0]["read"]["bw_bytes"]
        .as_f64()
        .context("no read bandwidth in fio's report")?;
    if bw <= 0.0 {
        bail!("fio read nothing");
    }
    Ok(bw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bandwidth_out_of_a_report() {
        let r = "note: something\n{\"jobs\": [{\"read\": {\"bw_bytes\": 1690000000}}]}";
        assert_eq!(read_bandwidth(r).unwrap(), 1.69e9);
        assert!(read_bandwidth("{\"jobs\": [{\"read\": {\"bw_bytes\": 0}}]}").is_err());
        assert!(read_bandwidth("fio: no such file").is_err());
    }
}
