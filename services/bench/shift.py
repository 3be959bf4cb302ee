"""`trisect bench shift`: live role switching against a static split, when the mix shifts half-way.

    trisect bench shift                                   # 4 LLM replicas (2 P + 2 D), on then off
    trisect bench shift --duration 60 --rate 1 --json shift.json --plot shift.png

Life of a run: one seeded open-loop trace (Poisson arrivals at `--rate`) whose first half is
prefill-heavy (long prompts with images, short answers: `--prefill-heavy`) and second half
decode-heavy (short prompts, long answers: `--decode-heavy`). For each of `--runs` (switching on,
then off) the bench starts a private redis-server and `trisect serve --mode pd --prefills P
--decoders D --role-switching on|off`, on that Redis, with the role controller's policy from the
flags (SLOs, cooldown). The same requests go out at the same offsets; a watcher thread polls the
Redis registry every 0.5 s and records every role an instance takes (the switches made). Then the
server is stopped and the next run starts.

Figures, per run: SLO attainment (TTFT <= --slo-ttft and TPOT <= --slo-tpot; a failed request
misses) per `--window` seconds of send time; the time from the shift until attainment is back at
>= 90% and stays there; goodput = requests meeting the SLOs per second of the run; the switches.
The side-by-side line gives goodput on/off. Writes `--json` and a `--plot` PNG of attainment over
time for every run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import threading
import time

from services.bench import loadgen, trace
from services.bench.servers import TrisectServer

RECOVERED = 0.9


def _component(spec: str, weight: float = 1.0) -> trace.Component:
    prompt, out, images = (int(x) for x in spec.split(","))
    return trace.Component(weight, prompt, out, images=(images, images))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="trisect bench shift", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--prefills", type=int, default=2, help="first split: prefill replicas")
    ap.add_argument("--decoders", type=int, default=2, help="first split: decode replicas")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals per run (shift at half)")
    ap.add_argument("--rate", type=float, default=1.5, help="requests per second (Poisson)")
    ap.add_argument("--prefill-heavy", default="384,8,2", help="PROMPT_TOKENS,OUTPUT_TOKENS,IMAGES of phase 1")
    ap.add_argument("--decode-heavy", default="16,256,0", help="PROMPT_TOKENS,OUTPUT_TOKENS,IMAGES of phase 2")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.2, help="seconds")
    ap.add_argument("--cooldown", type=float, default=10.0, help="controller cooldown between switches (s)")
    ap.add_argument("--window", type=float, default=5.0, help="seconds per attainment window")
    ap.add_argument("--runs", default="on,off", help="role switching settings to run, in order")
    ap.add_argument("--kv-cache-memory", type=int, default=128, help="MiB of KV cache per engine")
    ap.add_argument("--object-store-memory", type=int, default=256, help="MiB of the local Ray head's plasma store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--plot", help="write a PNG of attainment over time here")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0 or args.window <= 0:
        ap.error("--duration, --rate and --window must be > 0")
    return args


def build_workload(args, tokenizer) -> tuple[list[trace.TraceRequest], list[float], float]:
    """Requests, their send offsets, and the shift's offset: phase 1 before it, phase 2 after."""
    offsets = [t for t in trace.arrival_offsets(int(args.rate * args.duration * 2) + 8, args.rate, seed=args.seed)
               if t < args.duration]
    shift = args.duration / 2
    n1 = sum(1 for t in offsets if t < shift)
    first = trace.build_trace((_component(args.prefill_heavy),), n1, args.seed, tokenizer)
    second = trace.build_trace((_component(args.decode_heavy),), len(offsets) - n1, args.seed + 1, tokenizer)
    reqs = [trace.TraceRequest(i, r.prompt, r.output_len, r.images) for i, r in enumerate(first + second)]
    return reqs, offsets, shift


class RoleWatcher:
    """Polls the registry; `switches` lists (t, instance, from, to) for every role change seen."""

    def __init__(self, redis_url: str, interval_s: float = 0.5):
        from cluster.redis_store import RedisStore
        from cluster.registry import Registry
        self.registry, self.interval_s = Registry(RedisStore(redis_url)), interval_s
        self.roles: dict[str, str] = {}
        self.switches: list[tuple[float, str, str, str]] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, t0: float) -> "RoleWatcher":
        self.t0 = t0
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for rec in self.registry.live():
                if rec.info.pool != "llm_pool":
                    continue
                role, old = rec.info.role.value, self.roles.get(rec.id)
                if old is not None and old != role:
                    self.switches.append((round(time.perf_counter() - self.t0, 2), rec.id, old, role))
                self.roles[rec.id] = role

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def windows(results, offsets, args) -> list[dict]:
    """SLO attainment of the requests sent in each window (by send time)."""
    n = math.ceil(args.duration / args.window)
    out = []
    for w in range(n):
        lo, hi = w * args.window, (w + 1) * args.window
        inside = [r for r, t in zip(results, offsets) if lo <= t < hi]
        met = sum(r.meets(args.slo_ttft, args.slo_tpot) for r in inside)
        out.append({"start_s": lo, "requests": len(inside), "met": met,
                    "attainment": met / len(inside) if inside else None})
    return out


