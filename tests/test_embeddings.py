"""Token and position embeddings (course_lib.embeddings) against torch's own modules and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from course_lib.embeddings import GPTEmbedding, one_hot_embedding, sinusoidal_positions


# --------------------------------------------------------------------------- #
# One-hot product == lookup
# --------------------------------------------------------------------------- #
def test_one_hot_product_equals_nn_embedding_lookup():
    torch.manual_seed(0)
    emb = nn.Embedding(11, 5)
    ids = torch.tensor([[3, 0, 10], [7, 7, 1]])
    got = one_hot_embedding(ids, emb.weight)
    assert got.shape == (2, 3, 5)
    torch.testing.assert_close(got, emb(ids), rtol=0, atol=0)
    # By hand: one row, selected explicitly.
    torch.testing.assert_close(got[1, 0], emb.weight[7], rtol=0, atol=0)
    # Gradients flow to exactly the rows used, in both forms.
    one_hot_embedding(ids, emb.weight).sum().backward()
    g1 = emb.weight.grad.clone()
    emb.weight.grad = None
    emb(ids).sum().backward()
    torch.testing.assert_close(g1, emb.weight.grad)
    assert g1[7].eq(2).all() and g1[2].eq(0).all()


def test_one_hot_errors():
    w = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        one_hot_embedding(torch.tensor([1, 4]), w)
    with pytest.raises(TypeError, match="integer"):
        one_hot_embedding(torch.tensor([1.0]), w)
    with pytest.raises(ValueError, match="vocab_size, emb_dim"):
        one_hot_embedding(torch.tensor([1]), torch.zeros(4))


# --------------------------------------------------------------------------- #
# Sinusoidal positions
# --------------------------------------------------------------------------- #
def test_sinusoidal_values_at_hand_computed_points():
    pe = sinusoidal_positions(50, 8)
    assert pe.shape == (50, 8) and pe.dtype == torch.float32
    # Row 0: sin(0) = 0 in even columns, cos(0) = 1 in odd ones.
    assert pe[0].tolist() == [0.0, 1.0] * 4
    # pos 1, i = 0: frequency 1 -> sin(1), cos(1).
    assert pe[1, 0].item() == pytest.approx(0.8414709848, abs=1e-7)
    assert pe[1, 1].item() == pytest.approx(0.5403023059, abs=1e-7)
    # pos 2, columns 2 and 3 (i = 1): angle = 2 / 10000^(2/8) = 2 / 10 = 0.2.
    assert pe[2, 2].item() == pytest.approx(0.1986693308, abs=1e-7)
    assert pe[2, 3].item() == pytest.approx(0.9800665778, abs=1e-7)
    # pos 10, columns 6 and 7 (i = 3): angle = 10 / 10000^(6/8) = 10 / 1000 = 0.01.
    assert pe[10, 6].item() == pytest.approx(0.0099998333, abs=1e-7)
    assert pe[10, 7].item() == pytest.approx(0.9999500004, abs=1e-7)


def test_sinusoidal_against_the_paper_formula_element_by_element():
    T, D = 17, 12
    pe = sinusoidal_positions(T, D)
    for pos in range(T):
        for col in range(D):
            i = col // 2
            angle = pos / 10000 ** (2 * i / D)
            expected = math.sin(angle) if col % 2 == 0 else math.cos(angle)
            assert pe[pos, col].item() == pytest.approx(expected, abs=1e-6)


def test_sinusoidal_odd_width_and_base():
    pe = sinusoidal_positions(4, 5)
    assert pe.shape == (4, 5)
    assert pe[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-7)  # last column is a sine
    pe100 = sinusoidal_positions(4, 4, base=100.0)
    assert pe100[3, 2].item() == pytest.approx(math.sin(3 / 100 ** 0.5), abs=1e-7)


def test_sinusoidal_errors():
    with pytest.raises(ValueError, match="context_length"):
        sinusoidal_positions(0, 4)
    with pytest.raises(ValueError, match="emb_dim"):
        sinusoidal_positions(4, -1)
    with pytest.raises(ValueError, match="base"):
        sinusoidal_positions(4, 4, base=1)


# --------------------------------------------------------------------------- #
# GPTEmbedding
# --------------------------------------------------------------------------- #
def test_gpt_embedding_shape_and_value_equal_token_plus_position_rows():
    torch.manual_seed(0)
    layer = GPTEmbedding(vocab_size=100, emb_dim=16, context_length=8)
    ids = torch.randint(0, 100, (3, 5))
    out = layer(ids)
    assert out.shape == (3, 5, 16)
    # Built independently from two plain nn.Embedding modules holding the same weights.
    tok, pos = nn.Embedding(100, 16), nn.Embedding(8, 16)
    tok.weight.data.copy_(layer.tok_emb.weight)
    pos.weight.data.copy_(layer.pos_emb.weight)
    torch.testing.assert_close(out, tok(ids) + pos(torch.arange(5)).unsqueeze(0))
    # Element by element for one entry.
    torch.testing.assert_close(out[2, 4], layer.tok_emb.weight[ids[2, 4]] + layer.pos_emb.weight[4])
    assert sum(p.numel() for p in layer.parameters()) == 100 * 16 + 8 * 16


def test_gpt_embedding_init_is_gpt2s_and_same_token_at_two_positions_differs():
    torch.manual_seed(0)
    layer = GPTEmbedding(vocab_size=5000, emb_dim=64, context_length=64)
    assert layer.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    out = layer(torch.tensor([[42, 42]]))
    assert not torch.allclose(out[0, 0], out[0, 1])


def test_gpt_embedding_dropout_only_in_training():
    torch.manual_seed(0)
    layer = GPTEmbedding(50, 8, 4, dropout=0.5)
    ids = torch.tensor([[1, 2, 3, 4]])
    layer.eval()
    torch.testing.assert_close(layer(ids), layer(ids))
    layer.train()
    out = layer(ids)
    assert (out == 0).any()


def test_gpt_embedding_errors():
    layer = GPTEmbedding(10, 4, context_length=3)
    with pytest.raises(ValueError, match="context_length is 3"):
        layer(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"id 10, outside \[0, 10\)"):
        layer(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="id -1"):
        layer(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        layer(torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        layer(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1, 2]])
    for kwargs in ({"vocab_size": 0}, {"emb_dim": 2.5}, {"context_length": -1}, {"dropout": 1.0}):
        args = {"vocab_size": 10, "emb_dim": 4, "context_length": 3} | kwargs
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            GPTEmbedding(**args)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_small_integer_id_dtypes_are_refused_with_the_fix(dtype):
    # nn.Embedding itself only says "Expected ... Long, Int"; uint8 ids also wrap at 256.
    layer = GPTEmbedding(10, 4, context_length=3)
    with pytest.raises(TypeError, match=rf"got {dtype}; use ids\.long\(\)"):
        layer(torch.tensor([[1, 2]], dtype=dtype))
    with pytest.raises(TypeError, match=rf"got {dtype}"):
        one_hot_embedding(torch.tensor([1], dtype=dtype), torch.randn(10, 4))
    ids = torch.tensor([[1, 2]])
    torch.testing.assert_close(layer(ids.int()), layer(ids))
