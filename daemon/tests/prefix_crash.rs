//! kill -9 of the real daemon while its prefix cache fills and evicts: after every restart the
//! store opens, and every request (those that start on recovered pages included) gives the
//! exact greedy tokens of an uncached run. The store's own crash test
//! (csd-engine/tests/prefix_crash.rs) kills a process holding the store at many more points;
//! this one checks the whole daemon, model output included.

mod server_support;

use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use server_support::process::*;
use server_support::*;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Daemons started and killed.
const KILLS: usize = 10;

/// Prompts that share a root, then one of three branches, then their own tail, so cached
/// pages are shared at two depths.
fn prompts() -> Vec<Vec<u32>> {
    let root =
        "Flash keeps every page of keys and values; the drive reads only what matters. ".repeat(5);
    let branches = [
        "The first branch talks about rivers and bridges over quiet water. ".repeat(3),
        "The second branch is about markets, bread and salt in an old town. ".repeat(3),
        "The third branch counts stones along a road in the morning light. ".repeat(3),
    ];
    (0..6)
        .map(|i| {
            encode(&format!(
                "{root}{}Question {i}: what comes next?",
                branches[i % 3]
            ))
        })
        .collect()
}

fn request(ids: &[u32]) -> pb::GenerateRequest {
    let mut r = token_request(ids.to_vec(), 6);
    r.ignore_eos = true;
    r.cache = pb::CacheMode::UseAndStore as i32;
    r
}

/// Start the daemon on `store`; returns it and its gRPC address once it is ready.
fn start_daemon(dir: &std::path::Path, n: usize) -> (std::process::Child, String) {
    let sock_path = dir.join(format!("notify-{n}.sock"));
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let notices = read_notifications(sock);
    let child = instinferd()
        .args(["--model", model_path().to_str().unwrap()])
        .args(["--threads", "2", "--grpc-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .arg("--kv-store-path")
        .arg(dir.join("kv.store"))
        // 24 MiB: about 30 pages of 32 tokens, so the cache evicts all the time.
        .args(["--kv-store-bytes", &(24u64 << 20).to_string()])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start instinferd");
    let mut seen = Vec::new();
    notifications_until(&notices, "READY=1", &mut seen);
    (child, grpc_addr_of(seen.last().unwrap()))
}

#[derive(Default)]
struct Tally {
    checked: usize,
    cached_tokens: u64,
    wrong: Vec<String>,
}

/// Send random prompts until the daemon goes away; check every answer.
async fn client_loop(addr: String, seed: u64, want: Arc<Vec<Vec<u32>>>, tally: Arc<Mutex<Tally>>) {
    let Ok(mut c) = InferenceClient::connect(format!("http://{addr}")).await else {
        return;
    };
    let prompts = prompts();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    loop {
        let i = rng.random_range(0..prompts.len());
        let Ok(stream) = c.generate(request(&prompts[i])).await else {
            return;
        };
        let mut stream = stream.into_inner();
        let mut ids = Vec::new();
        let mut usage = None;
        loop {
            match stream.message().await {
                Ok(Some(m)) => match m.event {
                    Some(pb::generate_response::Event::Token(t)) => ids.push(t.id),
                    Some(pb::generate_response::Event::Finished(f)) => usage = f.usage,
                    None => {}
                },
                Ok(None) => break,
                Err(_) => return, // killed mid-stream
            }
        }
        let Some(u) = usage else { return };
        let mut t = tally.lock().unwrap();
        t.checked += 1;
        t.cached_tokens += u.cached_tokens as u64;
        if ids != want[i] {
            t.wrong.push(format!(
                "prompt {i} with {} cached tokens: {ids:?}, uncached {:?}",
                u.cached_tokens, want[i]
            ));
        }
    }
}

#[test]
fn kill_9_during_prefill_and_eviction_keeps_every_recovered_page_exact() {
    let prompts = prompts();
    let want: Arc<Vec<Vec<u32>>> = Arc::new(
        prompts
            .iter()
            .map(|p| in_process(p.clone(), 6, &[], true, 256).ids)
            .collect(),
    );
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for n in 0..=KILLS {
        let (mut child, addr) = start_daemon(dir.path(), n);
        let client = rt.spawn(client_loop(addr, n as u64, want.clone(), tally.clone()));
        if n == KILLS {
            // The last daemon answers requests for at least 4 s, and until KILLS requests
            // have finished in all (on a loaded machine the earlier rounds may have
            // finished few), then stops.
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(4000)
                || (tally.lock().unwrap().checked < KILLS
                    && start.elapsed() < Duration::from_secs(180))
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            child.kill().unwrap();
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(200..3000)));
            child.kill().unwrap(); // SIGKILL
        }
        child.wait().unwrap();
        rt.block_on(client).unwrap();
    }
    let t = tally.lock().unwrap();
    assert!(
        t.wrong.is_empty(),
        "tokens differ from the uncached run: {:?}",
        t.wrong
    );
    assert!(t.checked >= KILLS, "only {} requests finished", t.checked);
    assert!(
        t.cached_tokens > 0,
        "no request ever started on cached pages"
    );
}
