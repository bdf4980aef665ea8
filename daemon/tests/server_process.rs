//! The `instinferd` binary as systemd runs it: readiness and watchdog notifications on a
//! notify socket, SIGTERM during running streams (drain, abort after the grace period, exit
//! code 0), JSON logs with request ids, and configuration from file, environment and flags.

mod server_support;

use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use server_support::process::*;
use server_support::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn sigterm_drains_running_streams_and_exits_zero() {
    // READY=1 comes with the bound addresses, after the model is loaded.
    let Supervised {
        mut child,
        notices,
        mut seen,
        logs,
        grpc,
        dir: _socket_dir,
    } = start_supervised(&["--shutdown-grace-ms", "6000"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (long, short) = rt.block_on(async {
        let mut c = InferenceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let mut a = text_request("Write a very long story.", 4000);
        a.ignore_eos = true;
        a.request_id = "long-one".into();
        let mut b = text_request("Count to five:", 8);
        b.ignore_eos = true;
        b.request_id = "short-one".into();
        let mut sa = c.generate(a).await.unwrap().into_inner();
        let mut sb = c.generate(b).await.unwrap().into_inner();
        sa.message().await.unwrap().unwrap();
        sb.message().await.unwrap().unwrap();

        let pid = child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());

        let (ra, rb) = tokio::join!(collect(sa), collect(sb));
        // No new requests once draining (refused, or the port is closed).
        let fresh = InferenceClient::connect(format!("http://{grpc}")).await;
        if let Ok(mut fresh) = fresh {
            let r = fresh.generate(text_request("Hi", 2)).await;
            assert!(r.is_err(), "a request during the drain was accepted");
        }
        (ra, rb)
    });

    let status = wait_exit(&mut child, Duration::from_secs(30));
    let logs = logs.join().unwrap();
    let status = status.unwrap_or_else(|| panic!("instinferd did not exit within 30 s:\n{logs}"));
    assert_eq!(status.code(), Some(0), "exit status {status:?}:\n{logs}");

    // The short stream finished within the grace period; the long one was aborted with a
    // reason that says why.
    assert_eq!(short.reason(), pb::FinishReason::Length, "{short:?}");
    assert_eq!(short.usage().generated_tokens, 8);
    assert_eq!(long.reason(), pb::FinishReason::Aborted, "{long:?}");
    let msg = &long.finished.as_ref().unwrap().message;
    assert!(
        msg.contains("shutting down") && msg.contains("6000 ms"),
        "{msg}"
    );
    assert!((long.usage().generated_tokens as usize) < 4000);

    notifications_until(&notices, "STOPPING=1", &mut seen);
    seen.extend(notices.try_iter());
    assert!(
        seen.iter().any(|m| m.lines().any(|l| l == "WATCHDOG=1")),
        "no watchdog ping in {seen:?}"
    );

    // JSON logs, one object per line, request ids on the request's lines.
    let mut finished_ids = Vec::new();
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
        if v["message"] == "finished" {
            finished_ids.push(v["span"]["request_id"].as_str().unwrap().to_string());
        }
    }
    finished_ids.sort();
    assert_eq!(finished_ids, ["long-one", "short-one"], "{logs}");
    assert!(logs.contains("stopped cleanly"), "{logs}");
}

/// Human-readable logs written to a pipe (as to journald or a file) carry no ANSI colour
/// codes, and listening beyond loopback without TLS or a token gets a loud warning.
#[test]
fn logs_to_a_pipe_are_plain_and_an_exposed_listener_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let notices = read_notifications(UnixDatagram::bind(&sock_path).unwrap());
    let mut child = instinferd()
        .args(["--model", model_path().to_str().unwrap()])
        .args([
            "--threads",
            "1",
            "--grpc-addr",
            "0.0.0.0:0",
            "--http-addr",
            "off",
        ])
        .args(["--metrics-addr", "127.0.0.1:0", "--kv-cache", "ram"])
        .args(["--log-format", "human"])
        .env_remove("NO_COLOR")
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start instinferd");
    let logs = collect_stderr(&mut child);
    notifications_until(&notices, "READY=1", &mut Vec::new());
    let status = stop_with_sigterm(&mut child, Duration::from_secs(30));
    let logs = logs.join().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "ANSI escape codes in piped logs:\n{logs:?}"
    );
    assert!(logs.contains("serving"), "{logs}");
    let warning = logs
        .lines()
        .find(|l| l.contains("!!! gRPC listens on 0.0.0.0"))
        .unwrap_or_else(|| panic!("no warning about the exposed listener:\n{logs}"));
    assert!(
        warning.contains("WARN") && warning.contains("neither TLS nor a bearer token"),
        "{warning}"
    );
}

