//! Crash test: a child process (this test binary, re-invoked) writes, persists and reclaims
//! sequences and is killed with SIGKILL at random points; after every kill the store is
//! reopened and must hold exactly the persisted sequences, intact.
//!
//! There is one test, `crash_kill_reopen`, in two roles: run normally it is the parent; the
//! parent re-runs it with the store path in `CSD_CRASH_CHILD_STORE` to make it the child,
//! whose workload it then runs. Either way it does real work, and the parent asserts that
//! every child it started announced itself and ran.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use csd_engine::{KvError, KvStore, LayerRead, PageShape, StoreConfig, StoreOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPE: PageShape = PageShape {
    layers: 4,
    kv_heads: 2,
    head_dim: 64,
    block_tokens: 32,
};
const CHILD_ENV: &str = "CSD_CRASH_CHILD_STORE";
const PHASE_ENV: &str = "CSD_CRASH_CHILD_PHASE";

fn opts() -> StoreOptions {
    StoreOptions {
        min_extent_blocks: 2,
        max_extent_blocks: 64,
        ..Default::default()
    }
}

fn seq_len(seq: u64) -> usize {
    20 + (seq as usize * 37) % 150
}

/// The child's workload, phase `phase` on the store at `path`: the role `crash_kill_reopen`
/// takes when the parent starts it with `CSD_CRASH_CHILD_STORE` set.
fn child_workload(path: &Path, phase: u64) {
    // Start on a line of our own: the test harness has printed "test crash_kill_reopen ... "
    // without ending its line.
    println!();
    println!("CHILD {phase}");
    let mut store = if phase == 0 {
        KvStore::create(
            path,
            &StoreConfig {
                shape: SHAPE,
                capacity: 64 << 20,
                options: opts(),
            },
        )
        .unwrap()
    } else {
        KvStore::open(path, &opts()).unwrap()
    };
    // Phase 1+: end some restored sequences first.
    for seq in store.sequences() {
        if seq % 2 == 0 {
            println!("RECLAIMING {seq}");
            store.reclaim(seq).unwrap();
            println!("RECLAIMED {seq}");
        }
    }
    let mut persisted_here = Vec::new();
    for i in 0..100_000u64 {
        let seq = phase * 100_000 + i;
        let n = seq_len(seq);
        // Prefill in two chunks per layer, as a forward pass would.
        let mut r = RefSeq::new(SHAPE.layers as usize);
        let split = n / 3;
        if let Err(e) = append_all(&mut store, &mut r, seq, split)
            .and_then(|_| append_all(&mut store, &mut r, seq, n - split))
        {
            assert!(matches!(e, KvError::StoreFull { .. }), "{e}");
            let _ = store.reclaim(seq);
            break;
        }
        if i % 3 != 2 {
            println!("PERSISTING {seq} {n}");
            store.persist(seq).unwrap();
            println!("PERSISTED {seq} {n}");
            persisted_here.push(seq);
            // More decode tokens after persisting are not part of the persisted state.
            append_all(&mut store, &mut r, seq, 5).unwrap();
        } else if i % 2 == 0 {
            store.reclaim(seq).unwrap();
        }
        if i % 5 == 4 && persisted_here.len() > 2 {
            let old = persisted_here.remove(0);
            println!("RECLAIMING {old}");
            store.reclaim(old).unwrap();
            println!("RECLAIMED {old}");
        }
    }
    println!("DONE");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Present(usize),
    Maybe(usize),
}

