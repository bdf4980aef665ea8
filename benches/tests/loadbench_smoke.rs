//! `loadbench` over gRPC and the HTTP API against the real daemon binary: 4 streams of 6
//! tokens per interface, one round. Every stream must complete with its tokens, and the
//! report must carry both interfaces and HTTP's ratios to gRPC.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{daemon_next_to, free_local_addr};

#[test]
fn loadbench_runs_over_grpc_and_http_in_one_report() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_loadbench"));
    let daemon = daemon_next_to(&bench);
    let (grpc, http, metrics) = (free_local_addr(), free_local_addr(), free_local_addr());
    let mut child = Command::new(&daemon)
        .args(["--kv-cache", "ram", "--threads", "2", "--log-level", "warn"])
        .arg("--grpc-addr")
        .arg(grpc.to_string())
        .arg("--http-addr")
        .arg(http.to_string())
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .env_remove("INSTINFER_CONFIG")
        .env_remove("INSTINFER_BEARER_TOKEN")
        .stdout(Stdio::null())
        .spawn()
        .expect("start instinferd");
    // Ready once the HTTP port answers (the model loads first).
    let t = Instant::now();
    while std::net::TcpStream::connect(http).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "instinferd did not start"
        );
        assert!(child.try_wait().unwrap().is_none(), "instinferd exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new(&bench)
        .arg("--server")
        .arg(grpc.to_string())
        .arg("--http")
        .arg(http.to_string())
        .args([
            "--streams",
            "4",
            "--max-tokens",
            "6",
            "--rounds",
            "1",
            "--json",
        ])
        .env_remove("INSTINFER_SERVER_TOKEN")
        .output()
        .expect("run loadbench");
    let _ = child.kill();
    let _ = child.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadbench failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let phases = v["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases
        .iter()
        .map(|p| p["interface"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["grpc", "http"], "{v}");
    for p in phases {
        assert_eq!(
            (p["completed"].as_u64(), p["errors"].as_u64()),
            (Some(4), Some(0)),
            "{p}"
        );
        assert!(p["aggregate_tok_per_s"].as_f64().unwrap() > 0.0, "{p}");
    }
    let r = v["http_over_grpc"]["aggregate_tok_per_s"]
        .as_f64()
        .expect("a ratio");
    assert!(r.is_finite() && r > 0.0, "{v}");
}