/// A store file that a crash left unformatted (sized, its header never written) does not
/// stop the daemon: it formats the store again, says why in the log, and serves.
#[test]
fn a_store_left_unformatted_by_a_crash_is_formatted_at_start() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = dir.path().join("kv.store");
    std::fs::File::create(&store)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock_path = dir.path().join("notify.sock");
    let notices = read_notifications(UnixDatagram::bind(&sock_path).unwrap());
    let mut child = instinferd()
        .args(["--model", model_path().to_str().unwrap()])
        .args([
            "--threads",
            "1",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "off",
        ])
        .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
        .arg("--kv-store-path")
        .arg(&store)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start instinferd");
    let logs = collect_stderr(&mut child);
    let mut seen = Vec::new();
    notifications_until(&notices, "READY=1", &mut seen);
    let grpc = grpc_addr_of(seen.last().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(async {
        let mut c = InferenceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        generate(&mut c, text_request("The capital of France is", 4)).await
    });
    let status = stop_with_sigterm(&mut child, Duration::from_secs(30));
    let logs = logs.join().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{logs}");
    assert_eq!(r.usage().generated_tokens, 4, "{r:?}");
    assert!(
        logs.lines()
            .any(|l| l.contains("never fully formatted") && l.contains("WARN")),
        "no logged reason:\n{logs}"
    );
}

#[test]
fn config_comes_from_file_env_and_flags_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instinferd.toml");
    std::fs::write(
        &file,
        "grpc_addr = \"127.0.0.1:7000\"\nmax_queued_requests = 5\nmax_prompt_tokens = 100\nshutdown_grace_ms = 1234\n",
    )
    .unwrap();
    let out = check_config(
        instinferd()
            .arg("--config")
            .arg(&file)
            .args(["--max-prompt-tokens", "7"])
            .env("INSTINFER_MAX_PROMPT_TOKENS", "50")
            .env("INSTINFER_GRPC_ADDR", "127.0.0.1:7001")
            .env("INSTINFER_MAX_CONCURRENT_SEQUENCES", "3"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["max_prompt_tokens"], 7, "flag over environment over file");
    assert_eq!(v["grpc_addr"], "127.0.0.1:7001", "environment over file");
    assert_eq!(v["max_concurrent_sequences"], 3, "environment");
    assert_eq!(v["max_queued_requests"], 5, "file");
    assert_eq!(v["shutdown_grace_ms"], 1234, "file");
    assert_eq!(v["metrics_addr"], "127.0.0.1:9464", "default");

    // The shipped example configuration is valid.
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/instinferd.toml");
    let out = check_config(instinferd().arg("--config").arg(&shipped));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["grpc_addr"], "127.0.0.1:50051");
    // It shows the defaults: every key it sets resolves as if it were left out.
    let out = check_config(&mut instinferd());
    let mut defaults: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(defaults["kv_cache"], "flash", "{defaults}");
    assert_eq!(
        defaults["kv_store_path"],
        scratch_state_home()
            .join("instinfer/kv.store")
            .to_str()
            .unwrap(),
    );
    // The default store size follows the free space, which may move between the two runs.
    let mut v = v;
    let (a, b) = (
        v["kv_store_bytes"].take().as_u64().unwrap(),
        defaults["kv_store_bytes"].take().as_u64().unwrap(),
    );
    assert!(a.abs_diff(b) <= 256 << 20, "kv_store_bytes {a} vs {b}");
    assert_eq!(v, defaults, "deploy/instinferd.toml must show the defaults");
    // The helper moves the HTTP API to an ephemeral port; its own default is port 8000.
    let out = check_config(instinferd().env_remove("INSTINFER_HTTP_ADDR"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["http_addr"], "127.0.0.1:8000", "default");
}

