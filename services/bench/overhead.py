"""`trisect bench overhead`: what disaggregation adds to time-to-first-token.

The same 1-image request (prompt tokenized once, outside every timer) is timed, interleaved so
machine noise hits both alike:
  in-process  vision encoder + engine on this process: encode → add_request → step to token 1
  E→P→D       the orchestrator over Ray Serve handles: EncodeServer → PrefillServer → token 1
  HTTP        (for reference) a streamed /v1/chat/completions, first SSE chunk, client side
Overhead = E→P→D TTFT − in-process TTFT, p50 and p99 over `--requests` (target ≤ 10 ms p50).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time

from tqdm import tqdm

from services.bench import percentile


def make_image(seed: int = 0):
    import numpy as np
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def inprocess_ttft(engine, vision, ids, pixels, sampling, rid) -> float:
    start = time.perf_counter()
    embeds = vision.encode([p for _, p in pixels])
    engine.add_request(rid, ids, sampling, images=embeds)
    while not engine.step():
        pass
    ttft = time.perf_counter() - start
    engine.abort(rid)
    return ttft


async def epd_ttft(orch, ids, pixels, sampling, rid) -> float:
    start = time.perf_counter()
    stream = orch.run(rid, ids, sampling, pixels)
    await stream.__anext__()
    ttft = time.perf_counter() - start
    await stream.aclose()
    return ttft


def http_ttft(base: str, image_png: bytes, text: str) -> float:
    import base64

    import requests
    url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    body = {"model": "", "stream": True, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]}
    start = time.perf_counter()
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                return time.perf_counter() - start
    raise RuntimeError("no SSE data")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="trisect bench overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--http-port", type=int, default=8765)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)

    import io

    import ray
    import torch
    from ray import serve

    from cluster.config import ClusterConfig
    from decoders.config import EngineConfig
    from decoders.engine import Engine
    from decoders.model import load_model, prepare_prompt
    from decoders.sampling import SamplingParams
    from encoders.vision import VisionEncoder
    from services.app import build_app
    from services.orchestrator import Orchestrator, StageClient, Stages

    loaded = load_model(args.model)
    engine, vision = Engine(loaded, EngineConfig(kv_cache_memory=32 * 2**20)), VisionEncoder(loaded)
    text, image = "describe this picture", make_image()
    png = io.BytesIO()
    image.save(png, format="PNG")
    prepared = prepare_prompt(loaded, text, [image])
    pixels = [(hashlib.sha256(png.getvalue()).hexdigest(), prepared.pixel_inputs[0])]
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)

    cfg = ClusterConfig(model=args.model, mode="epd", grpc_port=None, kv_cache_memory_mib=32,
                        stages={"encode": {"replicas": 1}})
    ray.init(resources={p: 8 for p in ("encode_pool", "prefill_pool", "decode_pool")}, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"), logging_level="ERROR", log_to_driver=False,
             **cfg.ray_head_options())             # the store `trisect serve` starts, prefaulted the same way
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
        serve.run(build_app(cfg), name="bench", route_prefix="/")
        handle = lambda name: StageClient(serve.get_deployment_handle(name, app_name="bench"), is_handle=True)
        orch = Orchestrator("epd", Stages(encode=handle("EncodeServer"), prefill=handle("PrefillServer"),
                                          decode=handle("DecodeServer")), max_encoders_per_request=1)
        base = f"http://127.0.0.1:{args.http_port}"
        loop = asyncio.new_event_loop()
        for i in range(3):                                   # warm-up every path
            inprocess_ttft(engine, vision, prepared.token_ids, pixels, sampling, f"w{i}")
            loop.run_until_complete(epd_ttft(orch, prepared.token_ids, pixels, sampling, f"w{i}"))
            http_ttft(base, png.getvalue(), text)
        local, epd, http = [], [], []
        torch.manual_seed(0)
        for i in tqdm(range(args.requests), desc="requests"):
            local.append(inprocess_ttft(engine, vision, prepared.token_ids, pixels, sampling, f"l{i}") * 1e3)
            epd.append(loop.run_until_complete(epd_ttft(orch, prepared.token_ids, pixels, sampling, f"e{i}")) * 1e3)
            http.append(http_ttft(base, png.getvalue(), text) * 1e3)
        loop.run_until_complete(asyncio.sleep(0.2))     # let the last early-exit releases finish
        loop.close()
    finally:
        serve.shutdown()
        ray.shutdown()

    over = [e - l for e, l in zip(epd, local)]
    r = {"requests": args.requests, "inprocess_ttft_ms_p50": statistics.median(local),
         "inprocess_ttft_ms_p99": percentile(local, 0.99), "epd_ttft_ms_p50": statistics.median(epd),
         "epd_ttft_ms_p99": percentile(epd, 0.99), "http_ttft_ms_p50": statistics.median(http), "http_ttft_ms_p99": percentile(http, 0.99),
         "overhead_ms_p50": statistics.median(epd) - statistics.median(local),
         "overhead_ms_p99": percentile(epd, 0.99) - percentile(local, 0.99), "paired_overhead_ms_p50": statistics.median(over)}
    print(f"TTFT over {args.requests} 1-image requests ({args.model}), ms      p50      p99")
    for name, key in (("in-process engine", "inprocess"), ("E->P->D via Serve", "epd"), ("HTTP end to end", "http")):
        print(f"  {name:<22} {r[f'{key}_ttft_ms_p50']:>8.2f} {r[f'{key}_ttft_ms_p99']:>8.2f}")
    print(f"  overhead (E->P->D - in-process)  p50 {r['overhead_ms_p50']:.2f} ms  p99 {r['overhead_ms_p99']:.2f} ms  "
          f"(paired p50 {r['paired_overhead_ms_p50']:.2f} ms; target <= 10 ms p50)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(r, f, indent=2)
    return 0
