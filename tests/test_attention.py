"""course_lib.attention against hand-computed values and against PyTorch's own attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.attention import MultiHeadAttention, causal_mask


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _softmax_list(xs):
    m = max(xs)
    e = [math.exp(v - m) for v in xs]
    return [v / sum(e) for v in e]


def _attend_by_hand(q, k, v, scale, causal):
    """Plain-Python attention over lists of vectors: the independent reference."""
    out = []
    for i, qi in enumerate(q):
        keys = range(i + 1) if causal else range(len(k))
        scores = [sum(a * b for a, b in zip(qi, k[j])) * scale for j in keys]
        w = _softmax_list(scores)
        out.append([sum(w[n] * v[j][d] for n, j in enumerate(keys)) for d in range(len(v[0]))])
    return torch.tensor(out, dtype=torch.float64)


def _identity(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.out_features, linear.in_features, dtype=linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.zero_()


# --------------------------------------------------------------------------- #
# MultiHeadAttention against hand-computed values
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "explicit"])
def test_identity_projections_give_weightless_causal_attention_by_hand(use_sdpa):
    """With W_query = W_key = W_value = out_proj = I and one head, the layer is the notebook's
    weightless attention, scaled by 1/sqrt(d) and causal: numbers worked out on paper."""
    mha = MultiHeadAttention(2, 2, 4, 0.0, 1, use_sdpa=use_sdpa).double()
    for lin in (mha.W_query, mha.W_key, mha.W_value, mha.out_proj):
        _identity(lin)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    s = 1 / math.sqrt(2)
    # token 0 sees only itself; token 1 scores [0, 1]*s; token 2 scores [1, 1, 2]*s
    w1 = torch.tensor([1.0, math.exp(s)], dtype=torch.float64) / (1 + math.exp(s))
    w2 = torch.tensor([math.exp(s), math.exp(s), math.exp(2 * s)], dtype=torch.float64)
    w2 = w2 / w2.sum()
    expected = torch.stack([x[0, 0], w1 @ x[0, :2], w2 @ x[0]])
    torch.testing.assert_close(mha(x)[0], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("d_in,d_out,H,qkv_bias", [(4, 3, 1, False), (5, 6, 2, True), (3, 8, 4, False)])
def test_heads_side_by_side_by_hand(d_in, d_out, H, qkv_bias, use_sdpa):
    """Each head is an independent causal head on its own D = d_out/H rows of the projections
    (what a wrapper of H heads computes); their outputs are concatenated, then out_proj."""
    mha = MultiHeadAttention(d_in, d_out, 8, 0.0, H, qkv_bias=qkv_bias, use_sdpa=use_sdpa).double()
    if qkv_bias:
        with torch.no_grad():
            for lin in (mha.W_query, mha.W_key, mha.W_value):
                lin.bias.normal_()
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    D = d_out // H
    with torch.no_grad():
        out = mha(x)
        for b in range(2):
            heads = []
            for h in range(H):
                rows = slice(h * D, (h + 1) * D)
                q, k, v = (F.linear(x[b], lin.weight[rows], None if lin.bias is None else lin.bias[rows]).tolist()
                           for lin in (mha.W_query, mha.W_key, mha.W_value))
                heads.append(_attend_by_hand(q, k, v, 1 / math.sqrt(D), causal=True))
            expected = torch.cat(heads, dim=-1) @ mha.out_proj.weight.T + mha.out_proj.bias
            torch.testing.assert_close(out[b], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "explicit"])
def test_weights_rows_sum_to_one(use_sdpa):
    """Values all equal to one vector c: every output is (sum of the row's weights) * c, so it is c
    exactly when each row of weights sums to 1 -- the future included at weight 0, even when its
    scores are huge, and with dropout configured but the layer in eval()."""
    mha = MultiHeadAttention(6, 6, 10, 0.5, 3, qkv_bias=True, use_sdpa=use_sdpa).double().eval()
    c = torch.randn(6, dtype=torch.float64)
    with torch.no_grad():
        mha.W_value.weight.zero_()
        mha.W_value.bias.copy_(c)
        mha.W_query.weight.mul_(50.0)                     # large scores: a softmax that is nearly one-hot
    _identity(mha.out_proj)
    x = torch.randn(4, 10, 6, dtype=torch.float64)
    with torch.no_grad():
        out = mha(x)
    torch.testing.assert_close(out, c.expand_as(out), atol=1e-12, rtol=0)


def test_causal_mask_shape_and_values():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert m.tolist() == [[j > i for j in range(4)] for i in range(4)]
    assert causal_mask(1).tolist() == [[False]]
    with pytest.raises(ValueError, match="context_length must be a positive integer"):
        causal_mask(0)


# --------------------------------------------------------------------------- #
# MultiHeadAttention against torch.nn.MultiheadAttention
# --------------------------------------------------------------------------- #
def _twin(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    """torch's module holding the same numbers as ours (needs d_in == d_out)."""
    ref = nn.MultiheadAttention(mha.d_out, mha.num_heads, dropout=0.0, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.W_query.weight, mha.W_key.weight, mha.W_value.weight]))
        if mha.W_query.bias is not None:
            ref.in_proj_bias.copy_(torch.cat([mha.W_query.bias, mha.W_key.bias, mha.W_value.bias]))
        else:
            ref.in_proj_bias.zero_()
        ref.out_proj.weight.copy_(mha.out_proj.weight)
        ref.out_proj.bias.copy_(mha.out_proj.bias)
    return ref


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("T", [12, 5])  # full context and shorter
def test_against_torch_multihead_forward_and_backward(use_sdpa, qkv_bias, T):
    d, H, ctx = 32, 4, 12
    ours = MultiHeadAttention(d, d, ctx, 0.0, H, qkv_bias=qkv_bias, use_sdpa=use_sdpa)
    if qkv_bias:  # make the biases non-zero so they matter
        with torch.no_grad():
            for lin in (ours.W_query, ours.W_key, ours.W_value):
                lin.bias.normal_()
    ref = _twin(ours)
    x1 = torch.randn(3, T, d, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    out_ours = ours(x1)
    out_ref, _ = ref(x2, x2, x2, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=0)

    grad_out = torch.randn_like(out_ref)
    out_ours.backward(grad_out)
    out_ref.backward(grad_out)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=0)
    d_in = ours.d_out
    ref_w = ref.in_proj_weight.grad
    for i, lin in enumerate((ours.W_query, ours.W_key, ours.W_value)):
        torch.testing.assert_close(lin.weight.grad, ref_w[i * d_in:(i + 1) * d_in], atol=1e-5, rtol=0)
        if qkv_bias:
            torch.testing.assert_close(lin.bias.grad, ref.in_proj_bias.grad[i * d_in:(i + 1) * d_in],
                                       atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.out_proj.weight.grad, ref.out_proj.weight.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.out_proj.bias.grad, ref.out_proj.bias.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("d_in,d_out,H", [(16, 16, 1), (16, 24, 3), (20, 64, 8)])
def test_explicit_path_equals_sdpa_path(d_in, d_out, H):
    mha = MultiHeadAttention(d_in, d_out, 32, 0.0, H, qkv_bias=True)
    x = torch.randn(2, 32, d_in, requires_grad=True)
    out_sdpa = mha(x)
    g_sdpa = torch.autograd.grad(out_sdpa.sum(), x)[0]
    mha.use_sdpa = False
    out_exp = mha(x)
    g_exp = torch.autograd.grad(out_exp.sum(), x)[0]
    assert out_sdpa.shape == (2, 32, d_out)
    torch.testing.assert_close(out_exp, out_sdpa, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_exp, g_sdpa, atol=1e-5, rtol=0)
    # dropout configured but the module in eval(): still equal
    mha_d = MultiHeadAttention(d_in, d_out, 32, 0.5, H, qkv_bias=True).eval()
    mha_d.load_state_dict(mha.state_dict())
    with torch.no_grad():
        a = mha_d(x)
        mha_d.use_sdpa = False
        b = mha_d(x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, out_sdpa.detach(), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- #
# Causality, shorter sequences, dropout
# --------------------------------------------------------------------------- #
CAUSAL_MODULES = {
    "mha-sdpa": lambda: MultiHeadAttention(8, 8, 10, 0.0, 2, use_sdpa=True),
    "mha-explicit": lambda: MultiHeadAttention(8, 8, 10, 0.0, 2, use_sdpa=False),
}


@pytest.mark.parametrize("name", list(CAUSAL_MODULES))
def test_causality_by_perturbation(name):
    m = CAUSAL_MODULES[name]()
    x = torch.randn(2, 10, 8)
    base = m(x)
    for t in range(9):
        y = x.clone()
        y[:, t + 1:] = torch.randn_like(y[:, t + 1:]) * 10
        out = m(y)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:]), "later positions should change"


