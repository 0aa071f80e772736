#!/usr/bin/env python3
"""Loopback load test and latency benchmark of a running `sirius-offload serve`.

  --check: every distinct prompt is first answered alone (greedy), then `--clients`
  concurrent clients send `--requests` each (half streamed): 0 lost, failed or garbled
  responses are allowed, and every answer must equal its prompt's answer alone. Then a
  client that disconnects mid-stream must free the engine (the next request starts at once).

  --clients 1,8,32 (without --check): p50/p99 time to first token and total generated
  tokens/s at each concurrency, all requests streamed, as a markdown table.

Needs the `openai` package (tools/requirements-test.txt).
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request

from openai import AsyncOpenAI

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write one sentence about the sea.",
    "What do bees make?",
    "Give a synonym for happy.",
    "How many legs does a spider have?",
    "What is the opposite of cold?",
]


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one(client, model, question, max_tokens, stream):
    """(text, completion tokens, seconds to first text or None, seconds in all)."""
    messages = [{"role": "user", "content": question}]
    t0 = time.perf_counter()
    if not stream:
        r = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens, None, time.perf_counter() - t0
    text, tokens, first = "", 0, None
    s = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for chunk in s:
        for ch in chunk.choices:
            if ch.delta.content:
                first = first if first is not None else time.perf_counter() - t0
                text += ch.delta.content
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, tokens, first, time.perf_counter() - t0


async def load(client, model, clients, requests, max_tokens, all_streamed):
    """Every client sends `requests` one after another; all clients at once."""
    results = []

    async def client_loop(c):
        for j in range(requests):
            q = (c + j) % len(QUESTIONS)
            stream = all_streamed or (c + j) % 2 == 0
            try:
                out = await one(client, model, QUESTIONS[q], max_tokens, stream)
                results.append((q, stream, out, None))
            except Exception as e:  # counted as failed, reported below
                results.append((q, stream, None, repr(e)))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    return results, time.perf_counter() - t0


def metric(base, name):
    with urllib.request.urlopen(base.removesuffix("/v1") + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def disconnect_check(client, args):
    """A client leaving mid-stream frees the engine: the next request starts at once."""
    # How fast the engine writes tokens alone, to know how long the long request would take.
    _, tokens, _, seconds = await one(client, args.model, QUESTIONS[3], 32, False)
    per_token = seconds / max(tokens, 1)
    cancelled = 'sirius_requests_total{endpoint="chat",outcome="cancelled"}'
    before = metric(args.base_url, cancelled)
    long_tokens = 1000
    s = await client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "Tell a very long story."}],
        max_tokens=long_tokens, temperature=0, stream=True)
    seen = 0
    async for chunk in s:
        seen += 1
        if seen == 3:
            break
    await s.close()
    t0 = time.perf_counter()
    await one(client, args.model, QUESTIONS[0], 8, False)
    waited = time.perf_counter() - t0
    after = metric(args.base_url, cancelled)
    full = long_tokens * per_token
    ok = after == before + 1 and waited < full / 4
    return ok, {"next_request_s": round(waited, 3), "long_request_alone_s": round(full, 1),
                "cancelled_counted": after - before}


async def check(args):
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none",
                         max_retries=0, timeout=300)
    alone = {}
    for q, question in enumerate(QUESTIONS):
        alone[q] = (await one(client, args.model, question, args.max_tokens, False))[0]
    results, wall = await load(client, args.model, args.clients, args.requests,
                               args.max_tokens, False)
    failed = [r for r in results if r[3] is not None]
    garbled = [(q, s, out[0], alone[q]) for q, s, out, e in results if e is None and out[0] != alone[q]]
    lost = args.clients * args.requests - len(results)
    tokens = sum(out[1] for _, _, out, e in results if e is None)
    ok_disconnect, disconnect = await disconnect_check(client, args)
    summary = {"requests": len(results), "lost": lost, "failed": len(failed),
               "garbled": len(garbled), "seconds": round(wall, 2),
               "tokens_per_s": round(tokens / wall, 1), "disconnect": disconnect}
    print(json.dumps(summary))
    for f in failed[:3]:
        print("failed:", f, file=sys.stderr)
    for g in garbled[:3]:
        print("garbled (question, streamed, got, alone):", g, file=sys.stderr)
    if lost or failed or garbled or not ok_disconnect:
        sys.exit("load check FAILED: " + json.dumps(summary))


async def report(args):
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none",
                         max_retries=0, timeout=600)
    await one(client, args.model, QUESTIONS[0], 4, False)  # warm-up
    print("| clients | requests | TTFT p50 (s) | TTFT p99 (s) | tokens/s | failed |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in args.clients_list:
        results, wall = await load(client, args.model, n, args.requests, args.max_tokens, True)
        ok = [out for _, _, out, e in results if e is None]
        ttft = [out[2] for out in ok if out[2] is not None]
        tokens = sum(out[1] for out in ok)
        row = {"clients": n, "requests": len(results), "ttft_p50_s": percentile(ttft, 50),
               "ttft_p99_s": percentile(ttft, 99), "tokens_per_s": tokens / wall,
               "generated_tokens": tokens, "failed": len(results) - len(ok)}
        rows.append(row)
        for _, _, _, e in [r for r in results if r[3] is not None][:2]:
            print(f"failed at {n} clients: {e}", file=sys.stderr)
        print(f"| {n} | {row['requests']} | {row['ttft_p50_s']:.3f} | {row['ttft_p99_s']:.3f} "
              f"| {row['tokens_per_s']:.1f} | {row['failed']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", default="32", help="concurrent clients (a comma list without --check)")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--check", action="store_true")
    p.add_argument("--json", help="also write the table's rows as JSON to this file")
    args = p.parse_args()
    args.clients_list = [int(c) for c in args.clients.split(",")]
    if args.check:
        if len(args.clients_list) != 1:
            sys.exit("--check takes one --clients count")
        args.clients = args.clients_list[0]
        asyncio.run(check(args))
    else:
        asyncio.run(report(args))


if __name__ == "__main__":
    main()
