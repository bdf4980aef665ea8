#!/usr/bin/env python3
"""The prefix cache through the stock Python gRPC stack (stubs generated from the .proto at
run time, as grpc_client.py does): the same prompt twice reports cached tokens the second
time; a prompt sent with CACHE_MODE_OFF, then with CACHE_MODE_USE_ONLY, is never cached;
ClearCache empties the cache. Prints one JSON object with what it saw.

Usage: prefix_client.py --addr HOST:PORT --proto-root DIR --prompt TEXT --private TEXT
"""

import argparse
import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpc_client import generate_stubs  # noqa: E402


def run(stub, pb, prompt, cache):
    request = pb.GenerateRequest(text=prompt, max_tokens=8, cache=cache)
    ids, finished = [], None
    for msg in stub.Generate(request, timeout=600):
        if msg.WhichOneof("event") == "token":
            ids.append(msg.token.id)
        else:
            finished = msg.finished
    if finished is None:
        sys.exit("the stream ended without a finished message")
    return {
        "ids": ids,
        "cached_tokens": finished.usage.cached_tokens,
        "prompt_tokens": finished.usage.prompt_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--proto-root", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--private", required=True)
    args = ap.parse_args()

    pb, rpc = generate_stubs(args.proto_root)
    channel = grpc.insecure_channel(args.addr)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = rpc.InferenceStub(channel)

    first = run(stub, pb, args.prompt, pb.CACHE_MODE_USE_AND_STORE)
    second = run(stub, pb, args.prompt, pb.CACHE_MODE_UNSPECIFIED)
    private_off = run(stub, pb, args.private, pb.CACHE_MODE_OFF)
    private_use_only = run(stub, pb, args.private, pb.CACHE_MODE_USE_ONLY)
    # Wait until the scheduler is idle: it caches the reply of a request with a prefill of
    # its own after the request ends.
    deadline = time.monotonic() + 120
    while True:
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=30)
        if stats.active_sequences == 0 and stats.queued_requests == 0:
            break
        if time.monotonic() > deadline:
            sys.exit("the server did not become idle")
        time.sleep(0.02)
    cleared = stub.ClearCache(pb.ClearCacheRequest(), timeout=30)
    after_clear = run(stub, pb, args.prompt, pb.CACHE_MODE_USE_ONLY)
    print(
        json.dumps(
            {
                "first": first,
                "second": second,
                "private_off": private_off,
                "private_use_only": private_use_only,
                "prefix_hit_tokens": stats.prefix_hit_tokens,
                "prefix_pages": stats.prefix_pages,
                "pages_dropped": cleared.pages_dropped,
                "after_clear": after_clear,
            }
        )
    )


if __name__ == "__main__":
    main()
