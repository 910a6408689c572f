"""Checks for step 8's exercises (``course check 8``). ``ex`` is the module being checked.

The references are values worked out by hand, ``torch.nn.utils.clip_grad_norm_``, and the
library's own versions (``course_lib.schedules.wsd_lr_at``, ``course_lib.anatomy.flops_per_token``
with ``course_lib.mfu.mfu``, ``course_lib.shards.ShardLoader`` reading a shard in order, and
``course_lib.trainer.param_groups``), which ``tests/test_schedules.py``, ``tests/test_mfu.py``,
``tests/test_shards.py`` and ``tests/test_trainer.py`` check against hand computations and torch.
No network; files only under ``tmp_path``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from course_lib.anatomy import flops_per_token
from course_lib.config import GPTConfig, get_config
from course_lib.mfu import mfu
from course_lib.model import GPTModel
from course_lib.schedules import wsd_lr_at
from course_lib.shards import ShardLoader, write_shard
from course_lib.trainer import param_groups
from _expect import as_float


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



# --------------------------------------------------------------------------- #
# wsd_lr_at
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("wsd_lr_at")
def test_wsd_by_hand(ex):
    want = [0, 0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0]          # worked out by hand (the docstring's example)
    got = [as_float(ex.wsd_lr_at(s, max_lr=1.0, min_lr=0.0, warmup_steps=2, total_steps=10, decay_steps=4),
                  f"step {s}") for s in range(12)]
    assert all(abs(g - w) < 1e-12 for g, w in zip(got, want)), (
        f"max_lr=1, min_lr=0, warmup_steps=2, total_steps=10, decay_steps=4: steps 0..11 should give {want}, got "
        f"{[round(g, 4) for g in got]}. Hint: the decay starts at total_steps - decay_steps = 6 (still 1.0 there) "
        "and reaches min_lr at step 10.")


@pytest.mark.exercise("wsd_lr_at")
def test_wsd_warmup_starts_at_warmup_start_lr_and_ends_at_min_lr(ex):
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, total_steps=100, decay_steps=20, warmup_start_lr=6e-6)
    for step, want in ((0, 6e-6), (5, 6e-6 + (6e-4 - 6e-6) / 2), (10, 6e-4), (79, 6e-4), (80, 6e-4),
                       (90, (6e-4 + 6e-5) / 2), (100, 6e-5), (10_000, 6e-5)):
        got = as_float(ex.wsd_lr_at(step, **kw), f"step {step}")
        assert abs(got - want) < 1e-12, (
            f"wsd_lr_at({step}, {', '.join(f'{k}={v}' for k, v in kw.items())}): expected {want:.6g}, got {got:.6g}. "
            "Hint: warmup goes from warmup_start_lr (step 0) to max_lr (step warmup_steps); after total_steps the "
            "rate stays at min_lr.")


@pytest.mark.exercise("wsd_lr_at")
def test_wsd_equals_the_librarys(ex):
    rng = random.Random(8)
    for trial in range(40):
        total = rng.randint(1, 60)
        warmup = rng.randint(0, total)
        decay = rng.randint(0, total - warmup)
        max_lr = rng.uniform(1e-4, 1e-2)
        kw = dict(max_lr=max_lr, min_lr=max_lr * rng.choice([0.0, 0.1, 1.0]), warmup_steps=warmup,
                  total_steps=total, decay_steps=decay, warmup_start_lr=rng.choice([0.0, max_lr / 100]))
        for step in range(total + 3):
            want = wsd_lr_at(step, **kw)
            got = as_float(ex.wsd_lr_at(step, **kw), f"step {step}")
            assert abs(got - want) < 1e-12, (
                f"step {step} with {kw}: expected {want:.6g}, got {got:.6g}. Hint: decay_steps=0 means no decay phase "
                "(max_lr until total_steps, then min_lr); warmup_steps=0 means no warmup (start at max_lr).")


# --------------------------------------------------------------------------- #
# clip_grad_norm
# --------------------------------------------------------------------------- #
def _params_with_grads(scale: float, dtype=torch.float64):
    shapes = [(5, 3), (3,), (4, 2, 2), (7,)]
    params = [nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * scale
    params.append(nn.Parameter(torch.randn(6, dtype=dtype)))          # no gradient: skipped
    return params


def _clone(params):
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


@pytest.mark.exercise("clip_grad_norm")
def test_clip_by_hand(ex):
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    q = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    p.grad, q.grad = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    got = as_float(ex.clip_grad_norm([p, q], max_norm=1.0), "the returned norm")
    assert abs(got - 5.0) < 1e-9, (
        f"gradients (3, 0) and (4): the global 2-norm is sqrt(9 + 16) = 5, got {got}. Hint: "
        + ("that is the norm AFTER clipping (max_norm = 1); return the one computed before scaling."
           if abs(got - 1.0) < 1e-3 else "one norm over ALL gradients, as if they were one long vector."))
    want = [3 / (5 + 1e-6), 0.0, 4 / (5 + 1e-6)]
    now = p.grad.tolist() + q.grad.tolist()
    assert all(abs(a - b) < 1e-9 for a, b in zip(now, want)), (
        f"after clipping to max_norm=1 the gradients should be {[round(w, 6) for w in want]} (each times "
        f"1 / (5 + 1e-6)), got {now}. Hint: scale the gradients in place: p.grad.mul_(max_norm / (norm + 1e-6)).")


@pytest.mark.exercise("clip_grad_norm")
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_clip_equals_torch(ex, norm_type):
    for scale, max_norm in ((1.0, 0.5), (0.01, 10.0)):                  # clipped, then untouched
        mine = _params_with_grads(scale)
        ref = _clone(mine)
        want = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type)
        got = ex.clip_grad_norm(iter(mine), max_norm, norm_type)        # a generator, as model.parameters() is
        got = as_float(got, f"norm_type={norm_type}")
        assert abs(got - want.item()) < 1e-9 * max(1.0, want.item()), (
            f"norm_type={norm_type}: torch.nn.utils.clip_grad_norm_ returns the norm before clipping, "
            f"{want.item():.6f}; got {got:.6f}. Hint: "
            + ("the inf-norm is the largest |g| of all gradients." if math.isinf(norm_type) else
               f"(sum of |g| ** {norm_type:g} over every element) ** (1 / {norm_type:g}).")
            + " Did you read the parameters twice from a generator (the second pass sees nothing)?")
        for i, (a, b) in enumerate(zip(mine, ref)):
            assert (a.grad is None) == (b.grad is None), "a parameter without a gradient must stay without one"
            if a.grad is not None:
                assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12), (
                    f"norm_type={norm_type}, max_norm={max_norm}: parameter {i}'s gradient differs from "
                    f"clip_grad_norm_'s (largest difference {(a.grad - b.grad).abs().max().item():.3g}). Hint: "
                    + ("the norm is above max_norm: multiply every gradient by max_norm / (norm + 1e-6)."
                       if want.item() > max_norm else "the norm is below max_norm: leave the gradients as they are."))


@pytest.mark.exercise("clip_grad_norm")
def test_clip_without_gradients_returns_zero(ex):
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    got = as_float(ex.clip_grad_norm(params, 1.0), "no gradients")
    assert got == 0.0 and all(p.grad is None for p in params), (
        f"no parameter has a gradient: expected a norm of 0 and nothing changed, got {got}. Hint: "
        "torch.tensor(0.0) when the list of gradients is empty.")


# --------------------------------------------------------------------------- #
# mfu
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("mfu")
def test_mfu_by_hand(ex):
    cfg = GPTConfig(vocab_size=256, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    got = as_float(ex.mfu(1_000.0, cfg, 1e9), "mfu")
    assert abs(got - 0.786432) < 1e-12, (
        f"d=64, L=2, T=64, vocab 256 at 1,000 tokens/s on a 1e9 FLOP/s peak: N = 12*2*64*64 + 256*64 = 114,688, "
        f"FLOPs per token 3 * (2N + 4*2*64*64) = 786,432, so MFU = 0.786432; got {got!r}. Hint: training counts the "
        "forward pass three times (forward + backward).")


@pytest.mark.exercise("mfu")
def test_mfu_equals_the_librarys(ex):
    for name, tps, peak in (("gpt2-small", 180_000.0, 989e12), ("gpt-tiny", 25_000.0, 160e9),
                            ("gpt-cpu", 3_000.0, 80e9), ("gpt2-xl", 9_000.0, 312e12)):
        cfg = get_config(name)
        want = mfu(tps, flops_per_token(cfg, training=True), peak)
        got = as_float(ex.mfu(tps, cfg, peak), name)
        assert abs(got - want) < 1e-9 * want, (
            f"{name} at {tps:,.0f} tokens/s on {peak:.3g} FLOP/s: expected MFU {want:.6f}, got {got:.6f}. Hint: "
            "N counts the blocks' 12*L*d*d and the head's vocab_size*d (not the biases, norms or the position table).")


# --------------------------------------------------------------------------- #
# rank_window_starts
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("rank_window_starts")
def test_rank_windows_by_hand(ex):
    cases = [((20, 4, 0, 1), [0, 4, 8, 12]), ((20, 4, 0, 2), [0, 8]), ((20, 4, 1, 2), [4, 12]),
             ((20, 4, 0, 3), [0]), ((20, 4, 2, 3), [8]), ((21, 4, 0, 1), [0, 4, 8, 12, 16]),
             ((21, 4, 1, 2), [4, 12]), ((20, 4, 3, 4), [12]), ((5, 4, 0, 1), [0]), ((4, 4, 0, 1), []),
             ((20, 4, 5, 8), [])]                                       # worked out by hand
    for args, want in cases:
        got = ex.rank_window_starts(*args)
        assert isinstance(got, list) and got == want, (
            f"rank_window_starts(num_tokens={args[0]}, context_length={args[1]}, rank={args[2]}, "
            f"world_size={args[3]}): expected {want}, got {got!r}. Hint: a window at s needs s + context_length + 1 "
            "<= num_tokens; rank r takes windows r, r + world_size, ..., and every rank takes "
            "(number of windows) // world_size of them.")


@pytest.mark.exercise("rank_window_starts")
def test_rank_windows_are_disjoint_and_equal_in_number(ex):
    rng = random.Random(2)
    for trial in range(100):
        n, t, w = rng.randint(0, 300), rng.randint(1, 20), rng.randint(1, 8)
        per_rank = [ex.rank_window_starts(n, t, r, w) for r in range(w)]
        every = list(range(0, max(n - t, 0), t))
        kept = every[:len(every) // w * w]                               # the last n % w windows are left out
        together = sorted(s for starts in per_rank for s in starts)
        assert together == kept, (
            f"num_tokens={n}, context_length={t}, world_size={w}: the {len(every)} windows start at {every}; all "
            f"ranks together should read each of the first {len(kept)} exactly once ({len(every) // w} per rank), "
            f"they read {together}. Hint: rank r takes every world_size-th window, starting with window r.")
        assert len({len(s) for s in per_rank}) == 1, (
            f"num_tokens={n}, context_length={t}, world_size={w}: the ranks read {[len(s) for s in per_rank]} windows; "
            "every rank must read the same number (an all-reduce waits for every process)")
        assert all(s == sorted(s) for s in per_rank), "each rank's starts should be in increasing order"


@pytest.mark.exercise("rank_window_starts")
def test_rank_windows_are_what_the_shard_loader_reads(ex, tmp_path):
    tokens = np.arange(1, 1 + 203, dtype=np.uint16)                     # token i sits at position i - 1
    path = write_shard(tmp_path / "val_000000.bin", tokens)
    for context_length, world_size in ((8, 1), (8, 2), (16, 3), (50, 3)):
        for rank in range(world_size):
            got = ex.rank_window_starts(len(tokens), context_length, rank, world_size)
            loader = ShardLoader([path], batch_size=1, context_length=context_length, rank=rank,
                                 world_size=world_size, sequential=True)
            read = [int(x[0, 0]) - 1 for x, _ in loader]                # the first token's position = the start
            assert got == read, (
                f"a shard of {len(tokens)} tokens, context_length {context_length}, rank {rank} of {world_size}: "
                f"course_lib's ShardLoader(sequential=True, batch_size=1) reads windows starting at {read}; you gave "
                f"{got!r}")


# --------------------------------------------------------------------------- #
# decay_param_names
# --------------------------------------------------------------------------- #
def _names_in(model, groups):
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return decayed


@pytest.mark.exercise("decay_param_names")
def test_decay_names_by_hand(ex):
    cfg = GPTConfig(vocab_size=32, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)
    got = ex.decay_param_names(GPTModel(cfg))
    want = {"trf_blocks.0.att.W_query.weight", "trf_blocks.0.att.W_key.weight", "trf_blocks.0.att.W_value.weight",
            "trf_blocks.0.att.out_proj.weight", "trf_blocks.0.ff.layers.0.weight", "trf_blocks.0.ff.layers.2.weight",
            "out_head.weight"}                                          # listed by hand
    assert isinstance(got, set), f"expected a set of names, got {type(got).__name__}"
    missing, extra = sorted(want - got), sorted(got - want)
    assert not missing and not extra, (
        f"a one-block GPT: expected the 7 linear weight matrices {sorted(want)}; missing {missing}, should not be "
        f"there {extra}. Hint: the weight of every nn.Linear, and nothing else (no biases, norms or embeddings).")


@pytest.mark.exercise("decay_param_names")
def test_decay_names_equal_the_trainers_groups(ex):
    for name, tie in (("gpt-tiny", False), ("gpt-tiny", True)):
        model = GPTModel(get_config(name, n_layers=2, vocab_size=100), tie_weights=tie)
        got = ex.decay_param_names(model)
        want = _names_in(model, param_groups(model, weight_decay=0.1))
        missing, extra = sorted(want - set(got)), sorted(set(got) - want)
        assert not missing and not extra, (
            f"{name} (tie_weights={tie}): course_lib.trainer.param_groups decays {len(want)} tensors; missing "
            f"{missing}, should not be there {extra}. Hint: with tied weights the output head's matrix IS the token "
            "embedding (model.out_head.weight is model.tok_emb.weight): an embedding, not decayed.")
