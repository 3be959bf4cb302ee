"""`trisect bench serve`: online serving under a seeded trace, several servers side by side.

    trisect bench serve --base-url http://127.0.0.1:8000 --rates 2,4,8,inf
    trisect bench serve --compare local,aggregated,pd,epd --rates 4,8,inf
    trisect bench serve --compare local,aggregated --base-url http://127.0.0.1:8100 --label vllm \
        --baseline vllm --rounds 2 --json serve.json --plots serve-plots

Life of a run: the trace is built once (a named mix or a JSONL file, seeded; prompt lengths in the
checkpoint tokenizer's tokens). Servers are the `--base-url` endpoints (any OpenAI-compatible server),
the `--grpc` targets (trisect's gRPC API) and the `--compare` modes, which this command starts with
`trisect serve` one at a time and stops again. For each round (`--rounds`, so servers alternate
A/B/A/B on a noisy machine) and each server: warm-up requests, then every swept point — a rate
(`--rates`, Poisson or gamma arrivals) or an in-flight cap (`--concurrency`, all sent at once) —
sends the same requests at the same arrival times and summarizes them (services/bench/serve_metrics).
It prints a table per server and one side-by-side table with ratios to `--baseline`, and writes
`--json` and the PNGs of `--plots DIR`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import dataclass

from services.bench import loadgen, report, serve_metrics, trace
from services.bench.servers import MODES, TrisectServer


@dataclass(slots=True, frozen=True)
class Contender:
    label: str
    kind: str          # "http" | "grpc" | a trisect serve mode to start
    target: str = ""   # URL or host:port for external servers

    def __post_init__(self):
        if self.kind not in ("http", "grpc") + MODES:
            raise ValueError(f"unknown contender kind {self.kind!r}")


def _floats(s: str) -> list[float]:
    out = [math.inf if x.strip().lower() in ("inf", "max") else float(x) for x in s.split(",") if x.strip()]
    if not out or any(not x > 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive numbers or inf, got {s!r}")
    return out


def _ints(s: str) -> list[int]:
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="trisect bench serve", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    w = ap.add_argument_group("workload")
    w.add_argument("--mix", default="random-text", choices=sorted(trace.MIXES), help="named request mix")
    w.add_argument("--trace-file", help="JSONL requests instead of --mix (see services/bench/trace.py)")
    w.add_argument("--num-requests", "-n", type=int, default=64, help="requests per swept point")
    w.add_argument("--input-len", type=int, help="override every mix component's prompt tokens")
    w.add_argument("--output-len", type=int, help="override every mix component's output tokens")
    w.add_argument("--range-ratio", type=float, help="override: lengths uniform in len·[1-r, 1+r]")
    w.add_argument("--images", help="override images per request: N or LO,HI")
    w.add_argument("--image-size", default="64x64", help="WxH of the random images")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    w.add_argument("--model", default="tiny-llava", help="tokenizer for prompt lengths; model --compare serves")
    s = ap.add_argument_group("sweep")
    s.add_argument("--rates", type=_floats, default=[2.0, 4.0, 8.0, math.inf], help="req/s list, inf = all at once")
    s.add_argument("--concurrency", type=_ints, help="sweep in-flight caps instead (requests all sent at once)")
    s.add_argument("--max-concurrency", type=int, help="in-flight cap during a rate sweep")
    s.add_argument("--warmup", type=int, default=2, help="warm-up requests per server")
    s.add_argument("--rounds", type=int, default=1, help="repeat the cycle over servers (A/B/A/B)")
    t = ap.add_argument_group("servers")
    t.add_argument("--base-url", action="append", default=[], help="OpenAI-compatible server; repeatable")
    t.add_argument("--label", action="append", default=[], help="name of each --base-url, in order")
    t.add_argument("--grpc", action="append", default=[], help="trisect gRPC host:port; repeatable")
    t.add_argument("--compare", nargs="?", const=",".join(MODES), help=f"start these trisect modes ({','.join(MODES)})")
    t.add_argument("--compare-grpc", action="store_true", help="drive --compare servers over gRPC, not HTTP")
    t.add_argument("--serve-arg", action="append", default=[], help="extra `trisect serve` argument; repeatable")
    t.add_argument("--baseline", help="label the ratios are taken against (default: the first server)")
    t.add_argument("--api-key")
    t.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    r = ap.add_argument_group("report")
    r.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    r.add_argument("--slo-tpot-ms", type=float, default=100.0)
    r.add_argument("--json", dest="json_path")
    r.add_argument("--plots", help="directory for latency_cdf.png and vs_rate.png")
    args = ap.parse_args(argv)
    if len(args.label) > len(args.base_url):
        ap.error("more --label than --base-url")
    if args.rounds < 1 or args.num_requests < 1 or args.warmup < 0:
        ap.error("--rounds and --num-requests must be >= 1, --warmup >= 0")
    return args


def contenders(args) -> list[Contender]:
    out = [Contender(args.label[i] if i < len(args.label) else f"http{i + 1}", "http", url)
           for i, url in enumerate(args.base_url)]
    out += [Contender(f"grpc{i + 1}" if len(args.grpc) > 1 else "grpc", "grpc", t) for i, t in enumerate(args.grpc)]
    for mode in (args.compare or "").split(","):
        if mode.strip():
            if mode.strip() not in MODES:
                raise SystemExit(f"--compare: unknown mode {mode!r}; known: {', '.join(MODES)}")
            out.append(Contender(mode.strip(), mode.strip()))
    if not out:
        raise SystemExit("nothing to measure: give --base-url, --grpc or --compare")
    if len({c.label for c in out}) != len(out):
        raise SystemExit("server labels must be distinct (use --label)")
    return out


def build_requests(args) -> list[trace.TraceRequest]:
    from decoders.model import load_model
    tok = load_model(args.model, frontend_only=True).tokenizer
    size = tuple(int(v) for v in args.image_size.lower().split("x"))
    if args.trace_file:
        return trace.load_jsonl(args.trace_file, args.seed, tok, size)[:args.num_requests]
    mix = trace.MIXES[args.mix]
    over = {k: v for k, v in (("prompt_len", args.input_len), ("output_len", args.output_len),
                              ("range_ratio", args.range_ratio)) if v is not None}
    if args.images:
        lo, _, hi = args.images.partition(",")
        over["images"] = (int(lo), int(hi or lo))
    if over:
        mix = tuple(trace.Component(**{**{f: getattr(c, f) for f in c.__slots__}, **over}) for c in mix)
    return trace.build_trace(mix, args.num_requests, args.seed, tok, size)


def sweep_points(args) -> list[tuple[float, int | None]]:
    if args.concurrency:
        return [(math.inf, c) for c in args.concurrency]
    return [(r, args.max_concurrency) for r in args.rates]


async def measure(driver, run: report.Run, requests, args) -> None:
    await driver.open()
    try:
        await loadgen.warm_up(driver, requests, args.warmup)
        for rate, conc in sweep_points(args):
            offsets = trace.arrival_offsets(len(requests), rate, args.burstiness, args.seed)
            desc = f"{run.name} @ {'inf' if math.isinf(rate) else f'{rate:g}'}/s" + (f" c{conc}" if conc else "")
            results, duration = await loadgen.run_point(driver, requests, offsets, conc, desc)
            run.points.append(serve_metrics.summarize(results, duration, rate, conc, args.slo_ttft_ms,
                                                      args.slo_tpot_ms))
            run.results.append(results)
    finally:
        await driver.close()
    run.goodput, run.goodput_how = serve_metrics.goodput([(p.x, p.slo_attainment) for p in run.points])


def run_one(c: Contender, rnd: int, requests, args) -> report.Run:
    def drive(kind: str, target: str) -> report.Run:
        cls = loadgen.HttpDriver if kind == "http" else loadgen.GrpcDriver
        run = report.Run(c.label, target, rnd)
        asyncio.run(measure(cls(target, api_key=args.api_key, timeout_s=args.timeout), run, requests, args))
        return run

    if c.kind in ("http", "grpc"):
        return drive(c.kind, c.target)
    print(f"starting trisect serve --mode {c.kind} ...", file=sys.stderr, flush=True)
    with TrisectServer(c.kind, args.model, tuple(args.serve_arg)) as server:
        return drive("grpc", server.grpc_target) if args.compare_grpc else drive("http", server.base_url)


def main(argv=None) -> int:
    args = parse_args(argv)
    servers = contenders(args)
    requests = build_requests(args)
    n_img = sum(len(r.images) for r in requests)
    print(f"trace: {len(requests)} requests ({args.trace_file or args.mix}, seed {args.seed}, {n_img} images), "
          f"points: {'; '.join(report.point_name(r, c) for r, c in sweep_points(args))}",
          flush=True)
    runs = []
    for rnd in range(args.rounds):
        for c in servers:
            runs.append(run_one(c, rnd, requests, args))
            print(report.detail(runs[-1], args.slo_ttft_ms, args.slo_tpot_ms), flush=True)
    baseline = args.baseline or servers[0].label
    if len(runs) > 1:
        print()
        print(report.compare(runs, baseline))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "slo_ttft_ms": args.slo_ttft_ms,
                       "slo_tpot_ms": args.slo_tpot_ms, "baseline": baseline,
                       "runs": [r.to_dict() for r in runs]}, f, indent=1)
    if args.plots:
        try:
            from services.bench.plots import draw
        except ImportError:
            print("--plots needs matplotlib (pip install -e '.[dev]')", file=sys.stderr)
        else:
            print("plots: " + ", ".join(draw(runs, args.plots, args.slo_ttft_ms, args.slo_tpot_ms)))
    return 0 if all(p.completed for r in runs for p in r.points) else 1
