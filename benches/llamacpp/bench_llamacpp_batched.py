#!/usr/bin/env python3
"""llama.cpp's batched decode, the baseline for instinfer's concurrent streams (loadbench).

For each sequence count N: N short prompts (the loadbench prompt with " (i)" appended, so
they differ), prefilled together in one llama_batch, then --gen-tokens greedy steps, each one
llama_batch holding the N sequences' next tokens (llama-cpp-python's low-level API, the way
llama.cpp's own server batches). Prints one JSON line per N with the aggregate decode tok/s
(N x gen tokens / decode time) and the prefill time.

Usage: bench_llamacpp_batched.py MODEL.gguf --sequences 1,8,32 --gen-tokens 128 --threads 2
Needs `pip install llama-cpp-python` (built from source on the machine being measured).
"""
import argparse
import json
import time

import llama_cpp
import numpy as np

PROMPT = "Write a short story about a lighthouse keeper"


def tokenize(vocab, text, add_bos):
    raw = text.encode()
    buf = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), add_bos, False)
    if n < 0:
        raise SystemExit(f"tokenizing {text!r} failed ({n})")
    return list(buf[:n])


def run(model, vocab, n_seq, gen, threads):
    prompts = [tokenize(vocab, f"{PROMPT} ({i})", True) for i in range(n_seq)]
    longest = max(len(p) for p in prompts)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_seq * (longest + gen + 8)
    params.n_batch = max(512, sum(len(p) for p in prompts))
    params.n_ubatch = params.n_batch
    params.n_seq_max = n_seq
    params.n_threads = threads
    params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit("llama_init_from_model failed")
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def submit(items):
        # items: (token, pos, seq, wants_logits)
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if logits else 0
        batch.n_tokens = len(items)
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")

    def argmax(i):
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    items, last = [], []
    for s, p in enumerate(prompts):
        for j, tok in enumerate(p):
            items.append((tok, j, s, j == len(p) - 1))
        last.append(len(items) - 1)
    t = time.perf_counter()
    submit(items)
    prefill = time.perf_counter() - t
    nxt = [argmax(i) for i in last]
    pos = [len(p) for p in prompts]
    t = time.perf_counter()
    for _ in range(gen):
        submit([(nxt[s], pos[s], s, True) for s in range(n_seq)])
        nxt = [argmax(s) for s in range(n_seq)]
        pos = [x + 1 for x in pos]
    decode = time.perf_counter() - t
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return prefill, decode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sequences", default="1,8,32")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(a.model.encode(), mparams)
    if not model:
        raise SystemExit(f"cannot load {a.model}")
    vocab = llama_cpp.llama_model_get_vocab(model)
    for n in [int(x) for x in a.sequences.split(",")]:
        prefill, decode = run(model, vocab, n, a.gen_tokens, a.threads)
        print(json.dumps({
            "engine": "llama.cpp (llama-cpp-python, llama_batch)",
            "sequences": n, "gen_tokens": a.gen_tokens, "threads": a.threads,
            "prefill_s": prefill,
            "aggregate_decode_tok_per_s": n * a.gen_tokens / decode,
        }), flush=True)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
