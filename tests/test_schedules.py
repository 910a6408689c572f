"""Learning-rate schedules: boundaries, hand-computed values, torch's own schedulers, LambdaLR, bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch

from course_lib.schedules import SCHEDULES, linear_lr_at, lr_at, lr_lambda, scheduler, wsd_lr_at

# max 1.0 and min 0.1 keep the hand values readable; the decay runs over steps 10..110.
KW = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)


def _sgd(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _drive(sched, opt, steps):
    """The optimizer's lr at steps 0..steps-1, calling ``sched.step()`` after each (as a loop does)."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


# --------------------------------------------------------------------------- #
# Cosine
# --------------------------------------------------------------------------- #
def test_cosine_boundaries():
    assert lr_at(0, **KW) == 0.0                                   # warmup_start_lr
    assert lr_at(0, **KW, warmup_start_lr=0.2) == 0.2
    assert lr_at(10, **KW) == 1.0                                  # max_lr at warmup_steps
    assert lr_at(110, **KW) == pytest.approx(0.1, abs=1e-15)       # min_lr at total_steps
    assert lr_at(111, **KW) == 0.1 and lr_at(10**6, **KW) == 0.1   # and after


def test_cosine_hand_values():
    assert lr_at(5, **KW) == pytest.approx(0.5)                        # half-way up from 0
    assert lr_at(5, **KW, warmup_start_lr=0.2) == pytest.approx(0.6)   # 0.2 + 0.8 / 2
    assert lr_at(1, **KW) == pytest.approx(0.1)
    assert lr_at(60, **KW) == pytest.approx(0.55)                      # t = 1/2: cos = 0, the mean of max and min
    assert lr_at(35, **KW) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # t = 1/4
    assert lr_at(85, **KW) == pytest.approx(0.1 + 0.45 * (1 - math.sqrt(0.5)))  # t = 3/4
    # nanoGPT's recipe: 6e-4 -> 6e-5 over 600,000 steps after 2,000 of warmup
    gpt2 = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=2000, total_steps=600_000)
    assert lr_at(301_000, **gpt2) == pytest.approx(3.3e-4)


def test_cosine_is_monotone_up_then_down():
    lrs = [lr_at(s, **KW) for s in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a > b for a, b in zip(lrs[10:110], lrs[11:111]))


def test_no_warmup_starts_at_max_and_warmup_as_long_as_the_run_ends_at_min():
    assert lr_at(0, max_lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=10) == 1.0
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=10)
    assert lr_at(9, **kw) == pytest.approx(0.9) and lr_at(10, **kw) == 0.1


def test_cosine_equals_torch_linear_warmup_then_cosine_annealing():
    """torch's own LinearLR + CosineAnnealingLR (eta_min) chained by SequentialLR, an independent reference."""
    max_lr, min_lr, warmup, total, start = 3e-3, 3e-4, 20, 220, 3e-5
    opt = _sgd(max_lr)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=start / max_lr, end_factor=1.0, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr),
    ], milestones=[warmup])
    expected = _drive(ref, opt, total + 1)
    ours = [lr_at(s, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total, warmup_start_lr=start)
            for s in range(total + 1)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-15)


# --------------------------------------------------------------------------- #
# Linear and WSD
# --------------------------------------------------------------------------- #
def test_linear_boundaries_and_hand_values():
    assert linear_lr_at(0, **KW) == 0.0 and linear_lr_at(10, **KW) == 1.0
    assert linear_lr_at(5, **KW) == pytest.approx(0.5)
    assert linear_lr_at(35, **KW) == pytest.approx(0.775)   # a quarter of the way down
    assert linear_lr_at(60, **KW) == pytest.approx(0.55)
    assert linear_lr_at(110, **KW) == pytest.approx(0.1) and linear_lr_at(500, **KW) == 0.1


def test_linear_equals_torch_linear_lr():
    max_lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    opt = _sgd(max_lr)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warmup),
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=min_lr / max_lr, total_iters=total - warmup),
    ], milestones=[warmup])
    expected = _drive(ref, opt, total + 5)
    ours = [linear_lr_at(s, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total,
                         warmup_start_lr=0.01 * max_lr) for s in range(total + 5)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_wsd_boundaries_and_hand_values():
    kw = dict(KW, decay_steps=20)  # stable from 10 to 90, decay 90 -> 110
    assert wsd_lr_at(0, **kw) == 0.0 and wsd_lr_at(5, **kw) == pytest.approx(0.5)
    assert wsd_lr_at(10, **kw) == 1.0 and wsd_lr_at(50, **kw) == 1.0 and wsd_lr_at(90, **kw) == 1.0
    assert wsd_lr_at(95, **kw) == pytest.approx(0.775)
    assert wsd_lr_at(100, **kw) == pytest.approx(0.55)
    assert wsd_lr_at(110, **kw) == pytest.approx(0.1) and wsd_lr_at(111, **kw) == 0.1
    # no decay: stable to the end, then min_lr; decay over the whole rest: the linear schedule
    assert wsd_lr_at(109, **dict(KW, decay_steps=0)) == 1.0 and wsd_lr_at(110, **dict(KW, decay_steps=0)) == 0.1
    assert [wsd_lr_at(s, **KW, decay_steps=100) for s in range(120)] == pytest.approx(
        [linear_lr_at(s, **KW) for s in range(120)])


# --------------------------------------------------------------------------- #
# LambdaLR
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name,extra", [("cosine", {}), ("linear", {}), ("wsd", {"decay_steps": 30})])
def test_scheduler_drives_the_optimizer_through_the_schedule(name, extra):
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, total_steps=100, warmup_start_lr=6e-6, **extra)
    opt = _sgd(lr=123.0)  # scheduler() sets it to max_lr
    lrs = _drive(scheduler(opt, name, **kw), opt, 120)
    assert lrs == pytest.approx([SCHEDULES[name](s, **kw) for s in range(120)], rel=1e-12)


