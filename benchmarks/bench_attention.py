"""Step 3 benchmark: forward + backward time of course_lib's MultiHeadAttention against torch's.

Three contestants, all causal self-attention with the same weights, float32, CPU by default:

* ``explicit``  — ``MultiHeadAttention(use_sdpa=False)``: scores, mask, softmax, weighted values;
* ``sdpa``      — ``MultiHeadAttention(use_sdpa=True)`` (the default): ``F.scaled_dot_product_attention``;
* ``torch``     — ``torch.nn.MultiheadAttention(batch_first=True)`` with a causal ``attn_mask`` and the
  ``is_causal=True`` hint, ``need_weights=False`` (its fastest configuration).

Each timing is the best of ``--repeats`` runs of ``out.sum().backward()`` after warm-up runs, the
contestants taking turns (robust to other load on a shared machine).
Target: the SDPA path within 1.2x of ``nn.MultiheadAttention``.

Usage::

    python benchmarks/bench_attention.py                       # GPT-2 small width, T = 64 ... 1024
    python benchmarks/bench_attention.py --d-model 256 --heads 4 --batch 4 --lengths 64 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from course_lib.attention import MultiHeadAttention

TARGET = 1.2


def time_fwd_bwd(fns: dict, x: torch.Tensor, repeats: int, warmup: int = 2) -> dict:
    """Best (minimum) seconds of one forward + backward of ``fn(x).sum()`` for each contestant.

    The contestants take turns within every repetition, so a burst of load from other
    processes hits all of them alike; the minimum is the run least disturbed by it.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn(x).sum().backward()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            x.grad = None
            t0 = time.perf_counter()
            fn(x).sum().backward()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def build(d_model: int, heads: int, context: int):
    ours = MultiHeadAttention(d_model, d_model, context, dropout=0.0, num_heads=heads)
    ref = nn.MultiheadAttention(d_model, heads, dropout=0.0, bias=True, batch_first=True)
    with torch.no_grad():  # same numbers in both
        ref.in_proj_weight.copy_(torch.cat([ours.W_query.weight, ours.W_key.weight, ours.W_value.weight]))
        ref.in_proj_bias.zero_()
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours, ref = build(args.d_model, args.heads, max(args.lengths))
    masks = {}

    def run_ours_sdpa(x):
        ours.use_sdpa = True
        return ours(x)

    def run_ours_explicit(x):
        ours.use_sdpa = False
        return ours(x)

    def run_torch(x):
        T = x.shape[1]
        if T not in masks:
            masks[T] = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        return ref(x, x, x, attn_mask=masks[T], need_weights=False, is_causal=True)[0]

    # the three compute the same thing (a benchmark of different answers would mean nothing)
    x = torch.randn(args.batch, min(args.lengths), args.d_model)
    with torch.no_grad():
        a, b, c = run_ours_explicit(x), run_ours_sdpa(x), run_torch(x)
    assert torch.allclose(a, c, atol=1e-5) and torch.allclose(b, c, atol=1e-5), "outputs differ"

    print(f"causal self-attention, forward + backward, float32 CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"d_model={args.d_model}, heads={args.heads}, batch={args.batch}, best of {args.repeats}\n")
    header = (f"{'T':>6} | {'explicit ms':>11} | {'sdpa ms':>9} | {'torch MHA ms':>12} | "
              f"{'sdpa/torch':>10} | {'explicit/torch':>14}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for T in args.lengths:
        x = torch.randn(args.batch, T, args.d_model, requires_grad=True)
        t = time_fwd_bwd({"explicit": run_ours_explicit, "sdpa": run_ours_sdpa, "torch": run_torch}, x, args.repeats)
        t_exp, t_sdpa, t_ref = t["explicit"], t["sdpa"], t["torch"]
        worst = max(worst, t_sdpa / t_ref)
        print(f"{T:>6} | {1e3 * t_exp:>11.2f} | {1e3 * t_sdpa:>9.2f} | {1e3 * t_ref:>12.2f} | "
              f"{t_sdpa / t_ref:>9.2f}x | {t_exp / t_ref:>13.2f}x")
    verdict = "MET" if worst <= TARGET else "MISSED"
    print(f"\ntarget: sdpa within {TARGET}x of torch.nn.MultiheadAttention — worst ratio {worst:.2f}x: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
