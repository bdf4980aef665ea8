"""The official `openai` Python package, unchanged, against a live instinferd.

Run by daemon/tests/server_python.rs. Every check that fails raises, with what was seen;
on success one JSON object with what the Rust side compares goes to stdout.

Usage: openai_client.py --base-url http://HOST:PORT/v1 --metrics http://HOST:PORT
                        --token TOKEN --model MODEL_ID
"""

import argparse
import json
import threading
import time
import urllib.request

import httpx
import openai

# Tokens in each of the 8 concurrent streams.
STREAM_TOKENS = 160


def metric(metrics_url, name):
    """The value of the sample `name` (labels as printed) on the metrics page."""
    page = urllib.request.urlopen(metrics_url + "/metrics", timeout=10).read().decode()
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name} on the metrics page")


def wait_metric(metrics_url, name, want, timeout_s=20.0):
    t = time.time()
    while True:
        got = metric(metrics_url, name)
        if got == want:
            return
        if time.time() - t > timeout_s:
            raise AssertionError(f"{name} is {got}, waited for {want}")
        time.sleep(0.05)


def expect_error(kind, status, fn, param=None):
    """`fn` must raise the openai error `kind` with `status` and OpenAI's error object."""
    try:
        fn()
    except kind as e:
        assert e.status_code == status, (status, e.status_code, e.body)
        body = e.body
        assert isinstance(body, dict) and body.get("message") and body.get("type"), body
        if param is not None:
            assert body.get("param") == param, (param, body)
        return body
    raise AssertionError(f"expected {kind.__name__} ({status})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    a = ap.parse_args()
    # No retries: a 429 or 5xx must show as it is.
    client = openai.OpenAI(base_url=a.base_url, api_key=a.token, max_retries=0, timeout=120)
    out = {}

    # GET /v1/models.
    models = [m.id for m in client.models.list()]
    assert models == [a.model], models

    # A streaming chat completion with usage.
    stream = client.chat.completions.create(
        model=a.model,
        messages=[{"role": "system", "content": "You are brief."},
                  {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, reasons = "", None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert usage is not None and usage.completion_tokens > 0, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    assert reasons in (["stop"], ["length"]), reasons
    out["chat_stream_text"] = text
    out["chat_stream_usage"] = usage.model_dump()

    # A non-streaming completion, greedy (compared with the in-process generation).
    c = client.completions.create(model=a.model, prompt=a.prompt, max_tokens=20, temperature=0)
    out["completion_text"] = c.choices[0].text
    out["completion_finish_reason"] = c.choices[0].finish_reason
    out["completion_usage"] = c.usage.model_dump()

    # Stop strings, and the seed: the same seed gives the same text at temperature > 0.
    s = client.completions.create(model=a.model, prompt="Count: 1, 2, 3, 4,", max_tokens=16,
                                  temperature=0, stop=[" 6", "\n\n"])
    assert s.choices[0].finish_reason == "stop", s
    assert " 6" not in s.choices[0].text, s.choices[0].text
    seeded = [
        client.chat.completions.create(
            model=a.model, messages=[{"role": "user", "content": "Tell a joke."}],
            max_tokens=24, temperature=0.9, seed=seed,
        ).choices[0].message.content
        for seed in (7, 7, 8, 9, 10)
    ]
    assert seeded[0] == seeded[1], seeded
    assert any(x != seeded[0] for x in seeded[2:]), seeded

    # Log-probabilities, in both APIs.
    lc = client.chat.completions.create(
        model=a.model, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
    )
    content = lc.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content), content
    assert all(t.token == t.top_logprobs[0].token for t in content), content
    assert all(t.logprob <= 0 for t in content), content
    lp = client.completions.create(model=a.model, prompt=a.prompt, max_tokens=5,
                                   temperature=0, logprobs=3)
    lpc = lp.choices[0].logprobs
    assert len(lpc.tokens) == len(lpc.token_logprobs) == len(lpc.top_logprobs) == 5, lpc
    out["logprobs_checked"] = len(content) + len(lpc.tokens)

    # 8 concurrent streams fill the server's 8 slots (no queue): a 9th request gets 429.
    # They are long enough (8 x 160 tokens, seconds on any host) that all of them still hold
    # their slots when the 9th arrives, right after each has sent its first chunk.
    started = threading.Barrier(9)
    results, errors = [None] * 8, []

    def run(i):
        try:
            st = client.chat.completions.create(
                model=a.model, messages=[{"role": "user", "content": f"Write a story ({i})."}],
                max_tokens=STREAM_TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_body={"instinfer": {"ignore_eos": True}},
            )
            first = True
            for chunk in st:
                if first:
                    started.wait(timeout=60)
                    first = False
                if chunk.usage is not None:
                    results[i] = chunk.usage.completion_tokens
        except Exception as e:  # reported below
            errors.append(f"stream {i}: {e!r}")
            started.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        started.wait(timeout=60)
    except threading.BrokenBarrierError:
        for t in threads:
            t.join(timeout=120)
        raise AssertionError(f"the 8 streams did not all start: {errors}")
    busy = expect_error(openai.RateLimitError, 429, lambda: client.completions.create(
        model=a.model, prompt="hi", max_tokens=2))
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == [STREAM_TOKENS] * 8, results
    out["rate_limited"] = busy["message"]

    # A client that goes away mid-stream: its sequence ends and its KV is freed.
    cancelled = 'instinfer_requests_total{interface="http",outcome="cancelled"}'
    before = metric(a.metrics, cancelled)
    st = client.chat.completions.create(
        model=a.model, messages=[{"role": "user", "content": "Write a long essay."}],
        max_tokens=2000, stream=True, extra_body={"instinfer": {"ignore_eos": True}},
    )
    for i, _ in enumerate(st):
        if i == 3:
            break
    st.close()
    wait_metric(a.metrics, cancelled, before + 1)
    wait_metric(a.metrics, "instinfer_kv_sequences", 0.0)

    # Every error case, with status and error object.
    msgs = [{"role": "user", "content": "hi"}]
    expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=a.model, messages=msgs, n=2), param="n")
    expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=a.model, messages=msgs, temperature=-1), param="temperature")
    expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=a.model, messages=msgs, logprobs=True, top_logprobs=21), param="top_logprobs")
    expect_error(openai.BadRequestError, 400, lambda: client.completions.create(
        model=a.model, prompt="hi", logprobs=6), param="logprobs")
    expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=a.model, messages=[{"role": "wizard", "content": "x"}]), param="messages[0].role")
    # The client cannot send broken JSON; httpx, its transport, can.
    r = httpx.post(a.base_url + "/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"authorization": f"Bearer {a.token}",
                            "content-type": "application/json"})
    bad_json = r.json()["error"]
    assert r.status_code == 400 and bad_json["type"] == "invalid_request_error", r.text
    assert "line 1 column" in bad_json["message"], bad_json
    expect_error(openai.NotFoundError, 404, lambda: client.chat.completions.create(
        model="gpt-4o", messages=msgs), param="model")
    expect_error(openai.APIStatusError, 413, lambda: client.completions.create(
        model=a.model, prompt="word " * 40000, max_tokens=1))
    full = expect_error(openai.InternalServerError, 507, lambda: client.completions.create(
        model=a.model, prompt="hi", max_tokens=4000))
    assert full["type"] == "insufficient_storage", full
    anonymous = openai.OpenAI(base_url=a.base_url, api_key="wrong", max_retries=0)
    expect_error(openai.AuthenticationError, 401, lambda: anonymous.models.list())
    expect_error(openai.AuthenticationError, 401, lambda: anonymous.chat.completions.create(
        model=a.model, messages=msgs))
    out["store_full"] = full["message"]

    print(json.dumps(out))


if __name__ == "__main__":
    main()
