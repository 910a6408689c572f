"""Step 7: instruction tuning per profile, measured against the targets of issue 13.

Fine-tunes the profile's model with ``course_lib.instruction.finetune_instructions`` (the
recipe of ``INSTRUCTION_RECIPES``, optionally with and without prompt masking) and prints
one table: the response loss on the test split before and after (prompt tokens ignored),
the share of generated test responses that end with end-of-text before ``max_new_tokens``
and that contain no template header, exact match and ROUGE-L of the base model and the
tuned one, and the training seconds.

Targets (``cpu`` profile, from the course's base model): response loss at least 30 % below
the base model's; at least 95 % of responses end with end-of-text and contain no template
header; ROUGE-L reported beside the base model's. ``gpu``: GPT-2 medium, as in the book.

    python benchmarks/bench_instruction.py --profile cpu --threads 2
    python benchmarks/bench_instruction.py --profile cpu --mask-prompt both
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

TARGETS = {"loss_reduction": 0.30, "stopped": 0.95, "markers": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help="tiny, cpu or gpu (default cpu)")
    parser.add_argument("--mask-prompt", default="recipe", choices=["recipe", "no", "yes", "both"],
                        help="learn the prompt's tokens too (no), only the response (yes), or both runs")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from course_lib.base_model import load_base_model
    from course_lib.config import get_device
    from course_lib.instruction import INSTRUCTION_RECIPES, finetune_instructions
    from course_lib.pretrained import load_gpt2

    recipe = INSTRUCTION_RECIPES[args.profile]
    masks = {"recipe": [None], "no": [False], "yes": [True], "both": [False, True]}[args.mask_prompt]
    started = time.perf_counter()
    base = load_base_model(args.profile) if recipe.base == "profile" else load_gpt2(recipe.base)
    device = get_device(args.device)
    print(f"profile {args.profile}, device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"base model ready in {time.perf_counter() - started:.1f} s; recipe: {recipe}")
    rows = []
    for mask in masks:
        result = finetune_instructions(args.profile, mask_prompt=mask, num_epochs=args.epochs, device=device,
                                       base_model=copy.deepcopy(base), progress=False, verbose=False)
        m = result.metrics
        m["mask_prompt"] = result.metrics["recipe"]["mask_prompt"]
        rows.append(m)
        print(f"  done: mask_prompt={m['mask_prompt']}: response loss {m['base_response_loss']:.3f} -> "
              f"{m['response_loss']:.3f} in {m['seconds']:.0f} s")

    print()
    print("| mask prompt | response loss base -> tuned | reduction | stopped at end-of-text | template headers "
          "| exact match base -> tuned | ROUGE-L base -> tuned | train s | targets met |")
    print("|---|---|---:|---:|---:|---|---|---:|---|")
    for m in rows:
        met = (m["loss_reduction"] >= TARGETS["loss_reduction"] and m["stopped_at_end_of_text"] >= TARGETS["stopped"]
               and m["with_template_markers"] <= TARGETS["markers"])
        print(f"| {'yes' if m['mask_prompt'] else 'no'} | {m['base_response_loss']:.3f} -> {m['response_loss']:.3f} "
              f"| {100 * m['loss_reduction']:.1f}% | {100 * m['stopped_at_end_of_text']:.1f}% "
              f"| {100 * m['with_template_markers']:.1f}% "
              f"| {100 * m['base_exact_match']:.1f}% -> {100 * m['exact_match']:.1f}% "
              f"| {m['base_rouge_l']:.3f} -> {m['rouge_l']:.3f} | {m['seconds']:.0f} "
              f"| {'yes' if met else 'no'}{'' if args.profile != 'tiny' else ' (tiny: not meaningful)'} |")
    print(f"\n{rows[0]['responses']} test responses of at most {rows[0]['recipe']['max_new_tokens']} tokens; "
          f"splits: {rows[0]['examples']}")
    print("targets (cpu): response loss >= 30% below the base model's; >= 95% of responses end with end-of-text; "
          "no template headers")


if __name__ == "__main__":
    main()
