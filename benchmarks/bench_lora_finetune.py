"""Step 9: LoRA against full fine-tuning, per profile, measured against the targets of issue 15.

Four runs, each in a fresh Python process (so that each one's peak memory is its own):

* ``spam-full``: step 6's recipe (``finetune_classifier``, every weight trains);
* ``spam-lora``: the same data, split and seed with adapters (``LORA_RECIPES["classify"][profile]``:
  targets, ranks, learning rate; the classifier's head trains in full);
* ``instruct-full``: step 7's recipe (``finetune_instructions``);
* ``instruct-lora``: the same with adapters (``LORA_RECIPES["instruct"][profile]``).

One table: trainable parameters (and their share), test accuracy (spam) or the test response
loss after tuning (instructions; prompt tokens ignored), peak memory (the process's peak
resident set on CPU, ``torch.cuda.max_memory_allocated`` on a GPU), training seconds.

Targets (issue 15, ``cpu`` profile): spam with LoRA within 1 point of the full fine-tune's test
accuracy, with at most 2 % of the parameters trainable and lower peak memory; instruction LoRA's
response loss within 10 % of the full fine-tune's. ``gpu``: GPT-2 small spam with LoRA >= 96 %.

    python benchmarks/bench_lora_finetune.py --profile cpu --threads 2
    python benchmarks/bench_lora_finetune.py --profile tiny              # seconds: proves the script works
    python benchmarks/bench_lora_finetune.py --profile cpu --only spam-full,spam-lora
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

RUNS = ("spam-full", "spam-lora", "instruct-full", "instruct-lora")


def one_run(name: str, profile: str, device: str | None) -> dict:
    """Fine-tune as ``name`` says; the figures of the table as a dict."""
    import torch

    from course_lib.classification import finetune_classifier
    from course_lib.instruction import finetune_instructions
    from course_lib.lora import LORA_RECIPES, add_lora

    task, how = name.split("-")
    recipe = LORA_RECIPES["classify" if task == "spam" else "instruct"][profile]
    box: dict = {}

    def prepare(model):
        box["lora"] = add_lora(model, rank=recipe.rank, alpha=recipe.alpha, targets=list(recipe.targets),
                               rank_pattern=recipe.rank_pattern or None)

    kwargs = dict(prepare_model=prepare, lr=recipe.lr, num_epochs=recipe.num_epochs) if how == "lora" else {}
    if task == "spam":
        result = finetune_classifier(profile, device=device, progress=False, verbose=False, **kwargs)
        score = {"test_accuracy": result.metrics["test_accuracy"]}
    else:
        result = finetune_instructions(profile, device=device, progress=False, verbose=False, **kwargs)
        score = {"response_loss": result.metrics["response_loss"],
                 "base_response_loss": result.metrics["base_response_loss"]}
    m = result.metrics
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() and str(device or "").startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)      # Linux: KiB
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in result.model.parameters())
    return {"run": name, "trainable": trainable, "total": total, "peak_bytes": peak, "seconds": m["seconds"],
            **score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help="tiny, cpu or gpu (default cpu)")
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # the child process: one run, JSON on stdout
    args = parser.parse_args()
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(one_run(args.one, args.profile, args.device)))
        return
    runs = [r.strip() for r in args.only.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        raise SystemExit(f"--only takes a comma-separated list of {', '.join(RUNS)}; got {args.only!r}")
    results = {}
    for name in runs:
        cmd = [sys.executable, __file__, "--one", name, "--profile", args.profile]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--device", args.device] if args.device else []
        print(f"running {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nprofile {args.profile}\n")
    print("| run | trainable params | share | score | peak memory | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        score = (f"test accuracy {100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else
                 f"response loss {r['base_response_loss']:.3f} -> {r['response_loss']:.3f}")
        print(f"| {name} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f}% | {score} | "
              f"{r['peak_bytes'] / 2**20:,.0f} MiB | {r['seconds']:.1f} |")
    print()
    full, lora = results.get("spam-full"), results.get("spam-lora")
    if full and lora:
        gap = 100 * (full["test_accuracy"] - lora["test_accuracy"])
        share = lora["trainable"] / lora["total"]
        ok = gap <= 1.0 and share <= 0.02 and lora["peak_bytes"] < full["peak_bytes"]
        print(f"spam: LoRA {gap:+.2f} points below full fine-tuning (target <= 1), {100 * share:.2f}% trainable "
              f"(<= 2%), peak memory {lora['peak_bytes'] / full['peak_bytes']:.2f}x (< 1): "
              f"target met: {'yes' if ok else 'no'}")
    full, lora = results.get("instruct-full"), results.get("instruct-lora")
    if full and lora:
        ratio = lora["response_loss"] / full["response_loss"]
        print(f"instructions: LoRA's response loss {ratio:.3f}x the full fine-tune's (target <= 1.10): "
              f"target met: {'yes' if ratio <= 1.10 else 'no'}")


if __name__ == "__main__":
    main()
