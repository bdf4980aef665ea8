#!/usr/bin/env python3
"""llama.cpp baseline for `instinfer bench`: same GGUF, same thread count, same prompt
shape. Prints prefill and decode tok/s as one JSON line.

Usage: bench_llamacpp.py MODEL.gguf --prompt-tokens N --gen-tokens M --threads T
Needs `pip install llama-cpp-python` (built from source on the machine being measured).
"""
import argparse
import json
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--text", default=None, help="file whose tokens (repeated) form the prompt")
    a = ap.parse_args()
    n_ctx = a.prompt_tokens + a.gen_tokens + 8
    llm = Llama(a.model, n_ctx=n_ctx, n_batch=a.batch, n_ubatch=a.batch, n_threads=a.threads,
                n_threads_batch=a.threads, verbose=False)
    text = open(a.text).read() if a.text else "The quick brown fox jumps over the lazy dog. " * 64
    base = llm.tokenize(text.encode(), add_bos=False, special=False)
    prompt = (base * (a.prompt_tokens // len(base) + 1))[: a.prompt_tokens]
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def last_argmax():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    nxt = last_argmax()
    t = time.perf_counter()
    for _ in range(a.gen_tokens):
        llm.eval([nxt])
        nxt = last_argmax()
    decode = time.perf_counter() - t
    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python)",
        "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "threads": a.threads,
        "prefill_tok_per_s": a.prompt_tokens / prefill, "decode_tok_per_s": a.gen_tokens / decode,
    }))


if __name__ == "__main__":
    main()
