//! Helpers of the bench smoke tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `instinferd` binary next to `bench`, built first if it is missing.
pub fn daemon_next_to(bench: &Path) -> PathBuf {
    let daemon = bench.with_file_name(format!("instinferd{}", std::env::consts::EXE_SUFFIX));
    if daemon.exists() {
        return daemon;
    }
    let profile_dir = bench.parent().expect("the bench's folder");
    let target_dir = profile_dir.parent().expect("the target folder");
    // target/release holds the release profile's binaries, target/debug those of `cargo
    // test` (the test profile) and of `cargo build` (dev).
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "test",
        Some(other) => other,
        None => "release",
    };
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "instinfer",
            "--bin",
            "instinferd",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build for instinferd");
    assert!(status.success(), "building instinferd failed: {status}");
    assert!(daemon.exists(), "{} was not built", daemon.display());
    daemon
}

/// A loopback address with a port that was free a moment ago.
pub fn free_local_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}
