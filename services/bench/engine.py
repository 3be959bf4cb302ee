"""`trisect bench engine`: trisect's engine against HF generate(), side by side in one run.

Workload: N requests x P random prompt tokens x G new tokens (greedy, eos ignored) for each batch
size asked, repeated `--repeats` times with the contenders interleaved; medians are reported. Three contenders on the same checkpoint and prompts: the trisect engine (continuous
batching on paged KV), HF `generate()` called per request one after another, and HF `generate()`
on the whole batch at once. Prints output tok/s and the ratios; `--json FILE` writes them, and the
trisect tokens are checked against the sequential HF tokens so a fast wrong engine can't win.

The HF contenders run on their own copy of the checkpoint (`load_baseline`): building an Engine
swaps the Linear layers of the model it is given for SkinnyLinear in place, so `generate()` on that
same object would time — and check — trisect's code (HF batched decode at 16–48 rows took
SkinnyLinear's path), not HF's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from decoders.config import EngineConfig
from decoders.engine import Engine
from decoders.host_memory import retain_freed_memory
from decoders.model import load_model
from decoders.sampling import SamplingParams
from decoders.skinny_linear import SkinnyLinear


def make_prompts(vocab_size: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # stay clear of the low ids where tiny tokenizers keep their special tokens
    return torch.randint(16, vocab_size, (n, length), generator=gen).tolist()


def run_trisect(loaded, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    engine = Engine(loaded, EngineConfig(max_num_seqs=max(len(prompts), 1), max_num_batched_tokens=4096))
    # a serving engine is long-lived: touch its KV pool once (first-use page faults) before timing
    engine.runner.pool.data.fill_(0)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return time.perf_counter() - start, [out[str(i)] for i in range(len(prompts))]


def load_baseline(loaded) -> torch.nn.Module:
    """The same checkpoint loaded again for HF's `generate()`, never touched by an engine."""
    model = load_model(str(loaded.path), dtype=next(loaded.model.parameters()).dtype).model
    assert not any(isinstance(m, SkinnyLinear) for m in model.modules())
    return model


@torch.inference_mode()
def run_hf(model, prompts, new_tokens: int, batched: bool) -> tuple[float, list[list[int]]]:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    groups = [prompts] if batched else [[p] for p in prompts]
    tokens = []
    start = time.perf_counter()
    for group in tqdm(groups, desc="  hf " + ("batched" if batched else "sequential"), leave=False):
        ids = torch.tensor(group)
        seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        tokens.extend(seqs[:, ids.shape[1]:].tolist())
    return time.perf_counter() - start, tokens


def bench(loaded, baseline, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    prompts = make_prompts(loaded.model.config.get_text_config().vocab_size, batch, prompt_len)
    run_trisect(loaded, prompts[:1], 2)                    # warm-up: first-call allocations
    total = batch * new_tokens
    times: dict[str, list[float]] = {"trisect": [], "seq": [], "batched": []}
    identical = True
    for _ in range(repeats):                               # interleaved: noise hits all three alike
        t, ours = run_trisect(loaded, prompts, new_tokens)
        times["trisect"].append(t)
        t, ref = run_hf(baseline, prompts, new_tokens, batched=False)
        times["seq"].append(t)
        identical &= ours == ref
        times["batched"].append(run_hf(baseline, prompts, new_tokens, batched=True)[0])
    t_ours, t_seq, t_bat = (statistics.median(times[k]) for k in ("trisect", "seq", "batched"))
    r = {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
         "trisect_tok_s": total / t_ours, "hf_sequential_tok_s": total / t_seq, "hf_batched_tok_s": total / t_bat,
         "tokens_identical_to_hf": identical, "seconds": times}
    r["vs_sequential"] = r["trisect_tok_s"] / r["hf_sequential_tok_s"]
    r["vs_batched"] = r["trisect_tok_s"] / r["hf_batched_tok_s"]
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="trisect bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated request counts")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", dest="json_path", default=None, help="write results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # the engine does this anyway; up front, every contender runs under it
    loaded = load_model(args.model)
    baseline = load_baseline(loaded)
    print(f"model {args.model}  threads {torch.get_num_threads()}  prompt {args.prompt_tokens}  new {args.new_tokens}")
    print(f"{'batch':>5} {'trisect tok/s':>14} {'hf seq tok/s':>13} {'hf batch tok/s':>15} {'x seq':>7} {'x batch':>8} exact")
    results = []
    for b in (int(x) for x in args.batches.split(",")):
        r = bench(loaded, baseline, b, args.prompt_tokens, args.new_tokens, args.repeats)
        results.append(r)
        print(f"{b:>5} {r['trisect_tok_s']:>14.1f} {r['hf_sequential_tok_s']:>13.1f} {r['hf_batched_tok_s']:>15.1f} "
              f"{r['vs_sequential']:>7.2f} {r['vs_batched']:>8.2f} {r['tokens_identical_to_hf']}", flush=True)
    if args.json_path:
        last = results[-1]
        summary = {k: last[k] for k in ("trisect_tok_s", "hf_sequential_tok_s", "hf_batched_tok_s")}
        with open(args.json_path, "w") as f:
            json.dump({**summary, "runs": results}, f, indent=2)
    return 0 if all(r["tokens_identical_to_hf"] for r in results) else 1
