"""The batching engine (``course_lib.engine.Engine``) against ``inference.generate`` called directly.

For each ``--models`` shape (random weights, seeded, float32; default ``gpt-cpu`` and GPT-2
small's ``gpt2-small``) and prompts of ``--prompt-tokens`` random tokens, greedy, no stop:

* ``1 request``   — one request through the engine vs ``generate`` on the same model: tokens/s
  (target >= 0.8x; the engine's thread, queue and detokenizing cost little);
* ``16 concurrent`` — ``--clients`` requests submitted at once, each read by its own thread:
  aggregate tokens/s vs one request through the engine (target >= 5x), and time to first token
  (submit to first Delta; median and p95);
* ``mixed adapters`` — the same with ``--adapters`` random LoRA adapters (rank 8) round-robin,
  vs one request with an adapter.

Each figure is the best of ``--repeats`` runs after a warm-up; outputs are checked against
``generate`` (greedy, alone) before timing.

    python benchmarks/bench_serve_engine.py --threads 2
    python benchmarks/bench_serve_engine.py --quick          # a short smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from course_lib.config import get_config
from course_lib.engine import Engine, SamplingParams
from course_lib.inference import generate
from course_lib.lora import add_lora, lora_layers, save_adapter
from course_lib.model import GPTModel

TARGET_ONE, TARGET_MANY = 0.8, 5.0


def random_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids (seeded: the same every run)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def save_random_adapters(model: GPTModel, n: int, folder: Path) -> dict[str, Path]:
    """``n`` LoRA adapters ``a0, a1, ...`` on ``model`` (rank 8, alpha 16, random B, so that they differ),
    saved in PEFT's format under ``folder``: ``{name: adapter folder}`` for ``Engine(adapters=...)``."""
    folders = {}
    for i in range(n):
        name, m = f"a{i}", copy.deepcopy(model)
        add_lora(m, rank=8, alpha=16, name=name)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for layer in lora_layers(m).values():
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.02)
        folders[name] = save_adapter(m, Path(folder) / name, name=name)
    return folders


def _run(engine: Engine, prompts, new: int, models) -> tuple[float, int, list[float], list[list[int]]]:
    """Submit all at once, read each in its own thread: (seconds, tokens, first-token times, ids)."""
    params = SamplingParams(max_tokens=new, temperature=0, stop_token_ids=())
    ttft, out = [0.0] * len(prompts), [None] * len(prompts)

    def read(i, handle, t0):
        ids = []
        for d in handle:
            if not ids and d.token_ids:
                ttft[i] = time.perf_counter() - t0
            ids += d.token_ids
        out[i] = ids

    start = time.perf_counter()
    readers = []
    for i, (p, m) in enumerate(zip(prompts, models)):
        t = threading.Thread(target=read, args=(i, engine.submit(p, params, model=m), time.perf_counter()))
        t.start()
        readers.append(t)
    for t in readers:
        t.join()
    return time.perf_counter() - start, sum(len(o) for o in out), ttft, out


def bench_shape(name: str, args) -> list[str]:
    cfg = get_config(name).replace(drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    new = min(args.new_tokens, cfg.context_length - args.prompt_tokens)
    prompts = random_prompts(args.clients, args.prompt_tokens, cfg.vocab_size)
    rows = []

    # generate directly vs one request through the engine
    ref = copy.deepcopy(model)
    idx = torch.tensor([prompts[0]])
    with torch.inference_mode():
        want = generate(ref, idx, new)[0, args.prompt_tokens:].tolist()
    gen_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            generate(ref, idx, new)
        gen_s.append(time.perf_counter() - t0)
    gen_tps = new / min(gen_s)

    with tempfile.TemporaryDirectory() as tmp:
        folders = save_random_adapters(model, args.adapters, Path(tmp))
        names = list(folders)
        with Engine(copy.deepcopy(model), max_batch=args.clients, adapters=folders) as eng:
            _, _, _, out = _run(eng, prompts[:1], new, [None])
            assert out[0] == want, "the engine's greedy tokens differ from generate's"
            one = min(_run(eng, prompts[:1], new, [None])[0] for _ in range(args.repeats))
            one_tps = new / one
            rows.append(f"{name:10s} 1 request      engine {one_tps:8.1f} tok/s  generate {gen_tps:8.1f} tok/s  "
                        f"ratio {one_tps / gen_tps:5.2f}x (target >= {TARGET_ONE}x)")
            for label, models in (("concurrent", [None] * args.clients),
                                  ("mixed adapt", [names[i % len(names)] for i in range(args.clients)])):
                alone = min(_run(eng, prompts[:1], new, models[:1])[0] for _ in range(args.repeats))
                best, ttfts = None, []
                for _ in range(args.repeats):
                    secs, toks, ttft, _ = _run(eng, prompts, new, models)
                    ttfts += ttft
                    best = secs if best is None else min(best, secs)
                many_tps, alone_tps = args.clients * new / best, new / alone
                q = statistics.quantiles(ttfts, n=20)
                rows.append(f"{name:10s} {args.clients} {label:11s} {many_tps:8.1f} tok/s  1 alone {alone_tps:8.1f} "
                            f"tok/s  ratio {many_tps / alone_tps:5.2f}x (target >= {TARGET_MANY}x)  TTFT median "
                            f"{statistics.median(ttfts) * 1e3:6.1f} ms  p95 {q[18] * 1e3:6.1f} ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["gpt-cpu", "gpt2-small"])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="gpt-cpu only, 16 new tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.models, args.new_tokens, args.repeats = ["gpt-cpu"], 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompts of {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, best of {args.repeats}")
    for name in args.models:
        for row in bench_shape(name, args):
            print(row, flush=True)


if __name__ == "__main__":
    main()
