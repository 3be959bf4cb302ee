"""Load drivers of `trisect bench serve`: send a trace at its arrival times, time every chunk.

Life: a driver is opened once per server (`HttpDriver` for any OpenAI-compatible endpoint — trisect,
vLLM, … — or `GrpcDriver` for trisect's gRPC API), sends a few warm-up requests, then `run_point`
sends one swept point's requests open-loop at their arrival offsets (optionally capped at
`concurrency` in flight), each as a streamed greedy chat completion with eos ignored, and returns one
`RequestResult` per request plus the point's wall time. The clock is `time.perf_counter`, read as
each chunk is parsed, on one event loop.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time

from tqdm import tqdm

from services.bench.serve_metrics import RequestResult
from services.bench.trace import TraceRequest


def chat_messages(req: TraceRequest) -> list[dict]:
    """The request as OpenAI chat messages: images (data URLs) first, then the text."""
    if not req.images:
        return [{"role": "user", "content": req.prompt}]
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()}}
             for i in req.images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": req.prompt}]}]


def _root(base_url: str) -> str:
    """`http://h:p`, `http://h:p/prefix` or `…/v1` → the URL that `/v1/...` paths hang off."""
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


class HttpDriver:
    """OpenAI chat completions over SSE (aiohttp: Ray Serve's own dependency, so always installed)."""

    def __init__(self, base_url: str, model: str = "", api_key: str | None = None, timeout_s: float = 600):
        self.root, self.model, self.timeout_s = _root(base_url), model, timeout_s
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = None

    async def open(self) -> None:
        import aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),      # no client-side cap on connections in flight
            timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout_s), headers=self.headers)
        if not self.model:                                # vLLM wants the served name; trisect takes any
            async with self.session.get(f"{self.root}/v1/models") as r:
                r.raise_for_status()
                self.model = (await r.json())["data"][0]["id"]

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(self, req: TraceRequest, max_tokens: int | None = None) -> RequestResult:
        body = {"model": self.model, "messages": chat_messages(req), "max_tokens": max_tokens or req.output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        res = RequestResult(sent=time.perf_counter())
        try:
            async with self.session.post(f"{self.root}/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                    return res
                async for line in r.content:
                    now = time.perf_counter()
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    msg = json.loads(data)
                    if "error" in msg:
                        res.error = f"stream error: {str(msg['error'])[:200]}"
                        break
                    if msg.get("choices") and msg["choices"][0].get("delta", {}).get("content"):
                        res.chunk_times.append(now)
                    if msg.get("usage"):
                        res.output_tokens = int(msg["usage"].get("completion_tokens") or 0)
                        res.prompt_tokens = int(msg["usage"].get("prompt_tokens") or 0)
        except Exception as e:   # a dropped connection or timeout is one failed request, not a failed run
            res.error = f"{type(e).__name__}: {e}"[:200]
        res.end = time.perf_counter()
        return res


class GrpcDriver:
    """trisect's gRPC Generate stream, through the project's own async client."""

    def __init__(self, target: str, model: str = "", api_key: str | None = None, timeout_s: float = 600):
        self.target, self.model, self.api_key, self.timeout_s = target, model, api_key, timeout_s
        self.client = None

    async def open(self) -> None:
        from services.client import AsyncTrisectClient
        self.client = AsyncTrisectClient(self.target, api_key=self.api_key, timeout=self.timeout_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def send(self, req: TraceRequest, max_tokens: int | None = None) -> RequestResult:
        content = [{"type": "image", "image": i} for i in req.images] + [{"type": "text", "text": req.prompt}]
        res = RequestResult(sent=time.perf_counter())
        try:
            async for d in self.client.stream(messages=[{"role": "user", "content": content}], model=self.model,
                                              max_tokens=max_tokens or req.output_len, temperature=0.0,
                                              ignore_eos=True):
                now = time.perf_counter()
                if d.token_ids:
                    res.chunk_times.append(now)
                if d.usage is not None:
                    res.output_tokens, res.prompt_tokens = d.usage.completion_tokens, d.usage.prompt_tokens
        except Exception as e:
            res.error = f"{type(e).__name__}: {e}"[:200]
        res.end = time.perf_counter()
        return res


async def warm_up(driver, trace: list[TraceRequest], n: int) -> None:
    """A few short requests, one at a time, so first-call costs (compilation, caches) stay out."""
    for req in trace[:n]:
        r = await driver.send(req, max_tokens=min(req.output_len, 8))
        if r.error:
            raise RuntimeError(f"warm-up request failed: {r.error}")


async def run_point(driver, trace: list[TraceRequest], offsets: list[float], concurrency: int | None,
                    desc: str) -> tuple[list[RequestResult], float]:
    cap = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(trace), desc=desc, unit="req", leave=False)

    async def one(req: TraceRequest, at: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        if cap is None:
            r = await driver.send(req)
        else:
            async with cap:
                r = await driver.send(req)
        bar.update(1)
        return r

    start = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(r, a) for r, a in zip(trace, offsets)))
    finally:
        bar.close()
    return list(results), time.perf_counter() - start
