"""Many adapters on one base: a mixed-adapter batch against the merged base and one row at a time.

One ``GPTModel`` of the ``--model`` shape (random weights, seeded, float32, CPU) gets
``--adapters`` named LoRA adapters (``add_lora``: rank ``--rank``, alpha ``--alpha``, the
default targets; each ``B`` drawn at random so that the adapters differ). A batch of
``--rows`` prompts of ``--prompt-tokens`` tokens is given the adapters in turn (row ``i``:
adapter ``i mod adapters``). Each contestant greedy-decodes ``--new-tokens`` tokens per row
with the KV cache (``course_lib.inference.generate``, no eos):

* ``mixed batch``     — all rows in one batch, per-row adapters: ``set_adapter(model, [names])``;
* ``merged base``     — the same rows on a copy with one adapter merged (``merge_lora``): the
  speed of plain decoding with the LoRA wrappers in place;
* ``plain GPTModel``  — a copy with one adapter merged and the wrappers removed (``unload_lora``),
  for reference: what fast decoding's fused Q/K/V product adds on top;
* ``one at a time``   — each row alone with its adapter (``set_adapter(model, name)``), summed.

Tokens/s = rows x new tokens / seconds. Before timing, the mixed batch's tokens are checked
against each row decoded alone with its adapter ("same tokens"; every timed run is checked
too), and the adapters are checked to change the output ("adapters differ": row 0 decoded
with each adapter gives that many different continuations). Every contestant runs under
``torch.inference_mode()`` in one process, after a warm-up; the contestants take turns, in an
order that alternates from one repeat to the next; each speed is the best of ``--repeats``
runs, and the "(median)" ratios are the median over repeats of the ratio within a repeat.
Targets (issue 15): mixed / merged >= 0.7x, mixed / one at a time >= 3x.

    python benchmarks/bench_lora.py --threads 2 --repeats 3
    python benchmarks/bench_lora.py --model gpt-tiny --new-tokens 32
    python benchmarks/bench_lora.py --profile          # where a mixed-batch decode step spends its time
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from course_lib.config import get_config
from course_lib.inference import generate, prefill
from course_lib.lora import add_lora, lora_layers, merge_lora, set_adapter, unload_lora
from course_lib.model import GPTModel

TARGET_MERGED, TARGET_ONE = 0.7, 3.0


def _timed_output(fn, outputs: list) -> float:
    start = time.perf_counter()
    outputs.append(fn())
    return time.perf_counter() - start


def build(name: str, n_adapters: int, rank: int, alpha: float, b_std: float):
    """The model with ``n_adapters`` random adapters ``a0, a1, ...`` (none active)."""
    cfg = get_config(name).replace(drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    names = [f"a{i}" for i in range(n_adapters)]
    g = torch.Generator().manual_seed(1)
    for n in names:
        add_lora(model, rank=rank, alpha=alpha, name=n)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                B = layer.lora_B[n]
                B.copy_(torch.randn(B.shape, generator=g) * b_std)    # a trained-looking B, not zeros
    set_adapter(model, None)
    return cfg, model.eval(), names


def bench(name: str, rows: int, n_adapters: int, rank: int, alpha: float, b_std: float, prompt_tokens: int,
          new_tokens: int, repeats: int) -> dict:
    cfg, model, names = build(name, n_adapters, rank, alpha, b_std)
    if prompt_tokens + new_tokens > cfg.context_length:
        raise SystemExit(f"{name}: prompt + new tokens ({prompt_tokens + new_tokens}) exceed its context "
                         f"length {cfg.context_length}; use fewer --new-tokens")
    row_names = [names[i % n_adapters] for i in range(rows)]
    merged = copy.deepcopy(model)
    set_adapter(merged, names[0])
    merge_lora(merged)
    plain = copy.deepcopy(model)
    set_adapter(plain, names[0])
    unload_lora(plain)
    prompts = torch.randint(0, cfg.vocab_size, (rows, prompt_tokens), generator=torch.Generator().manual_seed(2))

    def run_mixed():
        with torch.inference_mode():
            set_adapter(model, row_names)
            return generate(model, prompts, new_tokens)

    def run_merged():
        with torch.inference_mode():
            return generate(merged, prompts, new_tokens)

    def run_plain():
        with torch.inference_mode():
            return generate(plain, prompts, new_tokens)

    def run_one():
        outs = []
        with torch.inference_mode():
            for i, n in enumerate(row_names):
                set_adapter(model, n)
                outs.append(generate(model, prompts[i:i + 1], new_tokens))
        return torch.cat(outs)

    mixed_out, one_out = [run_mixed()], [run_one()]          # warm-up, and the check
    run_merged(), run_plain()
    with torch.inference_mode():
        variants = set()
        for n in names:
            set_adapter(model, n)
            variants.add(tuple(generate(model, prompts[:1], new_tokens)[0].tolist()))
    times = {"mixed": [], "merged": [], "plain": [], "one": []}
    contestants = {"mixed": lambda: _timed_output(run_mixed, mixed_out),
                   "merged": lambda: _timed_output(run_merged, []),
                   "plain": lambda: _timed_output(run_plain, []),
                   "one": lambda: _timed_output(run_one, one_out)}
    order = list(contestants)
    for r in range(repeats):
        for key in (order if r % 2 == 0 else order[::-1]):
            times[key].append(contestants[key]())
    same = all(m.tolist() == one_out[0].tolist() for m in mixed_out + one_out)
    tokens = rows * new_tokens
    return {"model": name, "params_m": sum(p.numel() for p in plain.parameters()) / 1e6, "same": same,
            "variants": len(variants), "n_adapters": n_adapters, "rows": rows,
            **{k: tokens / min(v) for k, v in times.items()},
            "vs_merged_median": statistics.median(m / x for m, x in zip(times["merged"], times["mixed"])),
            "vs_one_median": statistics.median(o / x for o, x in zip(times["one"], times["mixed"])),
            "per_repeat": {k: [tokens / t for t in v] for k, v in times.items()}}


def profile(name: str, rows: int, n_adapters: int, rank: int, alpha: float, b_std: float, prompt_tokens: int,
            steps: int = 32) -> None:
    """Time ``steps`` decode steps of the mixed batch, the merged base and the batch with one
    adapter for all rows, and list the mixed batch's costliest operators."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from course_lib.inference import fast_decoding

    cfg, model, names = build(name, n_adapters, rank, alpha, b_std)
    row_names = [names[i % n_adapters] for i in range(rows)]
    merged = copy.deepcopy(model)
    set_adapter(merged, names[0])
    merge_lora(merged)
    prompts = torch.randint(0, cfg.vocab_size, (rows, prompt_tokens), generator=torch.Generator().manual_seed(2))
    ids = torch.zeros(rows, 1, dtype=torch.long)

    def steps_of(m, choice):
        if choice != "merged":
            set_adapter(m, choice)
        cache, _ = prefill(m, prompts, max_len=prompt_tokens + steps)
        start = time.perf_counter()
        for _ in range(steps):
            m(ids, kv_cache=cache)
        return (time.perf_counter() - start) / steps * 1e3

    with torch.inference_mode():
        fast_decoding(model), fast_decoding(merged)
        cases = {"mixed batch (per-row adapters)": (model, row_names), "one adapter for all rows": (model, names[0]),
                 "adapters off (set_adapter None)": (model, None), "merged base": (merged, "merged")}
        for m, c in cases.values():
            steps_of(m, c)
        print(f"\n| {rows} rows, one decode step | ms (best of 5) |\n|---|---:|")
        for label, (m, c) in cases.items():
            print(f"| {label} | {min(steps_of(m, c) for _ in range(5)):.2f} |")
        set_adapter(model, row_names)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            steps_of(model, row_names)
    print(f"\nmixed batch, {steps} decode steps, by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-cpu", help="a config preset (course_lib.config)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4, help="adapters in the batch (row i gets i mod this)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--b-std", type=float, default=0.05, help="standard deviation of each random B")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per contestant (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="only time decode steps and list the costliest ops")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, {args.rows} rows, "
          f"{args.adapters} adapters (rank {args.rank}, alpha {args.alpha:g}, attention q/k/v/out), prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, KV cache, float32, CPU, "
          f"inference_mode; tokens/s = rows x new tokens / s (best of {args.repeats})")
    common = (args.model, args.rows, args.adapters, args.rank, args.alpha, args.b_std, args.prompt_tokens)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.profile:
        profile(*common)
        return
    r = bench(*common, args.new_tokens, args.repeats)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    vs_merged, vs_one = r["mixed"] / r["merged"], r["mixed"] / r["one"]
    ok = "yes" if vs_merged >= TARGET_MERGED and vs_one >= TARGET_ONE else "NO"
    print(f"\n| model | params | adapters x rows | same tokens | adapters differ | mixed batch | merged base "
          f"| plain GPTModel | one at a time | mixed / merged (target >= {TARGET_MERGED}x) | ... (median) "
          f"| mixed / one at a time (target >= {TARGET_ONE:g}x) | ... (median) | targets met |")
    print("|---|---:|---:|:---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    print(f"| {r['model']} | {r['params_m']:.0f}M | {r['n_adapters']} x {r['rows'] // r['n_adapters']} "
          f"| {'yes' if r['same'] else 'NO'} | {r['variants']}/{r['n_adapters']} | {r['mixed']:.0f} "
          f"| {r['merged']:.0f} | {r['plain']:.0f} | {r['one']:.0f} | {vs_merged:.2f}x | {r['vs_merged_median']:.2f}x "
          f"| {vs_one:.2f}x | {r['vs_one_median']:.2f}x | {ok} |")
    for k, v in r["per_repeat"].items():
        print(f"{k}: tokens/s in each repeat: " + ", ".join(f"{x:.0f}" for x in v))
    print(f"load average (1 min) before and after: {load_before:.2f}, {load_after:.2f} "
          f"on {os.cpu_count()} CPUs (other jobs on a shared machine slow the runs down)")


if __name__ == "__main__":
    main()