/// Returns true if the child was killed mid-run (it had not finished its workload). Panics
/// unless the child announced itself (it ran the workload, not some other test).
fn run_child(
    path: &Path,
    phase: u64,
    kill_after: usize,
    delay_us: u64,
    expect: &mut HashMap<u64, Expect>,
) -> bool {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_kill_reopen",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .env(PHASE_ENV, phase.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut finished = false;
    let mut started = false;
    let mut apply = |line: &str, expect: &mut HashMap<u64, Expect>| -> bool {
        let w: Vec<&str> = line.split_whitespace().collect();
        if line == "DONE" {
            finished = true;
        }
        if line == format!("CHILD {phase}") {
            started = true;
        }
        match w.as_slice() {
            ["PERSISTING", s, n] => {
                expect.insert(s.parse().unwrap(), Expect::Maybe(n.parse().unwrap()));
            }
            ["PERSISTED", s, n] => {
                expect.insert(s.parse().unwrap(), Expect::Present(n.parse().unwrap()));
                return true;
            }
            ["RECLAIMING", s] => {
                let s: u64 = s.parse().unwrap();
                if let Some(Expect::Present(n)) = expect.get(&s).copied() {
                    expect.insert(s, Expect::Maybe(n));
                }
            }
            ["RECLAIMED", s] => {
                expect.remove(&s.parse::<u64>().unwrap());
            }
            _ => {}
        }
        false
    };
    let mut seen = 0;
    while seen < kill_after {
        match lines.next() {
            Some(Ok(l)) => {
                if apply(&l, expect) {
                    seen += 1;
                }
            }
            _ => break,
        }
    }
    std::thread::sleep(Duration::from_micros(delay_us));
    child.kill().unwrap();
    child.wait().unwrap();
    // Everything the child wrote before dying is still in the pipe.
    for l in lines.map_while(Result::ok) {
        apply(&l, expect);
    }
    assert!(
        started,
        "the child of phase {phase} never started its workload"
    );
    !finished
}

fn verify(path: &Path, expect: &mut HashMap<u64, Expect>) -> usize {
    let store = KvStore::open(path, &opts()).unwrap();
    let got = store.sequences();
    for (&seq, e) in expect.iter() {
        if let Expect::Present(_) = e {
            assert!(
                got.contains(&seq),
                "persisted sequence {seq} lost; restored {got:?}"
            );
        }
    }
    let mut out = LayerRead::new();
    for &seq in &got {
        let n = match expect.get(&seq) {
            Some(Expect::Present(n)) | Some(Expect::Maybe(n)) => *n,
            None => panic!("sequence {seq} was never persisted (or was reclaimed) but came back"),
        };
        let mut r = RefSeq::new(SHAPE.layers as usize);
        for layer in 0..SHAPE.layers {
            let (k, v) = kv_data(&SHAPE, seq, layer, 0, n);
            r.k[layer as usize] = k;
            r.v[layer as usize] = v;
        }
        for layer in 0..SHAPE.layers {
            store.read_layer(seq, layer, &mut out).unwrap();
            check_read(&SHAPE, &r, layer as usize, &out)
                .unwrap_or_else(|e| panic!("sequence {seq}: {e}"));
        }
    }
    // Settle the model: what came back is now definitely persisted.
    expect.retain(|s, _| got.contains(s));
    for s in &got {
        if let Some(Expect::Maybe(n)) = expect.get(s).copied() {
            expect.insert(*s, Expect::Present(n));
        }
    }
    got.len()
}

#[test]
fn crash_kill_reopen() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        let phase: u64 = std::env::var(PHASE_ENV).unwrap().parse().unwrap();
        child_workload(Path::new(&path), phase);
        return;
    }
    let dir = disk_tempdir();
    let mut restored_total = 0;
    let mut killed_mid_run = 0;
    // Where each child is killed: after 1..=12 persists, then 0..3 ms more.
    let mut rng = ChaCha8Rng::seed_from_u64(0xc0a5);
    for trial in 0..5u64 {
        let path = dir.path().join(format!("crash{trial}.store"));
        let mut expect = HashMap::new();
        for phase in 0..3u64 {
            let kill_after = rng.random_range(1..=12usize);
            let delay = rng.random_range(0..3000u64);
            killed_mid_run += run_child(&path, phase, kill_after, delay, &mut expect) as u32;
            restored_total += verify(&path, &mut expect);
        }
    }
    assert!(
        killed_mid_run >= 12,
        "only {killed_mid_run} of 15 children were killed mid-run"
    );
    assert!(
        restored_total > 10,
        "too little was persisted to test anything ({restored_total})"
    );
}
