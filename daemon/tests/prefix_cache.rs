//! The prefix cache through the real server: prompts that share a prefix share its KV pages on
//! flash, and every hit gives the tokens an uncached run gives; concurrent streams, a chat's
//! next turn, ClearCache while pages are read, admission under the store's budget, cache
//! choices, and recovery after a restart (and invalidation by another model file or format).

mod server_support;

use instinfer::config::KvCache;
use instinfer_proto::v1 as pb;
use instinfer_runtime::chat::ChatMessage;
use instinfer_runtime::kv::AttentionMode;
use instinfer_runtime::LoadedModel;
use server_support::*;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Tokens per page of the store (the granularity of sharing).
const PAGE: usize = 32;

/// A deterministic document of about `words` words of plain English.
fn document(words: usize, seed: u64) -> String {
    const W: &[&str] = &[
        "the", "drive", "keeps", "pages", "of", "keys", "and", "values", "on", "flash", "while",
        "a", "small", "model", "reads", "only", "blocks", "that", "matter", "for", "each", "step",
        "river", "stone", "bridge", "over", "quiet", "water", "morning", "light", "falls",
        "across", "old", "town", "market", "where", "people", "trade", "bread", "salt",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = String::new();
    for i in 0..words {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push_str(W[(x >> 33) as usize % W.len()]);
        out.push(if i % 17 == 16 { '.' } else { ' ' });
        if i % 17 == 16 {
            out.push(' ');
        }
    }
    out
}

/// A server with its KV cache on flash in `dir`, `store_bytes` big.
fn flash_config(
    dir: &Path,
    store_bytes: u64,
    f: impl FnOnce(&mut instinfer::config::ConfigLayer),
) -> instinfer::config::Config {
    config(|l| {
        l.kv_cache = Some(KvCache::Flash);
        l.kv_store_path = Some(dir.join("kv.store"));
        l.kv_store_bytes = Some(store_bytes);
        l.max_concurrent_sequences = Some(16);
        f(l);
    })
}

fn request(
    ids: &[u32],
    max_tokens: u32,
    mode: AttentionMode,
    cache: pb::CacheMode,
) -> pb::GenerateRequest {
    let mut r = token_request(ids.to_vec(), max_tokens);
    r.attention = match mode {
        AttentionMode::Full => pb::AttentionMode::Full,
        AttentionMode::Flexgen => pb::AttentionMode::Flexgen,
        AttentionMode::Sparse => pb::AttentionMode::Sparse,
    } as i32;
    r.cache = cache as i32;
    r
}

/// Pages a hit on `prompt` can take: all full pages that leave at least two tokens to run.
fn shareable(prompt: usize) -> usize {
    prompt.saturating_sub(2) / PAGE * PAGE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_give_the_tokens_of_a_miss_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(&flash_config(dir.path(), 256 << 20, |_| {})).await;
    let mut c = client(&h).await;
    let prompt = encode(&document(260, 1));
    assert!(prompt.len() > 6 * PAGE, "{} tokens", prompt.len());
    for mode in AttentionMode::ALL {
        let off = generate(&mut c, request(&prompt, 16, mode, pb::CacheMode::Off)).await;
        assert_eq!(off.usage().cached_tokens, 0, "{mode}");
        let store = generate(
            &mut c,
            request(&prompt, 16, mode, pb::CacheMode::UseAndStore),
        )
        .await;
        let hit = generate(&mut c, request(&prompt, 16, mode, pb::CacheMode::UseOnly)).await;
        assert_eq!(
            hit.usage().cached_tokens as usize,
            shareable(prompt.len()),
            "{mode}: the second request starts on every shareable page"
        );
        assert_eq!(
            off.ids, store.ids,
            "{mode}: store run differs from the uncached run"
        );
        assert_eq!(
            off.ids, hit.ids,
            "{mode}: a hit differs from the uncached run"
        );
        assert_eq!(off.text, hit.text, "{mode}");
    }
    let s = stats(&mut c).await;
    assert!(
        s.prefix_hit_tokens >= 3 * shareable(prompt.len()) as u64,
        "{s:?}"
    );
    assert!(s.prefix_pages >= (prompt.len() / PAGE) as u64, "{s:?}");
    assert!(
        s.kv_store_bytes_used > 0 && s.kv_store_bytes_total >= 200 << 20,
        "{s:?}"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_streams_share_one_prefix_and_each_matches_its_uncached_run() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(&flash_config(dir.path(), 512 << 20, |_| {})).await;
    let doc = document(200, 2);
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            encode(&format!(
                "{doc}\nQuestion {i}: which word comes after number {i}?"
            ))
        })
        .collect();
    let run = |cache: pb::CacheMode| {
        let prompts = prompts.clone();
        let addr = h.grpc_addr();
        async move {
            let tasks: Vec<_> = prompts
                .into_iter()
                .map(|p| {
                    tokio::spawn(async move {
                        let mut c = pb::inference_client::InferenceClient::connect(format!(
                            "http://{addr}"
                        ))
                        .await
                        .unwrap();
                        generate(&mut c, request(&p, 8, AttentionMode::Full, cache)).await
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let uncached = run(pb::CacheMode::Off).await;
    // One request puts the document in the cache; then all sixteen at once start on it.
    let mut c = client(&h).await;
    generate(
        &mut c,
        request(
            &prompts[0],
            1,
            AttentionMode::Full,
            pb::CacheMode::UseAndStore,
        ),
    )
    .await;
    let cached = run(pb::CacheMode::UseOnly).await;
    let doc_pages = encode(&doc).len() / PAGE * PAGE;
    for (i, (u, k)) in uncached.iter().zip(&cached).enumerate() {
        assert_ne!(u.reason(), pb::FinishReason::Error, "stream {i}: {u:?}");
        assert_eq!(u.reason(), k.reason(), "stream {i}");
        assert_eq!(u.usage().cached_tokens, 0, "stream {i}");
        assert!(
            k.usage().cached_tokens as usize >= doc_pages.saturating_sub(PAGE),
            "stream {i}: {} cached tokens, the document has {doc_pages} in full pages",
            k.usage().cached_tokens
        );
        assert_eq!(
            u.ids, k.ids,
            "stream {i}: cached and uncached tokens differ"
        );
    }
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_cache_while_streams_read_shared_pages_and_behind_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(&flash_config(dir.path(), 256 << 20, |l| {
        l.bearer_token = Some("s3cret".into());
    }))
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth = |mut r: tonic::Request<()>| {
        r.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        Ok(r)
    };
    let mut c = pb::inference_client::InferenceClient::with_interceptor(channel.clone(), auth);
    let mut anon = pb::inference_client::InferenceClient::new(channel);
    let e = anon
        .clear_cache(pb::ClearCacheRequest {})
        .await
        .expect_err("ClearCache without the token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    let prompt = encode(&document(150, 3));
    let base = collect(
        c.generate(request(
            &prompt,
            24,
            AttentionMode::Full,
            pb::CacheMode::UseAndStore,
        ))
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    // Until the scheduler has nothing running (the job that caches base's reply included).
    loop {
        let s = c
            .get_stats(pb::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.active_sequences == 0 && s.queued_requests == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Four streams on the cached pages; clear the cache once they are decoding.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let s = c
            .generate(request(
                &prompt,
                24,
                AttentionMode::Full,
                pb::CacheMode::UseOnly,
            ))
            .await
            .unwrap()
            .into_inner();
        streams.push(s);
    }
    let mut firsts = Vec::new();
    for s in streams.iter_mut() {
        let m = s.message().await.unwrap().expect("a first token");
        firsts.push(m);
    }
    let cleared = c
        .clear_cache(pb::ClearCacheRequest {})
        .await
        .expect("ClearCache")
        .into_inner();
    assert!(
        cleared.pages_dropped >= (prompt.len() / PAGE) as u64,
        "{cleared:?}"
    );
    for (s, first) in streams.into_iter().zip(firsts) {
        let mut rest = collect(s).await;
        let Some(pb::generate_response::Event::Token(t)) = first.event else {
            panic!("first message is not a token")
        };
        rest.ids.insert(0, t.id);
        assert_eq!(
            rest.ids, base.ids,
            "a stream reading cleared pages went wrong"
        );
        assert!(rest.usage().cached_tokens > 0);
    }
    let s = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner();
    assert_eq!(s.prefix_pages, 0, "{s:?}");
    let after = collect(
        c.generate(request(
            &prompt,
            4,
            AttentionMode::Full,
            pb::CacheMode::UseOnly,
        ))
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    assert_eq!(after.usage().cached_tokens, 0, "the cache was cleared");
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_evicts_unshared_pages_and_refuses_what_cannot_fit() {
    let dir = tempfile::tempdir().unwrap();
    // 30 layers × 3 kv heads × 64 × f16 × (K, V): 23,040 bytes a token, 737,280 a page of
    // 32; 16 MiB holds 22 pages. a (~230 tokens) leaves 7 pages cached; b with 350 tokens to
    // generate reserves 19, so a's pages must go.
    let h = start(&flash_config(dir.path(), 16 << 20, |_| {})).await;
    let mut c = client(&h).await;
    let a = encode(&document(220, 4));
    let b = encode(&document(220, 5));
    let first = generate(
        &mut c,
        request(&a, 4, AttentionMode::Full, pb::CacheMode::UseAndStore),
    )
    .await;
    assert_ne!(first.reason(), pb::FinishReason::Error, "{first:?}");
    let s1 = stats(&mut c).await;
    assert!(s1.prefix_pages > 0, "{s1:?}");
    // b needs room that only evicting a's pages gives.
    let second = generate(
        &mut c,
        request(&b, 350, AttentionMode::Full, pb::CacheMode::UseOnly),
    )
    .await;
    assert_ne!(second.reason(), pb::FinishReason::Error, "{second:?}");
    let s2 = stats(&mut c).await;
    assert!(s2.prefix_evicted_pages > 0, "nothing was evicted: {s2:?}");
    // A request that cannot fit even in an empty store is refused before any prefill.
    let mut big = request(&b, 2000, AttentionMode::Full, pb::CacheMode::UseAndStore);
    big.max_tokens = Some(1500);
    let st = refused(&mut c, big).await;
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("budget"), "{}", st.message());
    assert!(!st.message().contains("offset"), "{}", st.message());
    let s3 = stats(&mut c).await;
    assert_eq!(
        s3.prefix_evicted_pages, s2.prefix_evicted_pages,
        "a doomed request evicted pages"
    );
    // And the server goes on serving, the cache intact for what is left.
    let again = generate(
        &mut c,
        request(&b, 4, AttentionMode::Full, pb::CacheMode::UseOnly),
    )
    .await;
    let n = again.ids.len().min(second.ids.len());
    assert!(n > 0);
    assert_eq!(again.ids[..n], second.ids[..n]);
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_off_and_use_only_add_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(&flash_config(dir.path(), 128 << 20, |_| {})).await;
    let mut c = client(&h).await;
    let p = encode(&document(120, 6));
    generate(
        &mut c,
        request(&p, 4, AttentionMode::Full, pb::CacheMode::Off),
    )
    .await;
    generate(
        &mut c,
        request(&p, 4, AttentionMode::Full, pb::CacheMode::UseOnly),
    )
    .await;
    let s = stats(&mut c).await;
    assert_eq!(s.prefix_pages, 0, "{s:?}");
    let r = generate(
        &mut c,
        request(&p, 4, AttentionMode::Full, pb::CacheMode::UseOnly),
    )
    .await;
    assert_eq!(r.usage().cached_tokens, 0);
    let bad = request(&p, 4, AttentionMode::Full, pb::CacheMode::Off);
    let mut bad = bad;
    bad.cache = 42;
    let st = refused(&mut c, bad).await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("cache"), "{}", st.message());
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_turn_two_starts_on_turn_one_and_its_reply() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(&flash_config(dir.path(), 128 << 20, |_| {})).await;
    let mut c = client(&h).await;
    let l = loaded();
    let template = l
        .chat
        .as_ref()
        .expect("the default model has a chat template");
    let doc = document(160, 7);
    let turn1 = vec![
        ChatMessage::new("system", "You answer in one short sentence."),
        ChatMessage::new("user", format!("{doc}\nWhat is this text about?")),
    ];
    let text1 = template.render(&turn1, true).unwrap();
    let ids1 = encode(&text1);
    let r1 = generate(
        &mut c,
        request(&ids1, 24, AttentionMode::Full, pb::CacheMode::UseAndStore),
    )
    .await;
    // The reply joins the cache through a prefill the scheduler runs after the request.
    let reply_pages = ((ids1.len() + r1.ids.len()) / PAGE) as u64;
    wait_for_stats(&mut c, Duration::from_secs(120), "the reply's pages", |s| {
        s.prefix_pages >= reply_pages
    })
    .await;
    let mut turn2 = turn1.clone();
    turn2.push(ChatMessage::new("assistant", r1.text.clone()));
    turn2.push(ChatMessage::new("user", "Say it again, shorter."));
    let text2 = template.render(&turn2, true).unwrap();
    // The template renders earlier turns byte for byte as before.
    assert!(
        text2.starts_with(&text1),
        "turn 2 does not extend turn 1:\n{text1}\n---\n{text2}"
    );
    let ids2 = encode(&text2);
    let r2 = generate(
        &mut c,
        request(&ids2, 8, AttentionMode::Full, pb::CacheMode::UseAndStore),
    )
    .await;
    let cached = r2.usage().cached_tokens as usize;
    assert!(
        cached >= ids1.len() / PAGE * PAGE,
        "{cached} cached of turn 1's {}",
        ids1.len()
    );
    // When the reply re-tokenizes to the ids that were generated, its pages hit too.
    let mut history = ids1.clone();
    history.extend(&r1.ids);
    if ids2.starts_with(&history) {
        let expect = (history.len() / PAGE * PAGE).min(shareable(ids2.len()));
        assert!(
            cached >= expect,
            "{cached} cached, the reply's pages end at {expect}"
        );
    }
    let uncached = generate(
        &mut c,
        request(&ids2, 8, AttentionMode::Full, pb::CacheMode::Off),
    )
    .await;
    assert_eq!(
        uncached.text, r2.text,
        "turn 2 on cached pages (the reply's included) differs from a fresh prefill"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_survives_restart_and_another_model_or_format_invalidates_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = flash_config(dir.path(), 128 << 20, |_| {});
    let p = encode(&document(150, 8));
    let first = {
        let h = start(&cfg).await;
        let mut c = client(&h).await;
        let r = generate(
            &mut c,
            request(&p, 12, AttentionMode::Full, pb::CacheMode::UseAndStore),
        )
        .await;
        h.shutdown().await.unwrap();
        r
    };
    // A restart: the first request is already warm, and gives the same tokens.
    {
        let h = start(&cfg).await;
        let mut c = client(&h).await;
        let r = generate(
            &mut c,
            request(&p, 12, AttentionMode::Full, pb::CacheMode::UseAndStore),
        )
        .await;
        assert_eq!(r.usage().cached_tokens as usize, shareable(p.len()));
        assert_eq!(r.ids, first.ids);
        h.shutdown().await.unwrap();
    }
    // Another model file (the same weights plus one byte, so another digest): the cache it
    // finds is dropped, the request is served uncached and gives the same tokens.
    let copy = dir.path().join("model-copy.gguf");
    let mut bytes = std::fs::read(model_path()).unwrap();
    bytes.push(0);
    std::fs::write(&copy, bytes).unwrap();
    {
        let other = Arc::new(LoadedModel::load(&copy).expect("the copy loads"));
        let h = instinfer::server::start(&cfg, other)
            .await
            .expect("start on the copy");
        let mut c = client(&h).await;
        let s = stats(&mut c).await;
        assert_eq!(
            s.prefix_pages, 0,
            "pages of another model file survived: {s:?}"
        );
        let r = generate(
            &mut c,
            request(&p, 12, AttentionMode::Full, pb::CacheMode::UseOnly),
        )
        .await;
        assert_eq!(r.usage().cached_tokens, 0);
        assert_eq!(r.ids, first.ids);
        h.shutdown().await.unwrap();
    }
    // A store of another on-disk format version is replaced at start, with a logged reason.
    let store = dir.path().join("kv.store");
    let mut f = std::fs::read(&store).unwrap();
    f[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&store, &f).unwrap();
    {
        let h = start(&cfg).await;
        let mut c = client(&h).await;
        let r = generate(
            &mut c,
            request(&p, 12, AttentionMode::Full, pb::CacheMode::UseAndStore),
        )
        .await;
        assert_eq!(r.usage().cached_tokens, 0);
        assert_eq!(r.ids, first.ids);
        h.shutdown().await.unwrap();
    }
    // A file that is not a store is never overwritten: the server refuses to start.
    std::fs::write(&store, vec![7u8; 1 << 20]).unwrap();
    let e = instinfer::server::start(&cfg, loaded())
        .await
        .err()
        .expect("a foreign file at kv_store_path is refused");
    assert!(e.to_string().contains("not a KV store"), "{e}");
    assert_eq!(std::fs::read(&store).unwrap(), vec![7u8; 1 << 20]);
}
