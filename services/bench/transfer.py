"""`trisect bench transfer`: KV payload moved between two processes on this machine, per backend,
against plain memcpy of the same bytes measured in the same run.

Payload: a KVPayload whose KV is fp16 [32 layers, 2, T tokens, 8 kv heads, 128] (a Llama-3-8B-like
layout, 128 KiB per token), T chosen so the KV is exactly each `--sizes-mib`. Each transfer is timed
from just before `sender.start()` to the moment the receiving process holds the KV as a torch
tensor (`receiver.wait()` returned); both ends read the same system-wide CLOCK_MONOTONIC.

- objectstore: private local Ray (2 CPUs) with the plasma store `trisect serve` starts
  (ClusterConfig's object_store_memory_mib, `--object-store-mib`), prefaulted in sender and receiver
  as prefill/decode replicas do (`--no-prefault`: not); sender in this driver, receiver in a Ray
  actor on the same node. On one node the receiver's `ray.get` maps plasma memory (zero-copy), so
  the split is also reported: put (sender's `ray.put`, the one real copy), get (receiver's
  wait+get), and the receiver's materialisation (`copy_` into its own preallocated memory — what
  importing into a paged cache costs on top; one torch thread, as Ray gives a 1-CPU actor), with
  GB/s including it. The rest of the total is the Ray actor call that carries the ticket.
- shm: the sender copies into a reused shared-memory segment; the receiver (a spawned subprocess)
  maps it and holds a view — one copy, into pages that stay faulted in across transfers.
- collective: gloo over loopback between this driver (rank 0) and a spawned subprocess (rank 1);
  every transfer bootstraps its own 2-rank group, as the backend does in serving.
- memcpy (baseline): torch `dst.copy_(src)` of the same KV into a preallocated, pre-touched tensor
  in one process (torch may split the copy over its intra-op threads).

GB/s are 1e9 bytes/s from the median over `--repeats` (and from the best one: shared machines are
noisy); rounds are interleaved, one transfer of each kind per round. Every received KV is checked
by CRC32 against the source; a mismatch raises, so a fast wrong transfer can't win.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import tempfile
import time
import zlib

import torch
from tqdm import tqdm

from cluster.config import ClusterConfig
from decoders.kv_payload import KVPayload
from decoders.kv_transfer import TransferState, backend
from decoders.sampling import SamplingParams

LAYERS, HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.float16
TOKEN_BYTES = LAYERS * 2 * HEADS * HEAD_DIM * 2
MIB = 1024 * 1024
TARGET = 0.5                                   # the goal: object store >= 50% of memcpy


class ChecksumError(RuntimeError):
    pass


def crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().numpy())


def make_payload(tokens: int, seed: int = 0) -> KVPayload:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(LAYERS, 2, tokens, HEADS, HEAD_DIM, generator=g).to(DTYPE)
    return KVPayload(request_id=f"bench-{tokens}", token_ids=list(range(tokens + 1)), num_prompt_tokens=tokens,
                     kv=kv, block_size=16, sampling=SamplingParams())


class _RayReceiver:
    """The decode side of the objectstore backend, living in a Ray actor (another process)."""

    def __init__(self, prefault: bool):
        self.cache: dict[tuple, torch.Tensor] = {}
        if prefault:                       # as a decode replica does at start-up
            from decoders.kv_transfer.objectstore import prefault_plasma
            prefault_plasma()

    def receive(self, ticket) -> tuple[float, float, float, int]:
        t_enter = time.monotonic()
        kv = backend("objectstore")[1](ticket).wait(poll_interval_s=0.0002).kv
        t_done = time.monotonic()
        # materialise the zero-copy view into private memory that is already allocated and touched,
        # as importing into a preallocated paged cache would; page faults would swamp the copy
        own = self.cache.get(kv.shape)
        if own is None:                    # first sight of this size: allocate and touch, untimed
            own = self.cache[kv.shape] = kv.clone()
        t_copy = time.monotonic()
        own.copy_(kv)
        copy_s = time.monotonic() - t_copy
        return t_enter, t_done, copy_s, crc(kv)


def _peer_child(inbox, outbox) -> None:
    """The receiving process of the collective (rank 1) and shm backends: receive each ticket's KV,
    report when it was held."""
    while (item := inbox.get()) is not None:
        name, ticket = item
        try:
            kv = backend(name)[1](ticket).wait(poll_interval_s=0.0002).kv
            outbox.put((time.monotonic(), crc(kv), None))
        except Exception as e:             # report, don't die: the driver would wait for nothing
            outbox.put((None, None, f"{type(e).__name__}: {e}"))


class Peers:
    """The receiving processes, started once (their start-up isn't part of any transfer) and always
    torn down on exit, error or not."""

    def __init__(self, backends: list[str], cluster: ClusterConfig):
        self.backends, self.cluster = backends, cluster
        self.actor, self.proc, self._tmp, self._own_ray = None, None, None, False

    def __enter__(self):
        if "objectstore" in self.backends:
            import ray
            if not ray.is_initialized():
                # address="local": a private cluster even when RAY_ADDRESS points at a real one
                self._tmp = tempfile.TemporaryDirectory(prefix="trisect-ray-", ignore_cleanup_errors=True)
                ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=self._tmp.name,
                         logging_level="ERROR", log_to_driver=False, **self.cluster.ray_head_options())
                self._own_ray = True
            from decoders.kv_transfer.objectstore import prefault_plasma
            if prefault := self.cluster.prefault_object_store:
                prefault_plasma()              # this driver is the prefill side
            self.actor = ray.remote(num_cpus=1)(_RayReceiver).remote(prefault)
        if {"collective", "shm"} & set(self.backends):
            ctx = mp.get_context("spawn")      # fork would copy this process's Ray/gloo threads
            self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
            self.proc = ctx.Process(target=_peer_child, args=(self.inbox, self.outbox), daemon=True)
            self.proc.start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.inbox.put(None)
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        if self._own_ray:
            import ray
            ray.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()

    def objectstore(self, payload: KVPayload) -> tuple[dict, int]:
        import ray
        t0 = time.monotonic()
        sender = backend("objectstore")[0](payload)
        ticket = sender.start()
        t_put = time.monotonic()
        t_enter, t_done, copy_s, got = ray.get(self.actor.receive.remote(ticket), timeout=120)
        _ack(sender)
        times = {"total": t_done - t0, "put": t_put - t0, "get": t_done - t_enter, "copy": copy_s}
        return times, got

    def collective(self, payload: KVPayload) -> tuple[dict, int]:
        # the send thread must finish before its store goes away
        return self._via_child("collective", payload, lambda sender: sender.worker.done.wait(30))

    def shm(self, payload: KVPayload) -> tuple[dict, int]:
        return self._via_child("shm", payload)

    def _via_child(self, name: str, payload: KVPayload, before_ack=None) -> tuple[dict, int]:
        """Sender here, receiver in the spawned child: time from start() to the child holding the KV."""
        t0 = time.monotonic()
        sender = backend(name)[0](payload)
        ticket = sender.start()
        t_put = time.monotonic()
        self.inbox.put((name, ticket))
        t_done, got, err = self._reply(timeout_s=120)
        if err:
            raise RuntimeError(f"{name} receiver failed: {err}")
        if before_ack is not None:
            before_ack(sender)
        _ack(sender)
        return {"total": t_done - t0, "put": t_put - t0}, got

    def _reply(self, timeout_s: float):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:          # short waits, so a dead child is noticed at once
            try:
                return self.outbox.get(timeout=0.5)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"receiver process died (exit {self.proc.exitcode})")
        raise TimeoutError(f"receiver process sent nothing in {timeout_s:.0f} s")


def _ack(sender) -> None:
    sender.ack(True)
    if sender.poll() is not TransferState.SUCCESS:
        raise RuntimeError(f"sender ended {sender.state.value}: {sender.error}")


class Memcpy:
    """The baseline: the same KV copied within one process into a preallocated tensor."""

    def __init__(self, payload: KVPayload):
        self.src = payload.kv
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)               # touch every page once: time the copy, not page faults

    def __call__(self) -> tuple[dict, int]:
        self.dst.zero_()                       # so the checksum proves this very copy happened
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        return {"total": time.perf_counter() - t0}, crc(self.dst)


def summarise(backend_name: str, size_mib: int, nbytes: int, runs: list[dict], memcpy_gbps: float | None) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    r = {"backend": backend_name, "size_mib": size_mib, "bytes": nbytes, "repeats": len(runs),
         "median_s": med["total"], "gbps": nbytes / med["total"] / 1e9, "verified": True,
         "gbps_best": nbytes / min(x["total"] for x in runs) / 1e9,  # what a quiet machine would give
         "times_s": [x["total"] for x in runs]}
    if memcpy_gbps:
        r["ratio_to_memcpy"] = r["gbps"] / memcpy_gbps
    for k in ("put", "get", "copy"):
        if k in med:
            r[f"{k}_median_s"] = med[k]
    if "copy" in med:
        r["gbps_materialised"] = nbytes / (med["total"] + med["copy"]) / 1e9
    return r


def _ms(r: dict, key: str) -> str:
    return f"{r[key] * 1e3:.1f}" if key in r else "-"


def print_table(results: list[dict]) -> None:
    print(f"{'MiB':>5} {'backend':<12} {'GB/s':>7} {'best':>6} {'x memcpy':>9} {'median ms':>10} {'put ms':>8} "
          f"{'get ms':>7} {'copy ms':>8} {'GB/s +copy':>11}  verified")
    for r in results:
        ratio = f"{r['ratio_to_memcpy']:.2f}" if "ratio_to_memcpy" in r else "1.00"
        mat = f"{r['gbps_materialised']:.2f}" if "gbps_materialised" in r else "-"
        print(f"{r['size_mib']:>5} {r['backend']:<12} {r['gbps']:>7.2f} {r['gbps_best']:>6.2f} {ratio:>9} {r['median_s'] * 1e3:>10.1f} "
              f"{_ms(r, 'put_median_s'):>8} {_ms(r, 'get_median_s'):>7} {_ms(r, 'copy_median_s'):>8} {mat:>11}  "
              f"{r['verified']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="trisect bench transfer", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="16,64,256", help="comma-separated KV sizes in MiB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default="objectstore,shm,collective",
                    help="comma-separated, of objectstore,shm,collective")
    ap.add_argument("--object-store-mib", type=int, default=ClusterConfig().object_store_memory_mib,
                    help="plasma store size of the private Ray (ClusterConfig.object_store_memory_mib)")
    ap.add_argument("--no-prefault", dest="prefault", action="store_false",
                    help="don't prefault the store in sender and receiver (ClusterConfig.prefault_object_store)")
    ap.add_argument("--json", dest="json_path", default=None, help="write results here")
    args = ap.parse_args(argv)
    cluster = ClusterConfig(object_store_memory_mib=args.object_store_mib, prefault_object_store=args.prefault)
    sizes = [int(x) for x in args.sizes_mib.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    if bad := set(backends) - {"objectstore", "shm", "collective"}:
        ap.error(f"unknown backend(s) {sorted(bad)}")
    if any(s * MIB % TOKEN_BYTES for s in sizes):
        ap.error(f"each size must be a multiple of {TOKEN_BYTES // 1024} KiB (one token of KV)")
    print(f"KV fp16 [{LAYERS}, 2, T, {HEADS}, {HEAD_DIM}] ({TOKEN_BYTES // 1024} KiB/token), median of "
          f"{args.repeats}, GB/s = 1e9 B/s; memcpy = torch dst.copy_(src), preallocated dst, one process, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    if "objectstore" in backends:
        print(f"object store: {args.object_store_mib} MiB, prefault_object_store={args.prefault}", flush=True)
    results = []
    with Peers(backends, cluster) as peers:
        warm = make_payload(1)
        for b in backends:                     # first-call costs (imports, actor/rank start-up) stay out
            getattr(peers, b)(warm)
        bar = tqdm(total=len(sizes) * args.repeats * (1 + len(backends)), desc="transfer", unit="xfer",
                   leave=False, delay=2)
        for size in sizes:
            payload = make_payload(size * MIB // TOKEN_BYTES, seed=size)
            expected = crc(payload.kv)
            # round-robin, one transfer of each kind per round: load from other processes on this
            # machine then hits memcpy and every backend alike, and the ratios stay meaningful
            contenders = {"memcpy": Memcpy(payload), **{b: getattr(peers, b) for b in backends}}
            runs: dict[str, list[dict]] = {name: [] for name in contenders}
            for _ in range(args.repeats):
                for name, move in contenders.items():
                    t, got = move() if name == "memcpy" else move(payload)
                    _verify(name, size, got, expected)
                    runs[name].append(t)
                    bar.update()
            base = summarise("memcpy", size, payload.nbytes, runs.pop("memcpy"), None)
            results.append(base)
            results += [summarise(b, size, payload.nbytes, r, base["gbps"]) for b, r in runs.items()]
            del contenders
        bar.close()
    print_table(results)
    goal = [r for r in results if r["backend"] == "objectstore"]
    for r in goal:
        print(f"objectstore {r['size_mib']} MiB: {r['ratio_to_memcpy']:.1%} of memcpy "
              f"(target >= {TARGET:.0%}: {'met' if r['ratio_to_memcpy'] >= TARGET else 'NOT met'})")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"kv_layout": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float16"},
                       "memcpy_method": "torch dst.copy_(src), preallocated dst, single process",
                       "torch_threads": torch.get_num_threads(), "target_ratio": TARGET,
                       "object_store_memory_mib": args.object_store_mib, "prefault_object_store": args.prefault,
                       "target_met": all(r["ratio_to_memcpy"] >= TARGET for r in goal) if goal else None,
                       "results": results}, f, indent=2)
    return 0


def _verify(name: str, size: int, got: int, expected: int) -> None:
    if got != expected:
        raise ChecksumError(f"{name} {size} MiB: received KV crc32 {got:#010x} != sent {expected:#010x}")
