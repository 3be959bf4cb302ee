"""`trisect bench soak --minutes N`: steady load on a loopback server, watching for leaks.

    trisect bench soak --minutes 30                       # --mode local: one in-process engine
    trisect bench soak --minutes 10 --mode aggregated     # Ray + Serve + a private redis-server

Life of a run: start `trisect serve --mode MODE` on free loopback ports (services/bench/servers.py;
nothing is reachable from off the machine), or `--attach` to a running loopback one, and sample it (services/bench/probe.py): `start`. Warm up
with the same load for `--warmup-s` (first-call costs, allocator arenas, connection pools), let the
server go idle and sample again: `baseline`. Run closed-loop load — `--concurrency` clients, each
sending the seeded trace's requests one after another — for the rest of `--minutes`, sampling every
`--sample-every` s under a progress bar; then stop sending, wait until the server is idle and sample:
`after`. It prints RSS per process, open descriptors, KV blocks used and Redis keys over time and at
start / baseline / after, and judges from baseline to after: no KV block held, no new descriptor and
RSS growth under `--max-rss-growth` (%) over the processes alive at both, no process more, no new
TTL-less Redis key, no failed request. Exit
status 1 when any of these fails; `--json` keeps every sample.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from urllib.parse import urlsplit

from tqdm import tqdm

from services.bench import loadgen, trace
from services.bench.probe import Probe, Sample
from services.bench.servers import MODES, TrisectServer, free_port

MIB = 2**20


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="trisect bench soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="load time, warm-up included")
    ap.add_argument("--mode", default="local", choices=MODES, help="the `trisect serve` mode to start")
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--concurrency", type=int, default=4, help="clients sending back to back")
    ap.add_argument("--input-len", type=int, default=48, help="prompt tokens of each request")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--images", type=int, default=1, help="every other request carries this many images")
    ap.add_argument("--distinct", type=int, default=64, help="distinct requests in the cycled trace")
    ap.add_argument("--warmup-s", type=float, help="warm-up seconds (default: 20%% of --minutes, at most 120)")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--max-rss-growth", type=float, default=5.0, help="%% of total RSS allowed, baseline to after")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `trisect serve` argument; repeatable")
    ap.add_argument("--attach", metavar="URL", help="soak this running loopback server instead of starting one")
    ap.add_argument("--pid", type=int, help="with --attach: the server's process id (its tree is sampled)")
    ap.add_argument("--redis-url", help="with --attach: the Redis it keeps its keys in")
    ap.add_argument("--redis-match", default="*", help="count only Redis keys matching this pattern")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.sample_every <= 0:
        ap.error("--minutes, --concurrency and --sample-every must be positive")
    if args.warmup_s is None:
        args.warmup_s = min(120.0, 0.2 * args.minutes * 60)
    if not 0 <= args.warmup_s < args.minutes * 60:
        ap.error("--warmup-s must be shorter than --minutes")
    if args.attach and (args.pid is None or urlsplit(args.attach).hostname not in ("127.0.0.1", "localhost", "::1")):
        ap.error("--attach needs a loopback URL and --pid")
    return args


def build_requests(args) -> list[trace.TraceRequest]:
    from decoders.model import load_model
    tok = load_model(args.model, frontend_only=True).tokenizer
    mix = (trace.Component(1, args.input_len, args.output_len, range_ratio=0.5),
           trace.Component(1, args.input_len, args.output_len, images=(args.images, args.images), range_ratio=0.5))
    return trace.build_trace(mix, args.distinct, args.seed, tok)


async def load(driver, requests, concurrency: int, seconds: float, tally: dict, on_tick=None) -> None:
    """Closed loop: `concurrency` clients cycle through `requests` until `seconds` have passed."""
    end = time.monotonic() + seconds

    async def client(k: int):
        i = k
        while time.monotonic() < end:
            r = await driver.send(requests[i % len(requests)])
            tally["ok" if not r.error else "failed"] += 1
            if r.error and len(tally["errors"]) < 5:
                tally["errors"].append(r.error)
            i += concurrency

    async def ticker():
        while time.monotonic() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
            if on_tick:
                on_tick()
    await asyncio.gather(ticker(), *(client(k) for k in range(concurrency)))


async def wait_idle(probe: Probe, timeout_s: float = 60.0) -> Sample:
    """The first sample with nothing in flight or queued and no KV block held (or the last one)."""
    end = time.monotonic() + timeout_s
    while True:
        s = await asyncio.to_thread(probe.sample)
        b = s.backend
        if not any(b.get(k, 0) for k in ("in_flight", "waiting", "running", "kv_blocks_used")) \
                or time.monotonic() > end:
            return s
        await asyncio.sleep(0.5)


async def loaded(base_url: str, requests, concurrency: int, seconds: float, tally: dict, on_tick=None) -> None:
    """`load` through a fresh client whose connections are all closed when it returns, so the
    samples taken between loads count no descriptor of a client's keep-alive connection."""
    driver = loadgen.HttpDriver(base_url, timeout_s=300)
    await driver.open()
    try:
        await load(driver, requests, concurrency, seconds, tally, on_tick)
    finally:
        await driver.close()
    await asyncio.sleep(1.0)                # the server closes its side of those connections


