//! Helpers for tests that run the real `instinferd` binary: a clean environment, the
//! systemd notify socket it announces readiness on, and waiting for it to exit.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const CONFIG_ENV: &[&str] = &[
    "INSTINFER_CONFIG",
    "INSTINFER_PAGE_CACHE_BYTES",
    "INSTINFER_TARGET_MASS",
    "INSTINFER_MAX_BLOCKS",
    "INSTINFER_MIN_BLOCKS",
    "INSTINFER_STEP_BUDGET_BLOCKS",
    "INSTINFER_SINK_BLOCKS",
    "INSTINFER_RECENT_BLOCKS",
    "INSTINFER_PROBE_BLEND",
    "INSTINFER_SCORE",
    "INSTINFER_QUEST_RUNS",
    "INSTINFER_ESTIMATE_SKIPPED",
    "INSTINFER_MODEL",
    "INSTINFER_THREADS",
    "INSTINFER_GRPC_ADDR",
    "INSTINFER_HTTP_ADDR",
    "INSTINFER_METRICS_ADDR",
    "INSTINFER_MAX_CONCURRENT_SEQUENCES",
    "INSTINFER_MAX_QUEUED_REQUESTS",
    "INSTINFER_MAX_PROMPT_TOKENS",
    "INSTINFER_MAX_TOKENS_LIMIT",
    "INSTINFER_DEFAULT_MAX_TOKENS",
    "INSTINFER_PREFILL_CHUNK_TOKENS",
    "INSTINFER_MAX_REQUEST_BYTES",
    "INSTINFER_SHUTDOWN_GRACE_MS",
    "INSTINFER_TLS_CERT_PATH",
    "INSTINFER_TLS_KEY_PATH",
    "INSTINFER_BEARER_TOKEN",
    "INSTINFER_BEARER_TOKEN_PATH",
    "INSTINFER_LOG_FORMAT",
    "INSTINFER_LOG_LEVEL",
    "INSTINFER_KV_CACHE",
    "INSTINFER_KV_STORE_PATH",
    "INSTINFER_KV_STORE_BYTES",
];

/// A state directory for daemons that do not name one, under the build's scratch folder,
/// so that no test places a KV store in the real home (tests that start a daemon still
/// choose RAM or their own store; `--check-config` creates nothing).
pub fn scratch_state_home() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("instinferd-state")
}

/// `instinferd` with a clean `INSTINFER_*` environment, the HTTP API on an ephemeral port
/// (`INSTINFER_HTTP_ADDR`, so that daemons of parallel tests never meet on the default one),
/// and the default KV store's folder under [`scratch_state_home`].
pub fn instinferd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_instinferd"));
    for k in CONFIG_ENV {
        c.env_remove(k);
    }
    c.env("INSTINFER_HTTP_ADDR", "127.0.0.1:0");
    c.env_remove("STATE_DIRECTORY");
    c.env("XDG_STATE_HOME", scratch_state_home());
    c
}

pub fn check_config(cmd: &mut Command) -> Output {
    cmd.arg("--check-config").output().expect("run instinferd")
}

/// Read the daemon's notify socket on a thread, as systemd would, so that the daemon never
/// waits on a full socket; the messages arrive on the returned channel.
pub fn read_notifications(sock: UnixDatagram) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            if tx
                .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Notifications until one has the line `want`.
pub fn notifications_until(
    rx: &std::sync::mpsc::Receiver<String>,
    want: &str,
    seen: &mut Vec<String>,
) {
    loop {
        let msg = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("no {want:?} from the daemon ({e}); got {seen:?}"));
        let done = msg.lines().any(|l| l == want);
        seen.push(msg);
        if done {
            return;
        }
    }
}

/// Send SIGTERM to `child` (systemd's stop), then its exit status as [`wait_exit`] gives it.
pub fn stop_with_sigterm(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_exit(child, timeout)
}

/// The exit status, or `None` (after killing it) when it did not exit within `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The gRPC address in a daemon's `READY=1` notification (`STATUS=serving gRPC on ADDR ...`).
pub fn grpc_addr_of(ready: &str) -> String {
    ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=serving gRPC on "))
        .unwrap_or_else(|| panic!("no serving status in {ready:?}"))
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

/// The HTTP API's address in a daemon's `READY=1` notification.
pub fn http_addr_of(ready: &str) -> String {
    ready
        .lines()
        .find_map(|l| l.split_once(" HTTP on "))
        .unwrap_or_else(|| panic!("no HTTP address in {ready:?}"))
        .1
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

/// The stderr of `child`, read to its end on a thread.
pub fn collect_stderr(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    use std::io::Read;
    let mut stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    })
}

/// A daemon started as systemd runs it: a notify socket read on a thread, a 400 ms watchdog,
/// JSON logs on a pipe, the default model on two threads with the KV cache in RAM, and any
/// `extra` flags; returned once it has said READY=1.
pub struct Supervised {
    pub child: Child,
    pub notices: std::sync::mpsc::Receiver<String>,
    /// The notifications so far, READY=1 last.
    pub seen: Vec<String>,
    /// The daemon's stderr, read to its end on a thread.
    pub logs: std::thread::JoinHandle<String>,
    /// The gRPC address from READY=1.
    pub grpc: String,
    /// Holds the notify socket; keep it bound until the end of the test.
    pub dir: tempfile::TempDir,
}

pub fn start_supervised(extra: &[&str]) -> Supervised {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let notices = read_notifications(sock);
    let mut child = instinferd()
        .args(["--model", super::model_path().to_str().unwrap()])
        .args(["--threads", "2", "--grpc-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--log-format", "json", "--kv-cache", "ram"])
        .args(extra)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start instinferd");
    let logs = collect_stderr(&mut child);
    let mut seen = Vec::new();
    notifications_until(&notices, "READY=1", &mut seen);
    let grpc = grpc_addr_of(seen.last().unwrap());
    Supervised {
        child,
        notices,
        seen,
        logs,
        grpc,
        dir,
    }
}
