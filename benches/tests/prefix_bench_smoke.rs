//! `prefix-bench --smoke` against the real daemon binary: a 600-token document, 3 questions
//! cold, warm and after a restart, 2 chat turns. The prefix cache must serve the second warm
//! question and the first question after the restart, and every cached answer must be the
//! uncached one, token for token.
//!
//! The daemon is `instinferd` next to `prefix-bench` in the target folder (built there by
//! `cargo test --workspace`); if it is missing, the test builds it with the same profile.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::daemon_next_to;

#[test]
fn smoke_run_hits_the_cache_warm_and_after_a_restart_with_identical_answers() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_prefix-bench"));
    let daemon = daemon_next_to(&bench);
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.join(format!("prefix-bench-smoke-{}", std::process::id()));
    let o = Command::new(&bench)
        .arg("--smoke")
        .arg("--daemon")
        .arg(&daemon)
        .arg("--store-dir")
        .arg(tmp)
        .arg("--kv-store-bytes")
        .arg((256u64 << 20).to_string())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running prefix-bench");
    let log = std::fs::read_to_string(out.join("instinferd.log")).unwrap_or_default();
    assert!(
        o.status.success(),
        "prefix-bench failed: {}\nstderr:\n{}\ndaemon log:\n{log}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    let report: serde_json::Value = serde_json::from_str(&text).expect("report.json is JSON");
    let s = &report["summary"];
    let phase = |name: &str| {
        report["phases"]
            .as_array()
            .expect("phases")
            .iter()
            .find(|p| p["phase"] == name)
            .unwrap_or_else(|| panic!("no {name} phase"))["requests"]
            .as_array()
            .expect("requests")
            .clone()
    };
    let (cold, warm, restart) = (phase("cold"), phase("warm"), phase("restart"));
    assert_eq!((cold.len(), warm.len(), restart.len()), (3, 3, 3));
    assert_eq!(phase("chat-cached").len(), 2);
    assert_eq!(phase("chat-uncached").len(), 2);
    assert!(
        cold.iter().all(|r| r["cached_tokens"] == 0),
        "cache off must not hit"
    );
    assert!(
        warm[1]["cached_tokens"].as_u64().unwrap_or(0) > 0,
        "the second warm question must start on the cached document: {}",
        warm[1]["cached_tokens"]
    );
    assert!(
        restart[0]["cached_tokens"].as_u64().unwrap_or(0) > 0,
        "the first question after the restart must be warm: {}",
        restart[0]["cached_tokens"]
    );
    assert!(report["checks"]["restart_first_request_warm"] == true);
    for (i, c) in cold.iter().enumerate() {
        for (name, r) in [("warm", &warm[i]), ("restart", &restart[i])] {
            assert!(
                r["ids"] == c["ids"] && r["text"] == c["text"],
                "question {}: {name} answered {:?} where cold answered {:?}",
                i + 1,
                r["text"],
                c["text"]
            );
            assert!(r["generated_tokens"].as_u64().unwrap_or(0) > 0);
        }
    }
    assert_eq!(s["identical_warm"], serde_json::json!([3, 3]));
    assert_eq!(s["identical_restart"], serde_json::json!([3, 3]));
    // Every chat turn gives the same tokens cached and uncached: the next turn starts on
    // the previous reply's pages, which the daemon caches through a prefill of its own.
    let (chat, chat_off) = (phase("chat-cached"), phase("chat-uncached"));
    for (turn, (a, b)) in chat.iter().zip(&chat_off).enumerate() {
        assert_eq!(a["ids"], b["ids"], "chat turn {}", turn + 1);
    }
    assert!(out.join("report.md").exists());
    let _ = std::fs::remove_dir_all(&out);
}