@pytest.mark.parametrize("name", list(CAUSAL_MODULES))
def test_causality_by_gradients(name):
    m = CAUSAL_MODULES[name]()
    x = torch.randn(1, 10, 8)
    # J[t, :, s, :] = d out[t] / d x[s]
    J = torch.autograd.functional.jacobian(lambda z: m(z)[0], x)[:, :, 0]  # [T, d_out, T, d_in]
    influence = J.abs().sum(dim=(1, 3))                                      # [T, T]
    future = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
    assert influence[future].max() == 0, "an output depends on a later input"
    assert (influence[~future] > 0).all(), "an output ignores an earlier input"


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_shorter_sequence_is_a_prefix(use_sdpa):
    mha = MultiHeadAttention(8, 8, 16, 0.0, 2, use_sdpa=use_sdpa)
    x = torch.randn(2, 16, 8)
    full = mha(x)
    for T in range(1, 16):  # token t's output is the last output of a pass over tokens 0..t
        torch.testing.assert_close(mha(x[:, :T]), full[:, :T], atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_dropout_only_in_training(use_sdpa):
    mha = MultiHeadAttention(8, 8, 16, 0.5, 2, use_sdpa=use_sdpa)
    x = torch.randn(2, 16, 8)
    mha.eval()
    with torch.no_grad():
        a, b = mha(x), mha(x)
    assert torch.equal(a, b), "eval() must be deterministic"
    mha.train()
    with torch.no_grad():
        c, d = mha(x), mha(x)
    assert not torch.allclose(c, d), "train() should apply dropout to the attention weights"
    assert not torch.allclose(c, a)
    # the first token attends only to itself: dropout either drops its single weight or keeps it x2
    mha0 = MultiHeadAttention(8, 8, 16, 0.5, 1, use_sdpa=use_sdpa)
    x0 = torch.randn(200, 1, 8)
    with torch.no_grad():
        v0 = mha0.W_value(x0)
        dropped, kept = mha0.out_proj(0.0 * v0), mha0.out_proj(2.0 * v0)
        out0 = mha0(x0)
    is_dropped = torch.isclose(out0, dropped, atol=1e-6).all(dim=-1).squeeze(1)
    is_kept = torch.isclose(out0, kept, atol=1e-6).all(dim=-1).squeeze(1)
    assert (is_dropped | is_kept).all(), "with one key, dropout must give weight 0 or 1/(1-p)"
    assert 60 < int(is_dropped.sum()) < 140, f"p=0.5 should drop about half, dropped {int(is_dropped.sum())}/200"


def test_mask_is_a_non_persistent_buffer():
    mha = MultiHeadAttention(8, 8, 6, 0.0, 2)
    assert "mask" in dict(mha.named_buffers())
    assert "mask" not in mha.state_dict()
    assert torch.equal(mha.mask, causal_mask(6))
    assert mha.mask.dtype == mha.half().mask.dtype == torch.bool  # .to(dtype) leaves the bool mask alone
    assert set(mha.state_dict()) == {"W_query.weight", "W_key.weight", "W_value.weight",
                                     "out_proj.weight", "out_proj.bias"}


def test_attributes_used_by_the_gpt_model():
    mha = MultiHeadAttention(12, 24, 7, 0.1, 3, qkv_bias=True)
    assert (mha.num_heads, mha.head_dim, mha.d_out, mha.context_length) == (3, 8, 24, 7)
    for name in ("W_query", "W_key", "W_value"):
        lin = getattr(mha, name)
        assert isinstance(lin, nn.Linear) and lin.weight.shape == (24, 12) and lin.bias is not None
    assert isinstance(mha.out_proj, nn.Linear) and mha.out_proj.weight.shape == (24, 24)
    assert mha.out_proj.bias is not None
    assert mha.use_sdpa is True
    assert MultiHeadAttention(12, 24, 7, 0.1, 3).W_query.bias is None


class _ConcatCache:
    """The least a ``kv_cache`` must do for MultiHeadAttention (step 5 has the real one):
    keep the keys and values seen so far and hand them all back."""

    def __init__(self, explicit_mask: bool = False):
        self.k = self.v = None
        self.explicit_mask = explicit_mask

    def update(self, layer, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        S, T = self.k.shape[2], k.shape[2]
        if not self.explicit_mask:
            return self.k, self.v, None                                   # None: the causal mask applies
        visible = torch.arange(S).view(1, S) <= torch.arange(S - T, S).view(T, 1)  # [T, S], True = may look
        return self.k, self.v, visible.expand(k.shape[0], 1, T, S)


@pytest.mark.parametrize("explicit_mask", [False, True], ids=["causal", "given-mask"])
@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "explicit"])
def test_a_kv_cache_gives_the_full_pass_piece_by_piece(use_sdpa, explicit_mask):
    mha = MultiHeadAttention(8, 8, 10, 0.0, 2, use_sdpa=use_sdpa).eval()
    x = torch.randn(2, 9, 8)
    cache = _ConcatCache(explicit_mask)
    with torch.no_grad():
        full = mha(x)
        parts = [mha(x[:, :4], cache), mha(x[:, 4:7], cache), mha(x[:, 7:8], cache), mha(x[:, 8:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="already holds 9 positions, so 2 more tokens would exceed context_length=10"):
        mha(x[:, :2], cache)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_d_out_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"d_out \(10\) must be divisible by num_heads \(4\)"):
        MultiHeadAttention(8, 10, 16, 0.0, 4)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_sequence_longer_than_context(use_sdpa):
    mha = MultiHeadAttention(8, 8, 4, 0.0, 2, use_sdpa=use_sdpa)
    with pytest.raises(ValueError, match="5 tokens but context_length is 4"):
        mha(torch.randn(1, 5, 8))


def test_bad_inputs_and_arguments():
    mha = MultiHeadAttention(8, 8, 4, 0.0, 2)
    with pytest.raises(ValueError, match="d_in=8"):
        mha(torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="unsqueeze"):
        mha(torch.randn(3, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        mha([[0.0] * 8])
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(8, 8, 4, 1.0, 2)
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttention(8, 8, 4, 0.0, 0)
    with pytest.raises(ValueError, match="context_length"):
        MultiHeadAttention(8, 8, 0, 0.0, 2)
    with pytest.raises(ValueError, match="d_in must be a positive integer"):
        MultiHeadAttention(2.5, 4, 4, 0.0, 2)
    with pytest.raises(ValueError, match="d_out must be a positive integer"):
        MultiHeadAttention(4, 0, 4, 0.0, 2)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(8, 8, 4, -0.1, 2)
