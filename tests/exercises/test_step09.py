"""Checks for step 9's exercises (``course check 9``). ``ex`` is the module being checked.

The references are values worked out by hand, ``torch.nn.functional.linear`` on the merged
weight, and the library's own versions (``course_lib.lora.LoRALinear``, ``add_lora``,
``merge_lora`` and the tensors ``save_adapter`` writes), which ``tests/test_lora.py`` and
``tests/test_lora_peft.py`` check against hand computations and ``peft``.
No network; files only under ``tmp_path``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.config import GPTConfig
from course_lib.lora import LoRALinear, add_lora, lora_layers, merge_lora, save_adapter
from course_lib.model import GPTModel
from _expect import as_float, as_tensor

CFG = GPTConfig(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)




def _layer(n_in=12, n_out=10, rank=3, alpha=6.0, bias=True):
    """A LoRALinear with a non-zero B (a fresh one is the base layer, which would prove nothing)."""
    layer = LoRALinear(nn.Linear(n_in, n_out, bias=bias), rank, alpha)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    return layer


# --------------------------------------------------------------------------- #
# lora_scale
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("lora_scale")
def test_scale_by_hand(ex):
    for args, want in (((8, 16), 2.0), ((16, 16), 1.0), ((1, 8), 8.0), ((4, 8, True), 4.0), ((16, 32, True), 8.0)):
        got = as_float(ex.lora_scale(*args), f"lora_scale{args}")
        assert abs(got - want) < 1e-12, (
            f"lora_scale{args}: expected {want}, got {got}. Hint: alpha / rank, or alpha / sqrt(rank) when rslora "
            "is True" + (" (did you divide by rank with rslora?)" if len(args) == 3 and abs(got - args[1] / args[0])
                         < 1e-12 else "."))


@pytest.mark.exercise("lora_scale")
@pytest.mark.parametrize("rslora", [False, True])
def test_scale_equals_the_librarys(ex, rslora):
    for rank in (1, 2, 3, 8, 64):
        for alpha in (1, 7.5, 32):
            want = LoRALinear(nn.Linear(4, 4), rank, alpha, rslora=rslora).scale["default"]
            got = as_float(ex.lora_scale(rank, alpha, rslora), f"lora_scale({rank}, {alpha}, rslora={rslora})")
            assert abs(got - want) < 1e-12, f"lora_scale({rank}, {alpha}, rslora={rslora}): expected {want}, got {got}"


# --------------------------------------------------------------------------- #
# lora_forward
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("lora_forward")
@pytest.mark.parametrize("shape, bias", [((5, 12), True), ((2, 7, 12), True), ((2, 3, 4, 12), False)])
def test_forward_equals_the_librarys(ex, shape, bias):
    layer = _layer(bias=bias)
    x = torch.randn(shape)
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    got = as_tensor(ex.lora_forward(x, layer.base.weight.detach(), None if not bias else layer.base.bias.detach(), A, B,
                                  layer.scale["default"]), (*shape[:-1], 10), f"lora_forward on x {list(shape)}")
    with torch.no_grad():
        want = layer(x)
        plain = layer.base(x)
    assert not torch.allclose(got, plain, atol=1e-4), (
        "your output equals the base layer's alone: the adapter's part scale * (x A^T) B^T is missing")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: (
        f"lora_forward differs from course_lib.lora.LoRALinear with the same W, b, A, B and scale:\n{m}\nHint: "
        "x A^T is [..., r], then times B^T gives [..., out]; multiply by scale once."))


@pytest.mark.exercise("lora_forward")
def test_forward_equals_the_merged_linear(ex):
    W, b = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    A, B = torch.randn(2, 9, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    x = torch.randn(4, 9, dtype=torch.float64)
    got = as_tensor(ex.lora_forward(x, W, b, A, B, 0.5), (4, 6), "lora_forward")
    torch.testing.assert_close(got, F.linear(x, W + 0.5 * B @ A, b), msg=lambda m: (
        f"lora_forward must equal F.linear(x, W + scale * B @ A, b) (in float64, to rounding):\n{m}"))


# --------------------------------------------------------------------------- #
# lora_parameter_count
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("lora_parameter_count")
def test_count_by_hand(ex):
    cfg = GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=False)
    got = ex.lora_parameter_count(cfg, 8, ["W_query", "W_key", "W_value", "out_proj"])
    assert isinstance(got, int) and not isinstance(got, bool), f"expected an int, got {type(got).__name__}: {got!r}"
    assert got == 8192, (f"d=64, 2 blocks, rank 8 on the four attention projections: 2 * 4 * 8 * (64 + 64) = 8,192 "
                         f"trainable parameters, got {got:,}. Hint: each adapted layer holds A [r, in] and B [out, r].")


@pytest.mark.exercise("lora_parameter_count")
@pytest.mark.parametrize("rank, targets", [
    (1, ["W_value"]),
    (4, ["W_query", "W_value"]),
    (8, ["W_query", "W_key", "W_value", "out_proj"]),
    (3, ["ff.layers.0"]),
    (2, ["ff.layers.0", "ff.layers.2", "out_proj"]),
    (5, ["out_head"]),
    (2, ["W_key", "ff.layers.2", "out_head"]),
])
def test_count_equals_add_lora(ex, rank, targets):
    want = add_lora(GPTModel(CFG), rank, 2 * rank, targets).trainable
    got = ex.lora_parameter_count(CFG, rank, list(targets))
    hint = ""
    if "ff.layers.0" in targets or "ff.layers.2" in targets:
        hint = " Hint: the feed-forward layers are d -> 4d and 4d -> d."
    if "out_head" in targets:
        hint += " The head is d -> vocab_size, and there is one head, not one per block."
    assert got == want, (f"d={CFG.emb_dim}, {CFG.n_layers} blocks, vocab {CFG.vocab_size}, rank {rank}, targets "
                         f"{targets}: add_lora trains {want:,} parameters, you counted {got!r}.{hint}")


# --------------------------------------------------------------------------- #
# merge_weight
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("merge_weight")
def test_merge_equals_merge_lora(ex):
    layer = _layer()
    W = layer.base.weight.detach().clone()
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    got = as_tensor(ex.merge_weight(W, A, B, layer.scale["default"]), W.shape, "merge_weight")
    assert torch.equal(W, layer.base.weight), "merge_weight changed the weight it was given; return a new tensor"
    merge_lora(layer)
    torch.testing.assert_close(got, layer.base.weight.detach(), atol=1e-6, rtol=1e-6, msg=lambda m: (
        f"merge_weight differs from the weight merge_lora writes, W + scale * B @ A:\n{m}\nHint: B @ A is "
        "[out, in], the shape of W (A @ B would be [r, r])."))


@pytest.mark.exercise("merge_weight")
def test_merged_layer_gives_the_adapted_output(ex):
    layer = _layer(bias=True)
    x = torch.randn(3, 12)
    with torch.no_grad():
        want = layer(x)
        merged = ex.merge_weight(layer.base.weight.detach(), layer.lora_A["default"], layer.lora_B["default"],
                                 layer.scale["default"])
        got = F.linear(x, as_tensor(merged, (10, 12), "merge_weight"), layer.base.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: (
        f"the merged layer F.linear(x, W_merged, b) must give the adapted layer's output:\n{m}"))


# --------------------------------------------------------------------------- #
# fuse_qkv
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("fuse_qkv")
@pytest.mark.parametrize("ranks", [(2, 2, 2), (1, 3, 2)])
def test_fused_product_is_each_parts_update(ex, ranks):
    d = 6
    As = [torch.randn(r, d, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(d, r, dtype=torch.float64) for r in ranks]
    out = ex.fuse_qkv(As[0], Bs[0], As[1], Bs[1], As[2], Bs[2])
    assert isinstance(out, tuple) and len(out) == 2, f"fuse_qkv must return a pair (A_c, B_c), got {type(out).__name__}"
    R = sum(ranks)
    A_c = as_tensor(out[0], (R, d), "A_c")
    B_c = as_tensor(out[1], (3 * d, R), "B_c")
    want = torch.cat([B @ A for A, B in zip(As, Bs)])                      # [3d, d]: q's update, then k's, then v's
    torch.testing.assert_close(B_c @ A_c, want, msg=lambda m: (
        f"B_c @ A_c must be [B_q A_q; B_k A_k; B_v A_v] stacked (ranks {ranks}):\n{m}\nHint: B_k goes in rows d:2d "
        "and in the columns right after B_q's r_q columns; everything off the three blocks is zero."))
    assert A_c.dtype == torch.float64, f"A_c must keep the dtype of A_q (float64 here), got {A_c.dtype}"
    assert B_c.dtype == torch.float64, f"B_c must keep the dtype of A_q (float64 here), got {B_c.dtype}"


@pytest.mark.exercise("fuse_qkv")
def test_fused_tensors_are_what_save_adapter_writes(ex, tmp_path):
    from safetensors.torch import load_file

    model = GPTModel(CFG).eval()
    add_lora(model, rank=3, alpha=6, targets=["W_query", "W_key", "W_value"])
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B["default"].normal_()
    save_adapter(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    att = model.trf_blocks[1].att
    parts = [(getattr(att, p).lora_A["default"].detach(), getattr(att, p).lora_B["default"].detach())
             for p in ("W_query", "W_key", "W_value")]
    A_c, B_c = ex.fuse_qkv(*parts[0], *parts[1], *parts[2])
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_{}.weight"
    torch.testing.assert_close(as_tensor(A_c, saved[key.format("A")].shape, "A_c"), saved[key.format("A")],
                               msg=lambda m: f"A_c differs from the lora_A that save_adapter writes for c_attn:\n{m}")
    torch.testing.assert_close(as_tensor(B_c, saved[key.format("B")].shape, "B_c"), saved[key.format("B")],
                               msg=lambda m: f"B_c differs from the lora_B that save_adapter writes for c_attn:\n{m}")