def test_lr_lambda_is_the_factor_for_a_hand_built_lambda_lr():
    kw = dict(max_lr=2e-3, min_lr=2e-4, warmup_steps=5, total_steps=50)
    factor = lr_lambda("cosine", **kw)
    assert factor(5) == 1.0 and factor(0) == 0.0 and factor(50) == pytest.approx(0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2e-3)
    lrs = _drive(torch.optim.lr_scheduler.LambdaLR(opt, factor), opt, 60)
    assert lrs == pytest.approx([lr_at(s, **kw) for s in range(60)], rel=1e-12)


def test_scheduler_state_resumes_and_loads_with_weights_only():
    kw = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=5, total_steps=40)
    opt = _sgd()
    sched = scheduler(opt, **kw)
    _drive(sched, opt, 17)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)  # as a checkpoint does
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # the lambda itself is not stored
    opt2 = _sgd()
    sched2 = scheduler(opt2, **kw)
    opt2.load_state_dict(state["optimizer"])  # the current lr lives in the optimizer's param groups
    sched2.load_state_dict(state["scheduler"])
    assert _drive(sched2, opt2, 10) == pytest.approx(_drive(sched, opt, 10), rel=1e-12)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("change,match", [
    (dict(warmup_steps=200), "warmup_steps"),
    (dict(min_lr=2.0), "min_lr"),
    (dict(max_lr=0.0), "max_lr"),
    (dict(max_lr=-1.0), "max_lr"),
    (dict(max_lr=float("nan")), "max_lr"),
    (dict(min_lr=-0.1), "min_lr"),
    (dict(min_lr=float("inf")), "min_lr"),
    (dict(warmup_start_lr=1.5), "warmup_start_lr"),
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
])
def test_bad_schedule_arguments_name_the_argument(change, match):
    for fn in (lr_at, linear_lr_at):
        with pytest.raises(ValueError, match=match):
            fn(0, **dict(KW, **change))
    with pytest.raises(ValueError, match=match):
        lr_lambda("cosine", **dict(KW, **change))  # checked when the factor is made, not at the first step


def test_bad_steps_and_types():
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, **KW)
    with pytest.raises(TypeError, match="step"):
        lr_at(1.5, **KW)
    with pytest.raises(TypeError, match="total_steps"):
        lr_at(0, **dict(KW, total_steps=100.0))
    with pytest.raises(TypeError, match="max_lr"):
        lr_at(0, **dict(KW, max_lr="6e-4"))
    with pytest.raises(TypeError, match="max_lr"):
        lr_at(0, **dict(KW, max_lr=True))


def test_bad_wsd_decay_and_schedule_name():
    with pytest.raises(ValueError, match="decay_steps"):
        wsd_lr_at(0, **KW, decay_steps=101)  # only 100 steps after warmup
    with pytest.raises(ValueError, match="decay_steps"):
        wsd_lr_at(0, **KW, decay_steps=-1)
    with pytest.raises(ValueError, match="decay_steps"):
        scheduler(_sgd(), "wsd", **KW, decay_steps=500)
    with pytest.raises(ValueError, match="schedule.*'cosine'"):
        lr_lambda("cosin", **KW)
    with pytest.raises(TypeError, match="decay_steps"):
        lr_lambda("wsd", **KW)  # missing
    with pytest.raises(TypeError, match="optimizer"):
        scheduler("adam", **KW)


def test_a_rate_too_large_for_a_float_and_a_schedule_that_is_not_a_name_are_value_errors():
    with pytest.raises(ValueError, match="max_lr must be a finite number"):  # not float()'s OverflowError
        lr_at(0, **dict(KW, max_lr=10**400))
    with pytest.raises(ValueError, match="min_lr must be a finite number"):
        lr_at(0, **dict(KW, min_lr=-(10**400)))
    with pytest.raises(ValueError, match="schedule must be one of 'cosine'"):  # not "unhashable type: 'list'"
        lr_lambda(["cosine"], **KW)
    with pytest.raises(ValueError, match="schedule must be one of"):
        scheduler(_sgd(), {"name": "cosine"}, **KW)