async def soak(args, base_url: str, pid: int, redis_url: str | None, requests) -> dict:
    probe = Probe(pid, base_url, redis_url, args.redis_match)
    tally = {"ok": 0, "failed": 0, "errors": []}
    samples: list[Sample] = []
    try:
        start = await asyncio.to_thread(probe.sample)
        if args.warmup_s:
            await loaded(base_url, requests, args.concurrency, args.warmup_s, tally)
        baseline = await wait_idle(probe)
        warm = {"ok": tally["ok"], "failed": tally["failed"]}
        main_s = args.minutes * 60 - args.warmup_s
        bar = tqdm(total=round(main_s), desc=f"soak {args.mode}", unit="s", file=sys.stderr)
        last = [time.monotonic()]

        def tick():
            bar.update(1)
            if time.monotonic() - last[0] >= args.sample_every:
                last[0] = time.monotonic()
                samples.append(probe.sample())
                s = samples[-1]
                bar.set_postfix(rss=f"{s.rss / MIB:.0f}M", fds=s.fds, kv=int(s.backend.get("kv_blocks_used", 0)),
                                ok=tally["ok"] - warm["ok"], failed=tally["failed"])
        await loaded(base_url, requests, args.concurrency, main_s, tally, tick)
        bar.close()
        after = await wait_idle(probe)
    finally:
        probe.close()
    return {"start": start, "baseline": baseline, "after": after, "samples": samples,
            "warmup_requests": warm["ok"] + warm["failed"], "ok": tally["ok"] - warm["ok"],
            "failed": tally["failed"],                        # warm-up's included: none may fail
            "errors": tally["errors"]}


def _redis_url(log_path: str) -> str | None:
    with open(log_path) as f:
        m = re.search(r"started a private redis-server at (\S+)", f.read())
    return m.group(1) if m else None


