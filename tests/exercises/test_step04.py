"""Checks for step 4's exercises (``course check 4``). ``ex`` is the module being checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- #
# layer_norm
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("layer_norm")
def test_layer_norm_small_example_by_hand(ex):
    got = ex.layer_norm(torch.tensor([[1.0, 3.0]]), torch.ones(2), torch.zeros(2), eps=0.0)
    assert torch.allclose(got, torch.tensor([[-1.0, 1.0]]), atol=1e-6), (
        f"layer_norm([[1., 3.]]) with weight 1, bias 0, eps 0: expected [[-1., 1.]], got {got.tolist()}. "
        "Hint: the mean is 2 and the (biased) variance is 1.")


@pytest.mark.exercise("layer_norm")
def test_layer_norm_equals_torch(ex):
    x = torch.randn(2, 5, 16) * 3 + 1
    weight, bias = torch.randn(16), torch.randn(16)
    want = F.layer_norm(x, (16,), weight, bias, eps=1e-5)
    got = ex.layer_norm(x, weight, bias)
    assert got.shape == want.shape, f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
    err = (got - want).abs().max().item()
    hint = ""
    unbiased = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + 1e-5)
    if torch.allclose(got, unbiased * weight + bias, atol=1e-5):
        hint = " You used the unbiased variance (n - 1); layer norm divides by n: use unbiased=False."
    assert err < 1e-5, (f"layer_norm differs from torch.nn.functional.layer_norm by up to {err:.3g}.{hint} "
                        "Hint: normalise over dim=-1 with keepdim=True, then multiply by weight and add bias.")


@pytest.mark.exercise("layer_norm")
def test_layer_norm_uses_eps_inside_the_square_root(ex):
    x = torch.tensor([[0.0, 0.1, 0.2]])
    want = F.layer_norm(x, (3,), torch.ones(3), torch.zeros(3), eps=0.5)
    got = ex.layer_norm(x, torch.ones(3), torch.zeros(3), eps=0.5)
    assert torch.allclose(got, want, atol=1e-6), (
        f"with eps=0.5 expected {want.tolist()}, got {got.tolist()}. "
        "Hint: divide by torch.sqrt(var + eps), adding eps to the variance, not to the standard deviation.")


# --------------------------------------------------------------------------- #
# block_parameter_count
# --------------------------------------------------------------------------- #
def _block_from_torch_layers(d, qkv_bias, hidden):
    return nn.ModuleList([
        nn.LayerNorm(d), nn.Linear(d, d, bias=qkv_bias), nn.Linear(d, d, bias=qkv_bias),
        nn.Linear(d, d, bias=qkv_bias), nn.Linear(d, d), nn.LayerNorm(d),
        nn.Linear(d, hidden), nn.Linear(hidden, d),
    ])


@pytest.mark.exercise("block_parameter_count")
def test_block_parameter_count_gpt2_small(ex):
    got = ex.block_parameter_count(768, qkv_bias=True)
    want = 12 * 768 * 768 + 13 * 768
    assert got == want, (f"a GPT-2 small block (emb_dim=768, qkv_bias=True): expected {want:,}, got {got:,} "
                         f"(off by {got - want:+,}). Hint: 4 attention matrices, 2 feed-forward matrices of "
                         "768 x 3072, and count every bias and both LayerNorms.")


@pytest.mark.exercise("block_parameter_count")
@pytest.mark.parametrize("d,qkv_bias,hidden", [(8, False, None), (12, True, 20), (64, False, 256)])
def test_block_parameter_count_against_torch_layers(ex, d, qkv_bias, hidden):
    want = sum(p.numel() for p in _block_from_torch_layers(d, qkv_bias, 4 * d if hidden is None else hidden)
               .parameters())
    got = ex.block_parameter_count(d, qkv_bias=qkv_bias, hidden_dim=hidden)
    assert got == want, (f"emb_dim={d}, qkv_bias={qkv_bias}, hidden_dim={hidden}: expected {want:,}, got {got:,}. "
                         "Hint: without qkv_bias the query/key/value projections have no bias, but the output "
                         "projection still has one; hidden_dim=None means 4 * emb_dim.")


# --------------------------------------------------------------------------- #
# transformer_block_forward
# --------------------------------------------------------------------------- #
def _parts(d=12, heads=3):
    norm1, norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
    with torch.no_grad():
        for n in (norm1, norm2):
            n.weight.normal_()
            n.bias.normal_()
    mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def attention(h):
        T = h.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        return mha(h, h, h, attn_mask=mask, need_weights=False)[0]

    ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
    return norm1, attention, norm2, ff


@pytest.mark.exercise("transformer_block_forward")
def test_block_forward_equals_pre_norm_with_shortcuts(ex):
    norm1, attention, norm2, ff = _parts()
    x = torch.randn(2, 6, 12)
    with torch.no_grad():
        h = x + attention(norm1(x))
        want = h + ff(norm2(h))
        got = ex.transformer_block_forward(x, norm1, attention, norm2, ff)
        post_norm = norm1(x + attention(x))
        post_norm = norm2(post_norm + ff(post_norm))
    assert got.shape == want.shape, f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
    hint = ""
    if torch.allclose(got, post_norm, atol=1e-5):
        hint = " You normalised after adding (post-norm); GPT-2 normalises each sub-layer's input instead."
    assert torch.allclose(got, want, atol=1e-5), (
        f"the block's output differs from x + attention(norm1(x)), then + ff(norm2(.)) by up to "
        f"{(got - want).abs().max().item():.3g}.{hint} Hint: the shortcut adds the un-normalised x.")


@pytest.mark.exercise("transformer_block_forward")
def test_block_forward_keeps_the_shortcut_and_uses_dropout(ex):
    norm1, attention, norm2, ff = _parts()
    x = torch.randn(1, 4, 12)
    with torch.no_grad():
        got = ex.transformer_block_forward(x, norm1, attention, norm2, ff, dropout=lambda t: torch.zeros_like(t))
    assert torch.allclose(got, x), (
        "with a dropout that zeroes everything the sub-layers add nothing, so the output must equal x "
        "(the shortcut). Hint: apply dropout to each sub-layer's output before adding it to x.")


# --------------------------------------------------------------------------- #
# generate_greedy
# --------------------------------------------------------------------------- #
class NextIsPlusOne(nn.Module):
    """Its most likely next token is always (last token + 1) mod 20; it records what it was fed."""

    def __init__(self):
        super().__init__()
        self.lengths = []
        self.grad_enabled = []

    def forward(self, idx):
        self.lengths.append(idx.shape[1])
        self.grad_enabled.append(torch.is_grad_enabled())
        return F.one_hot((idx + 1) % 20, 20).float()


@pytest.mark.exercise("generate_greedy")
def test_greedy_picks_the_argmax_of_the_last_position(ex):
    prompt = torch.tensor([[1, 2, 3], [7, 8, 9]])
    got = ex.generate_greedy(NextIsPlusOne(), prompt, max_new_tokens=4, context_size=10)
    want = [[1, 2, 3, 4, 5, 6, 7], [7, 8, 9, 10, 11, 12, 13]]
    assert got.tolist() == want, (f"expected {want}, got {got.tolist()}. Hint: use logits[:, -1, :] "
                                  "(the last position) and argmax over the vocabulary, keepdim=True.")
    assert prompt.tolist() == [[1, 2, 3], [7, 8, 9]], "generate_greedy must not change the prompt tensor"


@pytest.mark.exercise("generate_greedy")
def test_greedy_crops_to_the_context_size(ex):
    model = NextIsPlusOne()
    got = ex.generate_greedy(model, torch.tensor([[5, 6]]), max_new_tokens=5, context_size=3)
    assert got.shape == (1, 7), f"expected shape (1, 7), got {tuple(got.shape)}"
    assert model.lengths == [2, 3, 3, 3, 3], (
        f"the model was fed sequences of lengths {model.lengths}; with context_size=3 expected [2, 3, 3, 3, 3]. "
        "Hint: idx[:, -context_size:] before each call.")
    assert not any(model.grad_enabled), (
        "the model ran with gradients switched on; generation trains nothing, so call it inside "
        "`with torch.no_grad():` (saves memory and time)")


@pytest.mark.exercise("generate_greedy")
def test_greedy_on_a_real_network(ex):
    vocab, d = 30, 16
    net = nn.Sequential(nn.Embedding(vocab, d), nn.Linear(d, d), nn.Tanh(), nn.Linear(d, vocab))
    prompt = torch.randint(0, vocab, (3, 4))
    want = prompt
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat([want, net(want[:, -5:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = ex.generate_greedy(net, prompt, max_new_tokens=6, context_size=5)
    assert torch.equal(got, want), f"expected {want.tolist()}, got {got.tolist()}"