/// With no KV settings at all the daemon keeps the KV cache on flash, in `kv.store` in its
/// state directory (the first of systemd's `STATE_DIRECTORY` paths, else
/// `$XDG_STATE_HOME/instinfer`), sized min(16 GiB, half the free space there).
#[test]
fn the_kv_cache_is_on_flash_in_the_state_directory_by_default() {
    use instinfer::config::{available_bytes, DEFAULT_KV_STORE_BYTES, KV_STORE_FILE};
    // Under the build's scratch folder, not /tmp, which may be a RAM filesystem: the default
    // store is preallocated (up to 16 GiB) and removed with the folder at the end.
    let state = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = state.path().join(KV_STORE_FILE);

    // XDG_STATE_HOME when systemd gives no folder.
    let out = check_config(instinferd().env("XDG_STATE_HOME", state.path()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["kv_store_path"],
        state
            .path()
            .join("instinfer")
            .join(KV_STORE_FILE)
            .to_str()
            .unwrap()
    );
    assert!(
        !state.path().join("instinfer").exists(),
        "--check-config creates nothing"
    );

    // systemd's folder wins, the first of several.
    let state_directory = format!("{}:/nonexistent/second", state.path().display());
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let notices = read_notifications(sock);
    let free_before = available_bytes(&store).unwrap();
    let mut child = instinferd()
        .env("STATE_DIRECTORY", &state_directory)
        .args(["--model", model_path().to_str().unwrap()])
        .args(["--threads", "2", "--grpc-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start instinferd");
    let logs = collect_stderr(&mut child);
    let mut seen = Vec::new();
    notifications_until(&notices, "READY=1", &mut seen);
    let grpc = grpc_addr_of(seen.last().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (info, r) = rt.block_on(async {
        let mut c = InferenceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let info = c
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        let r = generate(&mut c, text_request("The capital of France is", 8)).await;
        (info, r)
    });
    let store_len = std::fs::metadata(&store).map(|m| m.len());
    let status = stop_with_sigterm(&mut child, Duration::from_secs(30));
    let logs = logs.join().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{logs}");

    assert_eq!(info.kv_store, "flash", "{info:?}");
    assert_eq!(r.usage().generated_tokens, 8, "{r:?}");
    let line = |message: &str| -> serde_json::Value {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in:\n{logs}"))
    };
    assert_eq!(line("serving")["kv"], "flash", "{logs}");
    let config: serde_json::Value =
        serde_json::from_str(line("starting")["config"].as_str().unwrap()).unwrap();
    assert_eq!(config["kv_cache"], "flash");
    assert_eq!(config["kv_store_path"], store.to_str().unwrap());
    let bytes = config["kv_store_bytes"].as_u64().unwrap();
    // The store file is there, at the size the configuration chose.
    let store_len = store_len.unwrap_or_else(|e| panic!("no store at {}: {e}", store.display()));
    assert_eq!(store_len, bytes, "{logs}");
    // min(16 GiB, half the free space), up to what else changed on the disk meanwhile.
    let want = DEFAULT_KV_STORE_BYTES.min(free_before / 2);
    assert!(
        bytes <= DEFAULT_KV_STORE_BYTES && bytes.abs_diff(want) <= want / 100 + (64 << 20),
        "kv_store_bytes {bytes}, expected about {want} ({free_before} bytes free)"
    );
}

#[test]
fn bad_configuration_fails_before_anything_binds() {
    let dir = tempfile::tempdir().unwrap();
    let fails = |cmd: &mut Command, needle: &str| {
        let out = cmd.output().expect("run instinferd");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{needle}: {err}");
        assert!(err.contains(needle), "{needle:?} not in: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "max_tokenz = 3\n").unwrap();
    fails(instinferd().arg("--config").arg(&unknown), "max_tokenz");
    fails(
        instinferd().env("INSTINFER_MAX_CONCURRENT_SEQUENCES", "0"),
        "max_concurrent_sequences",
    );
    fails(
        instinferd()
            .arg("--config")
            .arg(dir.path().join("missing.toml")),
        "missing.toml",
    );
    // Not a check-only run: still refused before the model is loaded or a port bound.
    let err = fails(
        instinferd().args(["--tls-cert-path", "/nonexistent/cert.pem"]),
        "tls_key_path",
    );
    assert!(!err.contains("serving"), "{err}");

    // A port that is taken: a clear error naming the address, exit code 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails(
        instinferd()
            .args(["--model", model_path().to_str().unwrap(), "--threads", "1"])
            .args(["--grpc-addr", &addr, "--metrics-addr", "127.0.0.1:0"])
            .args(["--kv-cache", "ram"]),
        &format!("cannot listen for gRPC on {addr}"),
    );

    // A context past the model's trained length (SmolLM2: 8192) is refused, naming both,
    // unless explicitly allowed.
    let err = fails(
        instinferd()
            .args(["--model", model_path().to_str().unwrap(), "--threads", "1"])
            .args(["--kv-cache", "ram", "--context-tokens", "20000"]),
        "20000",
    );
    assert!(
        err.contains("8192") && err.contains("allow-untrained-context"),
        "{err}"
    );
    fails(
        instinferd().args(["--context-tokens", "0"]),
        "context_tokens",
    );

    // RAM is a choice of its own: a store path with it is a contradiction, named as such.
    let err = fails(
        instinferd().args(["--kv-cache", "ram", "--kv-store-path", "kv.store"]),
        "kv_store_path",
    );
    assert!(err.contains("kv_cache"), "{err}");
    // A value that is not a choice is refused while parsing, as clap refuses any bad flag
    // value (exit code 2), naming the value and the choices.
    let out = instinferd()
        .env("INSTINFER_KV_CACHE", "disk")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("disk") && err.contains("flash") && err.contains("ram"),
        "{err}"
    );
}

/// The unit passes `systemd-analyze verify` once install.sh has put the binaries in place
/// (staged under a temporary root next to a copy of the system's units).
#[test]
fn systemd_unit_verifies_after_install() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is needed (apt-get install systemd; scripts/test.sh does it as root)"
    );
    let root = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_instinferd"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new(repo.join("deploy/install.sh"))
        .arg("--no-model")
        .env("DESTDIR", root.path())
        .env("BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "usr/local/bin/instinferd",
        "usr/local/bin/instinfer",
        "etc/instinferd/instinferd.toml",
        "etc/systemd/system/instinferd.service",
    ] {
        assert!(
            root.path().join(f).is_file(),
            "install.sh did not install {f}"
        );
    }
    // The system's own units (targets the service depends on), copied with their links.
    let units = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&units).unwrap();
    let cp = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&units)
        .status()
        .unwrap();
    assert!(cp.success());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("/etc/systemd/system/instinferd.service")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    assert!(
        !text.contains("instinferd"),
        "warnings about the unit:\n{text}"
    );

    // Hardened, with the GPUs reachable: systemd's own exposure score at most 2.5.
    let unit = repo.join("deploy/instinferd.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        !text.lines().any(|l| l.starts_with("PrivateDevices=")),
        "PrivateDevices hides GPUs"
    );
    assert!(
        text.contains("DevicePolicy=closed")
            && text.contains("DeviceAllow=char-nvidia-frontend rw")
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("instinferd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(score <= 2.5, "exposure {score} over 2.5:\n{report}");
}

/// A panic in the scheduler thread itself (planted by `[fault_injection]`, outside any
/// request's work): the running request fails instead of hanging, systemd is told the
/// daemon failed and why, the watchdog pings stop, and the process exits non-zero so that systemd
/// restarts it, with the panic and its backtrace in the log.
#[test]
fn a_dead_scheduler_stops_the_daemon_with_an_error() {
    let Supervised {
        mut child,
        notices,
        mut seen,
        logs,
        grpc,
        dir: _socket_dir,
    } = start_supervised(&["--http-addr", "off", "--scheduler-panic-at-step", "3"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let outcome = rt.block_on(async {
        let mut c = InferenceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let mut req = text_request("Write a long story.", 64);
        req.ignore_eos = true;
        let mut s = c.generate(req).await.unwrap().into_inner();
        let mut tokens = 0;
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match s.message().await {
                    Ok(Some(m)) => match m.event {
                        Some(pb::generate_response::Event::Token(_)) => tokens += 1,
                        Some(pb::generate_response::Event::Finished(f)) => {
                            break Ok((tokens, Some(f)))
                        }
                        None => {}
                    },
                    Ok(None) => break Ok((tokens, None)),
                    Err(status) => break Err((tokens, status)),
                }
            }
        })
        .await
        .expect("the stream did not hang")
    });
    // The scheduler died at its third step: the stream got at most two tokens, then an error.
    match &outcome {
        Err((tokens, status)) => {
            assert!(*tokens <= 2, "{outcome:?}");
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
        Ok((tokens, f)) => {
            let f = f
                .as_ref()
                .unwrap_or_else(|| panic!("ended without a finish: {outcome:?}"));
            assert!(*tokens <= 2, "{outcome:?}");
            assert_eq!(f.reason, pb::FinishReason::Error as i32, "{f:?}");
        }
    }

    let status = wait_exit(&mut child, Duration::from_secs(30));
    let logs = logs.join().unwrap();
    let status = status.unwrap_or_else(|| panic!("instinferd did not exit within 30 s:\n{logs}"));
    assert!(!status.success(), "exit status {status:?}:\n{logs}");
    assert!(
        logs.contains("planted scheduler panic at step 3")
            && logs.contains("\"backtrace\"")
            && logs.contains("the scheduler thread panicked"),
        "the panic, its backtrace and the scheduler's end are not in the log:\n{logs}"
    );
    seen.extend(notices.try_iter());
    let failed = seen
        .iter()
        .position(|m| m.contains("STATUS=failed") && m.contains("scheduler"))
        .unwrap_or_else(|| panic!("no STATUS=failed naming the scheduler in {seen:?}"));
    assert!(
        !seen[failed..]
            .iter()
            .any(|m| m.lines().any(|l| l == "WATCHDOG=1")),
        "watchdog pings after the failure: {seen:?}"
    );
}
