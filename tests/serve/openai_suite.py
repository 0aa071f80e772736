"""Drives a running `sirius-offload serve` with the official `openai` client.

Run by tests/serve_openai.rs against servers it starts; by hand:
    python3 tests/serve/openai_suite.py --base-url http://127.0.0.1:8080/v1 --model M --suite plain
Each check raises AssertionError with what it saw; the exit status is 1 on the first failure.
"""

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
from openai import OpenAI

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, in a small village"


def raw(base, path, body=None, key=None, method=None):
    """(status, parsed JSON or text) of one HTTP request, without the client's checks."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def chat(c, model, **kw):
    return c.chat.completions.create(model=model, messages=kw.pop("messages", QUESTION), **kw)


def streamed_chat(c, model, **kw):
    text, finish, usage, roles = "", None, None, []
    for chunk in chat(c, model, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish, usage, roles


def streamed_completion(c, model, **kw):
    text, finish = "", None
    for chunk in c.completions.create(model=model, stream=True, **kw):
        for ch in chunk.choices:
            text += ch.text
            finish = ch.finish_reason or finish
    return text, finish


def expect_error(kind, fn, contains=None):
    try:
        fn()
    except kind as e:
        if contains:
            assert contains in str(e), f"{kind.__name__} without {contains!r}: {e}"
        return e
    raise AssertionError(f"expected {kind.__name__}")


def check_plain(c, args):
    m = args.model
    ids = [x.id for x in c.models.list().data]
    assert ids == [m], f"/v1/models lists {ids}"

    # Chat, whole and streamed: greedy, so the same text.
    r = chat(c, m, max_tokens=24, temperature=0)
    whole = r.choices[0].message.content
    assert "Paris" in whole, f"chat answer: {whole!r}"
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    u = r.usage
    assert u.prompt_tokens > 5 and u.completion_tokens > 0, u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    text, finish, usage, roles = streamed_chat(c, m, max_tokens=24, temperature=0)
    assert text == whole, f"streamed {text!r} != whole {whole!r}"
    assert roles == ["assistant"], roles
    assert finish == "stop" and usage is not None and usage.completion_tokens == u.completion_tokens

    # Completions, whole and streamed.
    w = c.completions.create(model=m, prompt=STORY, max_tokens=12, temperature=0)
    s, finish = streamed_completion(c, m, prompt=STORY, max_tokens=12, temperature=0)
    assert w.choices[0].text == s and s.strip(), f"{w.choices[0].text!r} vs {s!r}"
    assert finish == "length" and w.choices[0].finish_reason == "length"
    assert w.usage.completion_tokens == 12, w.usage

    # max_tokens.
    r = c.completions.create(model=m, prompt=STORY, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length", r

    # Stop strings: the text ends just before the first stop found, finish_reason stop.
    words = w.choices[0].text.split()
    stop = words[len(words) // 2]
    r = c.completions.create(model=m, prompt=STORY, max_tokens=12, temperature=0, stop=[stop])
    cut = w.choices[0].text[: w.choices[0].text.index(stop)]
    assert r.choices[0].text == cut, f"stop {stop!r}: {r.choices[0].text!r} vs {cut!r}"
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    s, finish = streamed_completion(c, m, prompt=STORY, max_tokens=12, temperature=0, stop=stop)
    assert s == cut and finish == "stop", f"streamed with stop: {s!r}"

    # Seeds: the same seed samples the same text; other seeds (almost surely) not all of it.
    def sample(seed):
        return c.completions.create(model=m, prompt=STORY, max_tokens=16, temperature=1.0,
                                    seed=seed).choices[0].text
    a, b = sample(1234), sample(1234)
    assert a == b, f"seed 1234 gave {a!r} then {b!r}"
    others = {sample(s) for s in (1, 2, 3)}
    assert others != {a}, "three other seeds all gave seed 1234's text"

    # A conversation's second turn reuses the first turn's prompt.
    turn = QUESTION + [{"role": "assistant", "content": whole},
                       {"role": "user", "content": "And of Italy?"}]
    chat(c, m, max_tokens=4, temperature=0)
    r = chat(c, m, messages=turn, max_tokens=16, temperature=0)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= u.prompt_tokens, f"second turn reused {cached} of {r.usage.prompt_tokens}"

    # Errors, as the client raises them.
    base = args.base_url
    status, body = raw(base, "/chat/completions", b'{"messages": [', key=args.api_key)
    assert status == 400 and "not valid JSON" in body["error"]["message"], (status, body)
    e = expect_error(openai.BadRequestError, lambda: chat(c, m, n=2))
    assert e.body["param"] == "n", e.body
    expect_error(openai.BadRequestError, lambda: chat(c, m, temperature=5))
    expect_error(openai.NotFoundError, lambda: chat(c, "no-such-model"), "does not exist")
    if args.api_key:
        bad = OpenAI(base_url=base, api_key="wrong-key", max_retries=0)
        expect_error(openai.AuthenticationError, lambda: bad.models.list(), "API key")
        status, _ = raw(base, "/models")
        assert status == 401, status
    status, body = raw(base.removesuffix("/v1"), "/health")
    assert status == 200 and body["status"] == "ok", (status, body)
    status, text = raw(base.removesuffix("/v1"), "/metrics")
    assert status == 200 and 'sirius_requests_total{endpoint="chat",outcome="ok"}' in text, text[:400]
    status, body = raw(base, "/chat/completions", key=args.api_key, method="GET")
    assert status == 405 and "not allowed" in body["error"]["message"], (status, body)
    status, body = raw(base, "/chat/completions", b'{"messages": "hi"}', key=args.api_key)
    # The field of the wrong type is named with what it must be.
    assert status == 400 and body["error"]["param"] == "messages", (status, body)
    assert "must be a list" in body["error"]["message"], (status, body)
    status, body = raw(base, "/no/such/route", key=args.api_key)
    assert status == 404 and "no route" in body["error"]["message"], (status, body)


def check_context(c, args):
    """A server started with a small --ctx-size: a longer prompt is a 413."""
    long = " ".join(["word"] * 400)
    e = expect_error(openai.APIStatusError, lambda: c.completions.create(
        model=args.model, prompt=long, max_tokens=4))
    assert e.status_code == 413, e.status_code
    assert e.body["code"] == "context_length_exceeded", e.body
    e = expect_error(openai.APIStatusError, lambda: streamed_completion(
        c, args.model, prompt=long, max_tokens=4))
    assert e.status_code == 413, e.status_code
    # A prompt that fits still works after it.
    r = c.completions.create(model=args.model, prompt=STORY, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4, r.usage


def check_greedy_server(c, args):
    """Sirius or offloaded: greedy answers, whole and streamed alike; sampling refused."""
    m = args.model
    r = chat(c, m, max_tokens=24)
    whole = r.choices[0].message.content
    assert "Paris" in whole, whole
    text, finish, usage, _ = streamed_chat(c, m, max_tokens=24)
    assert text == whole, f"{text!r} vs {whole!r}"
    w = c.completions.create(model=m, prompt=STORY, max_tokens=12)
    assert w.usage.completion_tokens == 12, w.usage
    e = expect_error(openai.BadRequestError, lambda: chat(c, m, temperature=0.7), "greedily")
    assert e.body["param"] == "temperature", e.body
    print(f"{args.suite}: {whole!r}")


def metric(base, name):
    status, text = raw(base.removesuffix("/v1"), "/metrics")
    assert status == 200, status
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def check_queue(c, args):
    """A server started with --max-queue 1: with one request running and one waiting, the
    next is refused at once (429); a client that gives up on a whole answer frees the engine."""
    m, base = args.model, args.base_url
    story = [{"role": "user", "content": "Tell a very long story about a dragon."}]
    running, stop, errors = threading.Event(), threading.Event(), []

    def long_stream():
        s = chat(c, m, messages=story, max_tokens=1000, temperature=0, stream=True)
        for i, _ in enumerate(s):
            if i == 1:
                running.set()
            if stop.is_set():
                s.close()
                return

    def waiting():
        try:
            chat(c, m, max_tokens=4, temperature=0)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=long_stream)]
    threads[0].start()
    assert running.wait(60), "the long request did not start"
    threads.append(threading.Thread(target=waiting))
    threads[1].start()
    deadline = time.time() + 30
    while metric(base, "sirius_queue_depth") != 1:
        assert time.time() < deadline, "the second request never queued"
        time.sleep(0.05)
    t0 = time.perf_counter()
    e = expect_error(openai.RateLimitError, lambda: chat(c, m, max_tokens=4, temperature=0))
    refused_in = time.perf_counter() - t0
    assert refused_in < 1.0, f"a full queue took {refused_in:.2f} s to answer"
    assert e.body["code"] == "queue_full", e.body
    assert e.response.headers.get("retry-after") == "1", dict(e.response.headers)
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors, errors

    # A non-streamed request whose client times out: its generation is cancelled.
    cancelled = 'sirius_requests_total{endpoint="chat",outcome="cancelled"}'
    before = metric(base, cancelled)
    impatient = OpenAI(base_url=base, api_key=args.api_key or "none", max_retries=0, timeout=1.0)
    expect_error(openai.APITimeoutError,
                 lambda: chat(impatient, m, messages=story, max_tokens=1000, temperature=0))
    t0 = time.perf_counter()
    chat(c, m, max_tokens=4, temperature=0)
    took = time.perf_counter() - t0
    assert metric(base, cancelled) == before + 1, "the timed-out request was not cancelled"
    assert took < 3.0, f"the next request waited {took:.1f} s"
    print(f"queue: 429 in {refused_in * 1000:.0f} ms; after a client timeout the next request took {took:.2f} s")


SUITES = {"plain": check_plain, "context": check_context, "sirius": check_greedy_server,
          "offloaded": check_greedy_server, "queue": check_queue}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--suite", choices=sorted(SUITES), required=True)
    args = p.parse_args()
    c = OpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0, timeout=120)
    try:
        SUITES[args.suite](c, args)
    except AssertionError as e:
        print(f"FAILED ({args.suite}): {e}", file=sys.stderr)
        raise
    print(f"ok ({args.suite})")


if __name__ == "__main__":
    main()
