"""`trisect bench memory`: peak RSS of an encode-only replica against an aggregated one.

Each contender runs in a fresh Python process (so nothing one loads is counted against the other)
that imports what it needs, loads, serves one 1-image request, and reports its own peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) as one JSON line:
  baseline     python + torch + transformers imported, nothing else: the bare floor
  imports      baseline + decoders.model (which pulls in the model classes): every replica's floor
  encode       EncoderWorker: vision tower + projector only (load_model vision_only), 1 image encoded
  aggregated   full model + decoders.engine.Engine with the default EngineConfig (its KV pool,
               `kv_cache_memory` = 256 MiB, is allocated up front), 1-image request run to completion
  aggregated_small_kv  the same with a 64-block pool, so the reader sees what the KV pool costs
The parent builds the checkpoint first (a build must not count), then prints MiB, the ratio
encode / aggregated (target ≤ 0.2), the same ratio above the imports floor, and `--json FILE`.
At tiny-preset scale the ~330 MiB floor (torch alone ~220 MiB) dominates both processes, so the
whole-process ratio is far above the target while the part each replica adds is not; with a real
checkpoint the floor is noise next to the LLM weights and its KV pool. `--model small-llava` is
such a checkpoint at ~1/10 of LLaVA-1.5-7B (a bench-only preset: 773 M params, ~3 GB, built once).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MIB = 2**20
KINDS = ("baseline", "imports", "encode", "aggregated", "aggregated_small_kv")
_SMALL_KV_BLOCKS = 64  # 1024 tokens at block size 16: plenty for one short request


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _proc_status(field: str) -> int | None:
    try:  # VmHWM: this process image's own high-water mark (exec starts it afresh), a cross-check
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _png(seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def _params(model) -> tuple[int, int]:
    ps = list(model.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() * p.element_size() for p in ps)


def _child(kind: str, model: str) -> dict:
    """Runs inside the fresh process: load, serve one 1-image request, measure."""
    import torch  # noqa: F401  (the baseline is exactly these imports)
    import transformers  # noqa: F401
    out: dict = {"kind": kind}
    if kind != "baseline":
        from decoders.model import load_model
    start = time.perf_counter()
    if kind == "encode":
        from encoders.worker import EncoderWorker
        worker = EncoderWorker(model, cache_bytes=16 * MIB)
        emb = worker.encode_images([_png()])
        out["params"], out["param_bytes"] = _params(worker.loaded.model)
        out["image_tokens"] = emb[0].num_tokens
    elif kind.startswith("aggregated"):
        import io

        from PIL import Image

        from decoders.config import EngineConfig
        from decoders.engine import Engine
        from decoders.model import prepare_prompt
        from decoders.sampling import SamplingParams
        from encoders.vision import VisionEncoder
        loaded = load_model(model)
        config = EngineConfig(num_kv_blocks=_SMALL_KV_BLOCKS) if kind.endswith("small_kv") else EngineConfig()
        engine = Engine(loaded, config)
        image = Image.open(io.BytesIO(_png())).convert("RGB")
        prompt = prepare_prompt(loaded, "describe the image", [image])
        embeds = VisionEncoder(loaded).encode(prompt.pixel_inputs)
        engine.add_request("r0", prompt.token_ids, SamplingParams(max_tokens=8, ignore_eos=True), embeds)
        while engine.has_unfinished():
            engine.step()
        out["params"], out["param_bytes"] = _params(loaded.model)
        out["kv_pool_bytes"] = engine.runner.pool.data.numel() * engine.runner.pool.data.element_size()
    elif kind not in ("baseline", "imports"):
        raise ValueError(f"unknown kind {kind!r}")
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_bytes"] = _peak_rss()
    out["vm_hwm_bytes"], out["current_rss_bytes"] = _proc_status("VmHWM"), _proc_status("VmRSS")
    return out


def measure(kind: str, model: str, cache_dir: str | None) -> dict:
    # Linux keeps ru_maxrss across fork + exec: a child would report this parent's peak if it were
    # higher, so the parent stays light (no torch) and even the preset build runs in a child
    env = dict(os.environ)
    if cache_dir:
        env["TRISECT_CACHE"] = cache_dir  # the children must find the checkpoint the build child made
    # the build's own progress (HF's "Writing model shards" bar: small-llava takes ~25 s) goes to the
    # terminal; a measurement's stderr is kept for the error message
    proc = subprocess.run([sys.executable, "-m", "services.bench.memory", "--child", kind, "--model", model],
                          env=env, stdout=subprocess.PIPE, stderr=None if kind == "build" else subprocess.PIPE,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({proc.returncode}):\n{(proc.stderr or '')[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="trisect bench memory", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llava",
                    help="preset name (tiny-llava, tiny-qwen2-vl, small-llava) or local checkpoint dir")
    ap.add_argument("--cache-dir", default=None, help="where presets are built (default $TRISECT_CACHE)")
    ap.add_argument("--json", dest="json_path", default=None, help="write results here")
    ap.add_argument("--child", choices=KINDS + ("build",), help=argparse.SUPPRESS)  # internal: one measurement
    args = ap.parse_args(argv)
    if args.child == "build":  # resolve a preset name to its (built once) checkpoint dir
        from decoders.model import BENCH_PRESETS, PRESETS, ensure_preset
        path = ensure_preset(args.model) if args.model in PRESETS + BENCH_PRESETS else args.model
        print(json.dumps({"path": str(path)}), flush=True)
        return 0
    if args.child:
        print(json.dumps(_child(args.child, args.model)), flush=True)
        return 0

    print(f"resolving {args.model} (a preset is built once, then cached) ...", file=sys.stderr, flush=True)
    model = measure("build", args.model, args.cache_dir)["path"]
    runs = {}
    for i, kind in enumerate(KINDS, 1):  # one fresh process each: several seconds apiece at small-llava scale
        print(f"[{i}/{len(KINDS)}] {kind} ...", file=sys.stderr, flush=True)
        runs[kind] = measure(kind, model, args.cache_dir)
    bare, base, enc, agg, small = (runs[k]["peak_rss_bytes"] for k in KINDS)
    result = {"model": args.model, "runs": runs, "baseline_peak_mib": bare / MIB, "imports_peak_mib": base / MIB,
              "encode_peak_mib": enc / MIB, "aggregated_peak_mib": agg / MIB,
              "aggregated_small_kv_peak_mib": small / MIB, "ratio": enc / agg,
              "ratio_above_imports": (enc - base) / max(agg - base, 1), "target": 0.2}
    kv = runs["aggregated"]["kv_pool_bytes"] / MIB
    print(f"trisect bench memory — {args.model}: peak RSS of a fresh process serving one 1-image request")
    rows = [("baseline: python + torch + transformers imported", runs["baseline"]),
            ("imports floor: + decoders.model (HF modeling, dynamo)", runs["imports"]),
            ("encode-only worker (vision tower + projector)", runs["encode"]),
            (f"aggregated engine, default KV pool ({kv:.0f} MiB)", runs["aggregated"]),
            (f"aggregated engine, {_SMALL_KV_BLOCKS}-block KV pool "
             f"({runs['aggregated_small_kv']['kv_pool_bytes'] / MIB:.1f} MiB)", runs["aggregated_small_kv"])]
    for name, r in rows:
        extra = f"  params {r['params'] / 1e6:6.2f} M ({r['param_bytes'] / MIB:6.1f} MiB)" if "params" in r else ""
        print(f"  {name:<58} {r['peak_rss_bytes'] / MIB:8.1f} MiB{extra}")
    print(f"  ratio encode / aggregated:                  {result['ratio']:.3f}  (target <= {result['target']})")
    print(f"  ratio above the imports floor:              {result['ratio_above_imports']:.3f}")
    print(f"  aggregated above the floor: {(agg - base) / MIB:.1f} MiB, of which KV pool {kv:.1f} MiB "
          f"and weights {runs['aggregated']['param_bytes'] / MIB:.1f} MiB; encode-only above it: "
          f"{(enc - base) / MIB:.1f} MiB")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
