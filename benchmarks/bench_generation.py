"""Generation speed: our KV cache against no cache, and against Hugging Face ``generate``.

For each model shape, one set of weights (GPT-2's initialisation, tied head, QKV bias) is
built as a ``course_lib`` ``GPTModel``, exported with ``export_hf`` and loaded by
``transformers.GPT2LMHeadModel`` — the same weights on both sides. After checking that the
two decode the same greedy tokens, it times batch-1 greedy generation of ``--new-tokens``
tokens after a ``--prompt-tokens`` prompt, float32 on CPU:

* ``ours, no cache``  — ``course_lib.inference.generate(..., use_cache=False)``: the whole window
  re-encoded per token;
* ``ours, KV cache``  — ``generate(..., use_cache=True)`` (one prefill, then one token per step,
  with ``fast_decoding``: the few-rows route and the fused Q/K/V product);
* ``... plain nn.Linear`` — the same inside ``course_lib.inference.few_rows_route(False)``: every
  linear layer computed by ``nn.Linear.forward``, Q, K and V apart (shows what fast decoding buys);
* ``transformers``    — ``GPT2LMHeadModel.generate(do_sample=False)`` with its own cache.

Every contestant runs under ``torch.inference_mode()``, in the same process, dtype and thread
count, after a warm-up. The contestants take turns, in an order that alternates from one
repeat to the next; each speed is the best of ``--repeats`` runs, and "ours / transformers
(median)" is the median over repeats of the ratio within a repeat (robust to a load that
comes and goes). "same tokens": every timed run of ours and of transformers wrote the same
tokens. Targets (issues 6 and 11): the cache at least 3x faster than no cache at GPT-2
small's shape, and ours at least 1.5x as fast as transformers'.

    python benchmarks/bench_generation.py                     # gpt-cpu and gpt2-small shapes
    python benchmarks/bench_generation.py --models gpt-tiny --new-tokens 50
    python benchmarks/bench_generation.py --matmuls           # why: one token through GPT-2 small's matrices
    python benchmarks/bench_generation.py --min-size 0        # every layer on the few-rows route
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import course_lib.inference as inference
from course_lib.config import get_config
from course_lib.inference import generate
from course_lib.model import GPTModel
from course_lib.pretrained import export_hf


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timed_output(fn, outputs: list) -> float:
    start = time.perf_counter()
    outputs.append(fn())
    return time.perf_counter() - start


def bench(name: str, new_tokens: int, prompt_tokens: int, repeats: int, no_cache_repeats: int) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = get_config(name).replace(drop_rate=0.0, qkv_bias=True)
    if prompt_tokens + new_tokens > cfg.context_length:
        raise SystemExit(f"{name}: prompt + new tokens ({prompt_tokens + new_tokens}) exceed its context "
                         f"length {cfg.context_length}; use fewer --new-tokens")
    torch.manual_seed(0)
    ours = GPTModel(cfg, tie_weights=True).eval()
    with tempfile.TemporaryDirectory() as folder:
        export_hf(ours, folder, include_tokenizer=False)
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))

    def run_hf(n=new_tokens):
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, use_cache=True, pad_token_id=0)

    def run_ours(n=new_tokens, use_cache=True):
        with torch.inference_mode():
            return generate(ours, prompt, n, use_cache=use_cache)

    def run_plain(n=new_tokens):
        with inference.few_rows_route(False):
            return run_ours(n)

    check = 20                                     # warm-up, and a first check of the tokens
    ours_out, hf_out = [run_ours(check)], [run_hf(check)]
    run_plain(check)
    times = {"cache": [], "plain": [], "hf": []}
    contestants = {"cache": lambda: _timed_output(run_ours, ours_out), "plain": lambda: _timed(run_plain),
                   "hf": lambda: _timed_output(run_hf, hf_out)}
    order = list(contestants)
    nocache_s = []
    for r in range(repeats):
        for key in (order if r % 2 == 0 else order[::-1]):
            times[key].append(contestants[key]())
        if r < no_cache_repeats:
            nocache_s.append(_timed(lambda: run_ours(use_cache=False)))
    nocache_s = nocache_s or [float("nan")]
    same = all(a.tolist() == b.tolist() for a, b in zip(ours_out, hf_out))
    return {"model": name, "params_m": sum(p.numel() for p in ours.parameters()) / 1e6, "same_tokens": same,
            "no_cache": new_tokens / min(nocache_s), "cache": new_tokens / min(times["cache"]),
            "plain": new_tokens / min(times["plain"]), "hf": new_tokens / min(times["hf"]),
            "ratio_median": statistics.median(h / c for h, c in zip(times["hf"], times["cache"])),
            "ratios": [h / c for h, c in zip(times["hf"], times["cache"])]}


def bench_matmuls(repeats: int = 20) -> None:
    """One token through every weight matrix of GPT-2 small, two ways: ms per token."""
    import torch.nn.functional as F

    d, V = 768, 50257
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * 12 + [(d, V)]   # (in, out); QKV as one [768, 2304]
    torch.manual_seed(0)
    weights = [(torch.randn(o, i) * 0.02, torch.randn(o)) for i, o in shapes]
    xs = {i: torch.randn(1, i) for i in (d, 4 * d)}
    routes = {"F.linear(x, W, b), 1 row (nn.Linear)": F.linear,
              "few_rows_linear: W @ [x; x].T, first column, + bias": inference.few_rows_linear}
    print(f"\n| route | ms per token (all matrices, best of {repeats}) |\n|---|---:|")
    with torch.no_grad():
        for name, fn in routes.items():
            def step():
                for w, b in weights:
                    fn(xs[w.shape[1]], w, b)
            step()
            print(f"| {name} | {min(_timed(step) for _ in range(repeats)) * 1e3:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-cpu,gpt2-small", help="config presets, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell (best is kept)")
    parser.add_argument("--no-cache-repeats", type=int, default=1, help="runs of the slow no-cache path")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="set course_lib.inference.FEW_ROWS_MIN_SIZE (the smallest weight on the few-rows route)")
    parser.add_argument("--matmuls", action="store_true",
                        help="only time one token through GPT-2 small's matrices: nn.Linear's route against ours")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.min_size is not None:
        inference.FEW_ROWS_MIN_SIZE = args.min_size
    if args.matmuls:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
        bench_matmuls()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, prompt {args.prompt_tokens} "
          f"tokens, {args.new_tokens} new tokens, greedy, float32, CPU, inference_mode; tokens/s (best of "
          f"{args.repeats}); "
          f"FEW_ROWS_MIN_SIZE={inference.FEW_ROWS_MIN_SIZE}")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [bench(m.strip(), args.new_tokens, args.prompt_tokens, args.repeats, args.no_cache_repeats)
            for m in args.models.split(",")]
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n| model | params | same tokens | ours, no cache | ours, KV cache | ... plain nn.Linear | transformers "
          f"| cache / no cache | ours / transformers | ours / transformers (median) "
          f"| plain nn.Linear / transformers |")
    print("|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        skipped = r["no_cache"] != r["no_cache"]  # NaN: --no-cache-repeats 0
        no_cache = "-" if skipped else f"{r['no_cache']:.1f}"
        speedup = "-" if skipped else f"{r['cache'] / r['no_cache']:.2f}x"
        print(f"| {r['model']} | {r['params_m']:.0f}M | {'yes' if r['same_tokens'] else 'NO'} | {no_cache} "
              f"| {r['cache']:.1f} | {r['plain']:.1f} | {r['hf']:.1f} | {speedup} "
              f"| {r['cache'] / r['hf']:.2f}x | {r['ratio_median']:.2f}x | {r['plain'] / r['hf']:.2f}x |")
    for r in rows:
        print(f"{r['model']}: ours / transformers in each repeat: "
              + ", ".join(f"{x:.2f}x" for x in r["ratios"]))
    print(f"load average (1 min) before and after: {load_before:.2f}, {load_after:.2f} "
          f"on {os.cpu_count()} CPUs (other jobs on a shared machine slow the runs down)")


if __name__ == "__main__":
    main()
