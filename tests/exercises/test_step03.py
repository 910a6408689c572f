"""Checks for step 3's exercises (``course check 3``). ``ex`` is the module being checked."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F


def _show(t: torch.Tensor) -> str:
    return str(t.detach().double().numpy().round(4).tolist()) if t.numel() <= 16 else f"tensor of shape {tuple(t.shape)}"


# --------------------------------------------------------------------------- #
@pytest.mark.exercise("attention_weights_for_query")
def test_weights_for_query_by_hand(ex):
    q = torch.tensor([1.0, 0.0])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = math.exp(1 / math.sqrt(2))
    want = torch.tensor([a / (a + 1), 1 / (a + 1)])
    got = ex.attention_weights_for_query(q, keys)
    assert isinstance(got, torch.Tensor) and got.shape == (2,), \
        f"expected a tensor of shape (2,), got {getattr(got, 'shape', type(got))}"
    assert torch.allclose(got, want, atol=1e-5), (
        f"query [1, 0], keys [[1, 0], [0, 1]]: expected {_show(want)}, got {_show(got)}. "
        "Hint: scores = keys @ query, divided by sqrt(d) = sqrt(2), then torch.softmax(..., dim=-1).")


@pytest.mark.exercise("attention_weights_for_query")
def test_weights_for_query_random(ex):
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(16, generator=g), torch.randn(7, 16, generator=g)
    scores = [float(q @ keys[j]) / 4.0 for j in range(7)]  # sqrt(16) = 4
    exps = [math.exp(s) for s in scores]
    want = torch.tensor([e / sum(exps) for e in exps])
    got = ex.attention_weights_for_query(q, keys)
    assert got.shape == (7,), f"7 keys should give 7 weights, got shape {tuple(got.shape)}"
    assert torch.allclose(got.sum(), torch.tensor(1.0), atol=1e-5), f"weights must sum to 1, got {float(got.sum()):.4f}"
    assert torch.allclose(got, want, atol=1e-5), (
        f"expected {_show(want)}, got {_show(got)}. Hint: did you divide by sqrt(d) (here 4)?")


# --------------------------------------------------------------------------- #
@pytest.mark.exercise("causal_mask")
def test_causal_mask_small(ex):
    got = ex.causal_mask(3)
    want = [[False, True, True], [False, False, True], [False, False, False]]
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool, \
        f"expected a boolean tensor, got {getattr(got, 'dtype', type(got))}. Hint: dtype=torch.bool or (... > 0)"
    assert got.tolist() == want, (f"causal_mask(3): expected {want}, got {got.tolist()}. "
                                  "Hint: True marks the future (column j > row i): torch.triu(..., diagonal=1).")


@pytest.mark.exercise("causal_mask")
@pytest.mark.parametrize("n", [1, 5, 17])
def test_causal_mask_sizes(ex, n):
    got = ex.causal_mask(n)
    want = ~torch.tril(torch.ones(n, n, dtype=torch.bool))
    assert tuple(got.shape) == (n, n), f"causal_mask({n}) should be {n}x{n}, got {tuple(got.shape)}"
    assert torch.equal(got.bool(), want), f"causal_mask({n}) is True somewhere other than above the diagonal"


# --------------------------------------------------------------------------- #
@pytest.mark.exercise("causal_softmax")
def test_causal_softmax_by_hand(ex):
    scores = torch.zeros(3, 3)
    want = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])
    got = ex.causal_softmax(scores)
    assert torch.allclose(got, want, atol=1e-6), (
        f"all-zero 3x3 scores: expected {_show(want)}, got {_show(got)}. Hint: row i spreads its weight "
        "evenly over keys 0..i; set the future to -inf BEFORE the softmax (masking after it leaves rows "
        "that do not sum to 1).")


@pytest.mark.exercise("causal_softmax")
def test_causal_softmax_batched(ex):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 6, 6, generator=g)
    got = ex.causal_softmax(scores)
    assert got.shape == scores.shape, f"expected shape {tuple(scores.shape)}, got {tuple(got.shape)}"
    for i in range(6):  # row i: a softmax over the first i+1 scores, zeros after
        want = torch.softmax(scores[..., i, : i + 1], dim=-1)
        assert torch.allclose(got[..., i, : i + 1], want, atol=1e-6), f"row {i} is not a softmax over keys 0..{i}"
        assert (got[..., i, i + 1:] == 0).all(), f"row {i} gives weight to later keys"


# --------------------------------------------------------------------------- #
@pytest.mark.exercise("split_heads")
def test_split_heads_columns(ex):
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    got = ex.split_heads(x, 4)
    assert tuple(got.shape) == (2, 4, 3, 2), (f"[2, 3, 8] into 4 heads: expected shape (2, 4, 3, 2), got "
                                             f"{tuple(got.shape)}. Hint: view to [B, T, H, D], then transpose(1, 2).")
    for h in range(4):
        assert torch.equal(got[:, h], x[:, :, 2 * h: 2 * h + 2]), (
            f"head {h} should hold columns {2 * h}:{2 * h + 2} of x; got {_show(got[0, h])}, expected "
            f"{_show(x[0, :, 2 * h: 2 * h + 2])}. Hint: view(B, T, H, D) then transpose, not view(B, H, T, D).")


@pytest.mark.exercise("split_heads")
def test_split_heads_not_divisible(ex):
    with pytest.raises(ValueError):
        ex.split_heads(torch.zeros(1, 2, 10), 4)


@pytest.mark.exercise("merge_heads")
def test_merge_heads_inverts_split(ex):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 12, generator=g)
    heads = x.view(2, 5, 3, 4).permute(0, 2, 1, 3)  # the reference split
    got = ex.merge_heads(heads)
    assert tuple(got.shape) == (2, 5, 12), f"[2, 3, 5, 4] merged: expected shape (2, 5, 12), got {tuple(got.shape)}"
    assert torch.equal(got, x), ("merging the heads did not give back the original columns. Hint: transpose(1, 2) "
                                 "first, then .contiguous().view(B, T, H * D) (or .reshape).")


@pytest.mark.exercise("merge_heads")
def test_merge_heads_on_contiguous_heads(ex):
    # attention's output (weights @ v) is a fresh, contiguous [B, H, T, D] tensor: after transpose(1, 2) its
    # memory is no longer in [B, T, H, D] order, so a plain .view cannot merge it
    g = torch.Generator().manual_seed(3)
    heads = torch.randn(2, 3, 5, 4, generator=g)  # [B, H, T, D], contiguous
    want = heads.permute(0, 2, 1, 3).reshape(2, 5, 12)
    try:
        got = ex.merge_heads(heads)
    except NotImplementedError:  # a subclass of RuntimeError: the stub is "not started", not a .view bug
        raise
    except RuntimeError as err:
        pytest.fail("merge_heads raised on a contiguous [2, 3, 5, 4] tensor (as attention produces): "
                    f"{str(err).rstrip('.')}. Hint: after transpose(1, 2) the memory is not laid out as "
                    "[B, T, H, D], so .view cannot reshape it; call .contiguous() before .view, or use .reshape "
                    "(which copies when it must).",
                    pytrace=False)
    assert tuple(got.shape) == (2, 5, 12), f"expected shape (2, 5, 12), got {tuple(got.shape)}"
    assert torch.equal(got, want), ("merged heads are in the wrong order: row t must hold head 0's D numbers for "
                                    "token t, then head 1's, ... Hint: transpose(1, 2) (to [B, T, H, D]) before "
                                    "merging the last two axes.")


# --------------------------------------------------------------------------- #
@pytest.mark.exercise("causal_attention")
@pytest.mark.parametrize("shape", [(1, 1, 4, 2), (2, 3, 9, 8)])
def test_causal_attention_equals_sdpa(ex, shape):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = ex.causal_attention(q, k, v)
    assert tuple(got.shape) == shape, f"expected shape {shape}, got {tuple(got.shape)}"
    err = float((got - want).abs().max())
    assert err < 1e-5, (f"differs from scaled_dot_product_attention(is_causal=True) by up to {err:.3g}. "
                        "Hint: scale by 1/sqrt(D) with D = q.shape[-1], mask the future with -inf before the "
                        "softmax over the last dimension, then multiply by v.")
