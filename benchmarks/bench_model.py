"""Step 4 benchmark: one training step of our GPTModel against Hugging Face's GPT2LMHeadModel.

Both models get the same configuration (GPT-2's vocabulary, tied head, QKV bias, the same
dropout) and the same work: forward, cross-entropy on the logits (computed the same way for
both, outside the model), backward, one AdamW step. Hugging Face's model uses its SDPA
attention (``attn_implementation="sdpa"``), as ours does.

Every (model, size) pair runs in a **fresh Python process**, so its peak memory (the
process's maximum resident set size, ``ru_maxrss``) is its own. The memory figure is that peak
minus the resident size just before the model was built (both workers import the same
libraries first). Speed is the tokens of one step divided by the fastest timed step; runs
alternate ours / theirs and the best of ``--repeats`` is kept. Both choices keep noise from
other work on a shared machine out of the figures (it only ever makes a step slower).

Usage::

    python benchmarks/bench_model.py                      # both sizes, CPU
    python benchmarks/bench_model.py --sizes small --steps 5 --repeats 3

Prints one row per size: tokens per second and peak memory for each, and the ratios
(ours / Hugging Face for speed, Hugging Face / ours for memory: above 1.0 means ours is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = {  # name: (n_layers, emb_dim, n_heads)
    "small": (4, 256, 4),
    "base": (12, 768, 12),   # GPT-2 small's body
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, size: str, args) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers  # noqa: F401  (imported by both workers, so the baseline is the same)
    from transformers import GPT2Config, GPT2LMHeadModel

    from course_lib.config import GPTConfig
    from course_lib.model import GPTModel

    torch.set_num_threads(args.threads)
    n_layers, d, heads = SIZES[size]
    T, V = args.context, 50257
    torch.manual_seed(0)
    idx = torch.randint(0, V, (args.batch, T + 1))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    base_rss = _rss_bytes()

    if impl == "ours":
        cfg = GPTConfig(vocab_size=V, context_length=T, emb_dim=d, n_heads=heads, n_layers=n_layers,
                        drop_rate=args.dropout, qkv_bias=True)
        model = GPTModel(cfg, tie_weights=True)

        def logits_of(x):
            return model(x)
    else:
        hf_cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=d, n_layer=n_layers, n_head=heads,
                            resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                            use_cache=False, tie_word_embeddings=True, attn_implementation="sdpa")
        model = GPT2LMHeadModel(hf_cfg)
        assert model.config._attn_implementation == "sdpa"

        def logits_of(x):
            return model(input_ids=x, use_cache=False).logits

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        logits = logits_of(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    # The fastest step: on a shared machine, slower steps measure the neighbours, not the model.
    return {"tokens_per_s": args.batch * T / min(times),
            "peak_bytes": peak - base_rss,
            "params": sum(p.numel() for p in model.parameters())}


def run_one(impl: str, size: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--sizes", size,
           "--batch", str(args.batch), "--context", str(args.context), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--dropout", str(args.dropout)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{impl}/{size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small,base", help="comma-separated: " + ", ".join(SIZES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="runs per model; the best is kept")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dropout", type=float, default=0.1, help="GPT-2's 0.1 by default")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes, args)))
        return

    import torch
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"batch {args.batch} x context {args.context}, dropout {args.dropout}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats}")
    header = (f"{'size':<16}{'params':>12}{'ours tok/s':>12}{'HF tok/s':>11}{'speed ratio':>13}"
              f"{'ours MiB':>10}{'HF MiB':>9}{'memory ratio':>14}")
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}; choose from {list(SIZES)}")
        best = {"ours": None, "hf": None}
        for _ in range(args.repeats):
            for impl in ("ours", "hf"):
                r = run_one(impl, size, args)
                b = best[impl]
                best[impl] = r if b is None else {
                    "tokens_per_s": max(b["tokens_per_s"], r["tokens_per_s"]),
                    "peak_bytes": min(b["peak_bytes"], r["peak_bytes"]), "params": r["params"]}
        o, h = best["ours"], best["hf"]
        if o["params"] != h["params"]:
            raise SystemExit(f"parameter counts differ: ours {o['params']:,}, HF {h['params']:,}")
        n_layers, d, _ = SIZES[size]
        print(f"{f'{n_layers} x {d}':<16}{o['params'] / 1e6:>11.1f}M{o['tokens_per_s']:>12,.0f}"
              f"{h['tokens_per_s']:>11,.0f}{o['tokens_per_s'] / h['tokens_per_s']:>13.2f}"
              f"{o['peak_bytes'] / 2**20:>10,.0f}{h['peak_bytes'] / 2**20:>9,.0f}"
              f"{h['peak_bytes'] / o['peak_bytes']:>14.2f}")
    print("speed ratio = ours / HF tokens per second; memory ratio = HF / ours peak memory "
          "(both >= 1.0 means ours is at least as fast and no bigger)")


if __name__ == "__main__":
    main()