def verdict(run: dict, max_growth_pct: float) -> dict[str, tuple[bool, str]]:
    """Baseline -> after. RSS and descriptors are compared over the processes alive at both (Ray
    starts and retires workers); a process more than at baseline is its own failed check."""
    b, a = run["baseline"], run["after"]
    both = {p.pid for p in b.procs} & {p.pid for p in a.procs}
    rss_b, rss_a = (sum(p.rss for p in s.procs if p.pid in both) for s in (b, a))
    fds_b, fds_a = (sum(p.fds for p in s.procs if p.pid in both) for s in (b, a))
    growth = 100.0 * (rss_a - rss_b) / rss_b
    checks = {
        "kv_blocks": (a.backend.get("kv_blocks_used", 0) == 0 and a.backend.get("in_flight", 0) == 0,
                      f"{a.backend.get('kv_blocks_used', 0):.0f} KV blocks used, "
                      f"{a.backend.get('in_flight', 0):.0f} in flight after"),
        "fds": (fds_a <= fds_b, f"open descriptors {fds_b} -> {fds_a}"),
        "rss": (growth < max_growth_pct, f"total RSS {rss_b / MIB:.1f} -> {rss_a / MIB:.1f} MiB ({growth:+.2f}%, "
                                         f"limit {max_growth_pct:g}%)"),
        "processes": (len(a.procs) <= len(b.procs), f"processes {len(b.procs)} -> {len(a.procs)}"),
        "requests": (run["failed"] == 0 and run["ok"] > 0, f"{run['ok']} ok, {run['failed']} failed"),
    }
    if b.redis_keys is not None:
        new = sorted(a.redis_persistent - b.redis_persistent)
        checks["redis_keys"] = (not new, f"keys {b.redis_keys} -> {a.redis_keys}, TTL-less "
                                         f"{len(b.redis_persistent)} -> {len(a.redis_persistent)}"
                                         + (f", new TTL-less: {new[:5]}" if new else ""))
    return checks


def report(run: dict, checks: dict) -> str:
    def row(name: str, s: Sample) -> str:
        redis = "-" if s.redis_keys is None else str(s.redis_keys)
        return (f"{name:>9} {s.t:7.0f} {s.rss / MIB:9.1f} {s.fds:5d} {s.backend.get('kv_blocks_used', 0):5.0f} "
                f"{s.backend.get('in_flight', 0):5.0f} {redis:>6}")
    lines = [f"{'sample':>9} {'t(s)':>7} {'RSS(MiB)':>9} {'fds':>5} {'KV':>5} {'infl':>5} {'redis':>6}",
             row("start", run["start"]), row("baseline", run["baseline"])]
    lines += [row("", s) for s in run["samples"]]
    lines.append(row("after", run["after"]))
    lines.append("\nper process (baseline -> after):")
    before = {p.pid: p for p in run["baseline"].procs}
    for p in run["after"].procs:
        q = before.get(p.pid)
        was = f"{q.rss / MIB:8.1f} MiB {q.fds:4d} fds" if q else "     (new)"
        lines.append(f"  {p.pid:>7} {p.label:<40} {was} -> {p.rss / MIB:8.1f} MiB {p.fds:4d} fds")
    lines.append(f"\nrequests: {run['warmup_requests']} warm-up, then {run['ok']} ok, {run['failed']} failed"
                 + (f"; first errors: {run['errors']}" if run["errors"] else ""))
    lines += [f"{'PASS' if ok else 'FAIL'} {name}: {what}" for name, (ok, what) in checks.items()]
    return "\n".join(lines)


def run(args) -> tuple[dict, dict]:
    requests = build_requests(args)
    if args.mode != "local":        # the Ray head's metrics export port: not 8080, which another may hold
        os.environ.setdefault("TRISECT_METRICS_EXPORT_PORT", str(free_port()))
    if args.attach:
        result = asyncio.run(soak(args, args.attach, args.pid, args.redis_url, requests))
        return result, verdict(result, args.max_rss_growth)
    print(f"starting trisect serve --mode {args.mode} on loopback ...", file=sys.stderr, flush=True)
    with TrisectServer(args.mode, args.model, tuple(args.serve_arg)) as server:
        result = asyncio.run(soak(args, server.base_url, server.proc.pid, _redis_url(server.log_path), requests))
    return result, verdict(result, args.max_rss_growth)


def main(argv=None) -> int:
    args = parse_args(argv)
    result, checks = run(args)
    print(report(result, checks), flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"args": vars(args), "checks": {k: {"ok": ok, "what": w} for k, (ok, w) in checks.items()},
                       **{k: (v.as_dict() if isinstance(v, Sample) else [s.as_dict() for s in v]
                              if k == "samples" else v) for k, v in result.items()}}, f, indent=1)
    return 0 if all(ok for ok, _ in checks.values()) else 1
