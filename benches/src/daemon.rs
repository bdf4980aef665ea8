//! The `instinferd` under test (prefix-bench, chaosbench), run as a child process on a store
//! file of its own: started, waited for until it answers, stopped with SIGTERM or killed.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How to start the daemon: the same settings at every (re)start.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The `instinferd` binary.
    pub binary: PathBuf,
    /// The GGUF model, passed as `--model`.
    pub model: PathBuf,
    /// The KV store file (`--kv-store-path`); kept between restarts.
    pub store: PathBuf,
    /// Its size when created (`--kv-store-bytes`).
    pub store_bytes: u64,
    /// Compute threads (`--threads`); the daemon's default (all cores) when `None`.
    pub threads: Option<usize>,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Metrics listen address.
    pub metrics_addr: SocketAddr,
    /// HTTP API listen address; `None` turns the HTTP API off.
    pub http_addr: Option<SocketAddr>,
    /// More command-line arguments (engine, connection or fault-injection settings).
    pub extra_args: Vec<String>,
    /// The daemon's stdout and stderr are appended here.
    pub log: PathBuf,
    /// The daemon's log filter (`--log-level`).
    pub log_level: String,
}

impl DaemonConfig {
    /// The command line of one start.
    fn command(&self) -> Result<Command> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut c = Command::new(&self.binary);
        c.arg("--model")
            .arg(&self.model)
            .arg("--kv-cache")
            .arg("flash")
            .arg("--kv-store-path")
            .arg(&self.store)
            .arg("--kv-store-bytes")
            .arg(self.store_bytes.to_string())
            .arg("--grpc-addr")
            .arg(self.grpc_addr.to_string())
            .arg("--metrics-addr")
            .arg(self.metrics_addr.to_string())
            .arg("--http-addr")
            .arg(self.http_addr.map_or("off".into(), |a| a.to_string()))
            .arg("--log-level")
            .arg(&self.log_level)
            .args(&self.extra_args);
        if let Some(t) = self.threads {
            c.arg("--threads").arg(t.to_string());
        }
        // The caller's daemon settings (a config file, a RAM KV cache, a bearer token) must not
        // reach the daemon under test; the model cache's location may.
        for (key, _) in std::env::vars_os() {
            let Some(k) = key.to_str() else { continue };
            if k.starts_with("INSTINFER_") && k != "INSTINFER_CACHE_DIR" {
                c.env_remove(k);
            }
        }
        c.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log file")?)
            .stderr(log);
        Ok(c)
    }
}

/// A free TCP port on the loopback interface (bound, then released for the daemon).
pub fn free_local_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    l.local_addr().context("finding a free port")
}

/// A running daemon. Dropping it without [`Daemon::stop`] still stops it.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Start the daemon of `cfg`.
    pub fn spawn(cfg: &DaemonConfig) -> Result<Daemon> {
        let child = cfg
            .command()?
            .spawn()
            .with_context(|| format!("starting {}", cfg.binary.display()))?;
        tracing::info!(pid = child.id(), grpc = %cfg.grpc_addr, store = %cfg.store.display(), "instinferd started");
        Ok(Daemon {
            child: Some(child),
            log: cfg.log.clone(),
        })
    }

    /// An error if the daemon has exited, naming its status and the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("instinferd was stopped");
        };
        if let Some(status) = child.try_wait().context("polling instinferd")? {
            self.child = None;
            bail!(
                "instinferd exited ({status}); the end of its log ({}):\n{}",
                self.log.display(),
                log_tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `grace` for it to exit (SIGKILL after that, as an error).
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("instinferd was stopped already");
        };
        terminate(&child)?;
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait().context("waiting for instinferd")? {
                tracing::info!(%status, "instinferd stopped");
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "instinferd did not exit within {} s of SIGTERM; killed",
                    grace.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Daemon {
    /// SIGKILL, as a crash would end it: no drain, no flush.
    pub fn kill(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("instinferd was stopped already");
        };
        child.kill().context("sending SIGKILL to instinferd")?;
        child.wait().context("waiting for instinferd")?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if terminate(&child).is_ok() {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Send SIGTERM to `child`.
fn terminate(child: &Child) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("the daemon's pid")?;
    // SAFETY: kill(2) takes plain integers and touches no memory of this process; the pid is
    // our own child's, which has not been reaped yet (its `Child` is alive), so the id cannot
    // have been reused by another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sending SIGTERM to instinferd");
    }
    Ok(())
}

/// The last "prefix cache recovered" line of the daemon's log at `path`: (pages, dropped).
pub fn recovered_from_log(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("prefix cache recovered"))?;
    let field = |name: &str| -> Option<u64> {
        let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    Some((field("pages")?, field("dropped")?))
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