def recovery_s(wins: list[dict], shift: float) -> float | None:
    """Seconds from the shift to the start of the first window after it from which every
    window with requests stays at >= 90% attainment (None: never recovered)."""
    after = [w for w in wins if w["start_s"] >= shift and w["attainment"] is not None]
    for i, w in enumerate(after):
        if all(x["attainment"] >= RECOVERED for x in after[i:]):
            return w["start_s"] - shift
    return None


def run_one(setting: str, reqs, offsets, shift, args) -> dict:
    from cluster.redis_server import RedisServer
    policy = {"role_policy": {"slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot, "cooldown_s": args.cooldown},
              "mode": "pd", "kv_cache_memory_mib": args.kv_cache_memory}
    with RedisServer() as redis, tempfile.NamedTemporaryFile("w", suffix=".yaml") as cfg:
        json.dump(policy, cfg)                  # JSON is YAML
        cfg.flush()
        extra = ("--config", cfg.name, "--prefills", str(args.prefills), "--decoders", str(args.decoders),
                 "--role-switching", setting, "--redis-url", redis.url,
                 "--object-store-memory", str(args.object_store_memory))
        with TrisectServer("pd", args.model, extra_args=extra) as server:
            watcher = RoleWatcher(redis.url)

            async def drive():
                driver = loadgen.HttpDriver(server.base_url)
                await driver.open()
                try:
                    await loadgen.warm_up(driver, reqs, 2)
                    watcher.start(time.perf_counter())
                    return await loadgen.run_point(driver, reqs, offsets, None, f"switching {setting}")
                finally:
                    await driver.close()
            results, wall = asyncio.run(drive())
            watcher.stop()
    wins = windows(results, offsets, args)
    met = sum(r.meets(args.slo_ttft, args.slo_tpot) for r in results)
    return {"switching": setting, "requests": len(results), "failed": sum(not r.ok for r in results),
            "met": met, "wall_s": wall, "goodput_rps": met / wall, "attainment": met / len(results),
            "recovery_s": recovery_s(wins, shift), "windows": wins,
            "switches": [{"t_s": t, "instance": i, "from": a, "to": b} for t, i, a, b in watcher.switches],
            "errors": sorted({r.error for r in results if r.error})[:5]}


def report(runs: list[dict], shift: float) -> None:
    for run in runs:
        cells = " ".join("  - " if w["attainment"] is None else f"{w['attainment'] * 100:4.0f}" for w in run["windows"])
        rec = "never" if run["recovery_s"] is None else f"{run['recovery_s']:.0f} s"
        print(f"switching {run['switching']:>3}: attainment % per window: {cells}")
        print(f"    {run['requests']} requests, {run['failed']} failed, SLO met {run['met']} "
              f"({run['attainment'] * 100:.0f}%), goodput {run['goodput_rps']:.3f} req/s, back to >= 90% "
              f"{rec} after the shift (at {shift:.0f} s), switches {len(run['switches'])}: "
              + ", ".join(f"{s['from']}->{s['to']}@{s['t_s']:.0f}s" for s in run["switches"]))
    by = {r["switching"]: r for r in runs}
    if "on" in by and "off" in by and by["off"]["goodput_rps"] > 0:
        print(f"goodput switching on / off: {by['on']['goodput_rps'] / by['off']['goodput_rps']:.2f}x")


def plot(runs: list[dict], shift: float, path: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    for run in runs:
        pts = [(w["start_s"] + args.window / 2, w["attainment"]) for w in run["windows"] if w["attainment"] is not None]
        ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", label=f"switching {run['switching']}")
        for s in run["switches"]:
            ax.axvline(s["t_s"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.axvline(shift, color="k", lw=1, label="mix shifts")
    ax.axhline(RECOVERED * 100, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("send time (s)")
    ax.set_ylabel(f"SLO attainment per {args.window:g} s (%)")
    ax.set_ylim(-5, 105)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    from decoders.model import load_model
    tok = load_model(args.model, frontend_only=True).tokenizer
    reqs, offsets, shift = build_workload(args, tok)
    print(f"{len(reqs)} requests over {args.duration:g} s at {args.rate:g}/s; phase 1 {args.prefill_heavy} "
          f"(prompt,output,images), phase 2 {args.decode_heavy} from {shift:g} s; SLO TTFT {args.slo_ttft:g} s, "
          f"TPOT {args.slo_tpot:g} s", flush=True)
    runs = [run_one(s.strip(), reqs, offsets, shift, args) for s in args.runs.split(",") if s.strip()]
    report(runs, shift)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "shift_s": shift, "runs": runs}, f, indent=1)
    if args.plot:
        plot(runs, shift, args.plot, args)
    return 0
