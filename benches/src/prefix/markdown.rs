//! The Markdown report of a run: the settings and the machine, a table per phase, one row per
//! request, the chat turns side by side, and the server's counters per phase.

use super::record::{Phase, RequestRecord};
use super::report::{identical_to, percentile, Run};
use std::fmt::Write as _;

impl Run {
    /// The report as Markdown.
    pub fn to_markdown(&self) -> String {
        let s = self.summary();
        let m = &self.machine;
        let mut o = String::new();
        let _ = writeln!(o, "# prefix-bench\n");
        let _ = writeln!(
            o,
            "Started {} with:\n\n```\n{}\n```\n",
            self.started, self.command
        );
        let rot = match m.store_rotational {
            Some(r) => format!(", sysfs rotational={}", u8::from(r)),
            None => String::new(),
        };
        let _ = writeln!(
            o,
            "- Machine: {} ({} CPUs), kernels {}; Linux {}; load average {} before, {} after.",
            m.cpu_model, m.cpus, m.simd, m.kernel, m.load_before, self.load_after
        );
        let _ = writeln!(
            o,
            "- KV store: {} on {} ({}{rot}), {} bytes.",
            m.store_mount, m.store_device, m.store_fs, self.settings["kv_store_bytes"]
        );
        let _ = writeln!(
            o,
            "- Model: {}.",
            self.model["description"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            o,
            "- Document: `{}`, {} tokens used of {} (chat system message: {} tokens).",
            self.document["path"].as_str().unwrap_or(""),
            self.document["tokens"],
            self.document["file_tokens"],
            self.document["chat_tokens"]
        );
        let _ = writeln!(
            o,
            "- Requests one at a time, greedy, at most {} tokens each.\n",
            self.settings["max_tokens"]
        );

        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let _ = writeln!(o, "| phase | requests | TTFT p50 ms | TTFT p99 ms | prompt tokens (mean) | cached tokens (sum) | device MiB written | identical output |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
        let row = |o: &mut String,
                   name: &str,
                   reqs: &[RequestRecord],
                   written: Option<u64>,
                   same: String| {
            let t: Vec<f64> = reqs.iter().map(|r| r.ttft_ms).collect();
            let prompt = reqs.iter().map(|r| f64::from(r.prompt_tokens)).sum::<f64>()
                / reqs.len().max(1) as f64;
            let cached: u64 = reqs.iter().map(|r| u64::from(r.cached_tokens)).sum();
            let written = written.map_or("".to_string(), |b| format!("{:.1}", mib(b)));
            let _ = writeln!(
                o,
                "| {name} | {} | {:.0} | {:.0} | {prompt:.0} | {cached} | {written} | {same} |",
                reqs.len(),
                percentile(&t, 50.0),
                percentile(&t, 99.0),
            );
        };
        let frac = |(a, b): (usize, usize)| format!("{a}/{b}");
        let cold = self.phase(Phase::Cold);
        let warm = self.phase(Phase::Warm);
        let restart = self.phase(Phase::Restart);
        let chat = self.phase(Phase::ChatCached);
        let chat_off = self.phase(Phase::ChatUncached);
        row(
            &mut o,
            "cold (cache off)",
            &cold.requests,
            Some(cold.device_bytes_written),
            "(reference)".into(),
        );
        let (first, rest) = warm.requests.split_at(warm.requests.len().min(1));
        let first_same = identical_to(first, &cold);
        let rest_same = identical_to(rest, &cold);
        row(
            &mut o,
            "warm: first request (the miss that stores the document)",
            first,
            None,
            frac(first_same),
        );
        row(
            &mut o,
            "warm: the other requests (p50/p99 reported)",
            rest,
            None,
            frac(rest_same),
        );
        row(
            &mut o,
            "warm phase, all (bytes: document + replies stored)",
            &warm.requests,
            Some(warm.device_bytes_written),
            frac(s.identical_warm),
        );
        row(
            &mut o,
            "after restart: first request",
            restart.requests.get(..1).unwrap_or_default(),
            None,
            "".into(),
        );
        row(
            &mut o,
            "after restart: all requests",
            &restart.requests,
            Some(restart.device_bytes_written),
            format!(
                "{} to cold, {} to warm",
                frac(s.identical_restart),
                frac(s.identical_restart_warm)
            ),
        );
        row(
            &mut o,
            "chat, cache on",
            &chat.requests,
            Some(chat.device_bytes_written),
            frac(s.identical_chat),
        );
        row(
            &mut o,
            "chat, cache off",
            &chat_off.requests,
            Some(chat_off.device_bytes_written),
            "(reference)".into(),
        );

        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "- Warm TTFT p50 (requests 2..{} of the warm phase; the first is the miss, {:.0} ms): {:.0} ms; cold p50 {:.0} ms: **{:.1}× faster**.",
            warm.requests.len(), s.warm_first_ms, s.warm_p50_ms, s.cold_p50_ms, s.speedup_warm
        );
        let _ = writeln!(
            o,
            "- After the restart: first request TTFT {:.0} ms with {} cached tokens; p50 over all {} {:.0} ms: **{:.1}× faster** than cold. The daemon answered {:.1} s after its start; its log says it recovered {} prefix pages ({} dropped); GetStats before the first request said {} pages.",
            s.restart_first_ms,
            s.restart_first_cached_tokens,
            s.restart_n,
            s.restart_p50_ms,
            s.speedup_restart,
            restart.daemon_ready_s.unwrap_or_default(),
            restart.recovered_in_log.map_or("?".into(), |r| r.0.to_string()),
            restart.recovered_in_log.map_or("?".into(), |r| r.1.to_string()),
            restart.prefix_pages_at_start.unwrap_or_default(),
        );
        let _ = writeln!(
            o,
            "- Prefill tokens saved (served from the cache): warm {} of {}, after restart {} of {}, chat {} of {}.",
            s.saved_tokens_warm, s.prompt_tokens_warm, s.saved_tokens_restart, s.prompt_tokens_restart,
            s.saved_tokens_chat, s.prompt_tokens_chat
        );
        let _ = writeln!(
            o,
            "- Prefix cache after the warm phase: {} pages, {:.1} MiB; ClearCache before it dropped {} pages.",
            warm.prefix_pages,
            mib(warm.prefix_bytes),
            warm.cleared_pages.unwrap_or_default()
        );
        let _ = writeln!(
            o,
            "- Identical greedy output: warm {} and after restart {} against cold, after restart {} against warm, chat {} cached against uncached.",
            frac(s.identical_warm), frac(s.identical_restart), frac(s.identical_restart_warm), frac(s.identical_chat)
        );
        let _ = writeln!(
            o,
            "- Daemon exits on SIGTERM: {}.\n",
            self.daemon_exits.join(", ")
        );

        let _ = writeln!(o, "## Requests\n");
        let _ = writeln!(o, "| phase | # | question | prompt tokens | cached tokens | TTFT ms | client TTFT ms | generated | same as cold |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        for p in [&cold, &warm, &restart] {
            for r in &p.requests {
                let same = match cold.requests.iter().find(|c| c.question == r.question) {
                    Some(_) if r.phase == Phase::Cold => "".to_string(),
                    Some(c) => yes_no(r.same_output(c)).to_string(),
                    None => "(no cold run)".into(),
                };
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {same} |",
                    r.phase.name(),
                    r.index + 1,
                    r.question + 1,
                    r.prompt_tokens,
                    r.cached_tokens,
                    r.ttft_ms,
                    r.client_ttft_ms,
                    r.generated_tokens
                );
            }
        }
        let _ = writeln!(o, "\n## Chat turns\n");
        let _ = writeln!(o, "| turn | prompt tokens | cached tokens | TTFT cached ms | TTFT uncached ms | ratio | same text |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        for (a, b) in chat.requests.iter().zip(&chat_off.requests) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.0} | {:.0} | {:.1}× | {} |",
                a.question + 1,
                a.prompt_tokens,
                a.cached_tokens,
                a.ttft_ms,
                b.ttft_ms,
                if a.ttft_ms > 0.0 {
                    b.ttft_ms / a.ttft_ms
                } else {
                    0.0
                },
                yes_no(a.same_output(b))
            );
        }
        let _ = writeln!(o, "\n## Phases\n");
        let _ = writeln!(o, "| phase | wall s | device MiB written | device MiB read | prefix lookup tokens | prefix hit tokens | prefix pages after | evicted pages |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
        for p in &self.phases {
            let _ = writeln!(
                o,
                "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
                p.phase.name(),
                p.wall_s,
                mib(p.device_bytes_written),
                mib(p.device_bytes_read),
                p.prefix_lookup_tokens,
                p.prefix_hit_tokens,
                p.prefix_pages,
                p.prefix_evicted_pages
            );
        }
        o
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "**no**"
    }
}
