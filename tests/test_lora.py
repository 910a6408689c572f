"""LoRA layers, injection, merging and many adapters on one base (course_lib.lora), on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.classification import GPTClassifier
from course_lib.config import GPTConfig
from course_lib.lora import (LoRALinear, add_lora, adapter_rows, delete_adapter, load_adapter, lora_layers,
                             merge_lora, save_adapter, set_adapter, unload_lora, unmerge_lora)
from course_lib.model import GPTModel

CFG = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG).eval()


def _idx(B=4, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomize(model, name, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.2)


def test_lora_linear_matches_hand_formula_and_init():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6)
    assert layer.lora_A["default"].shape == (3, 6) and layer.lora_B["default"].shape == (5, 3)
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    bound = 1 / math.sqrt(6)                      # kaiming_uniform_(a=sqrt(5)) on fan_in 6, as nn.Linear
    assert layer.lora_A["default"].abs().max() <= bound and layer.lora_A["default"].std() > 0.1 * bound
    assert not any(p.requires_grad for p in base.parameters())
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer(x), base(x))                    # fresh: a no-op
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = F.linear(x, base.weight, base.bias) + (6 / 3) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scale():
    layer = LoRALinear(nn.Linear(4, 4), rank=16, alpha=8, rslora=True)
    assert layer.scale["default"] == pytest.approx(8 / 4)
    assert LoRALinear(nn.Linear(4, 4), rank=16, alpha=8).scale["default"] == pytest.approx(0.5)


def test_fresh_adapter_on_model_is_a_no_op():
    model, idx = _model(), _idx()
    with torch.no_grad():
        before = model(idx)
        summary = add_lora(model, rank=4, alpha=8, targets=("attention", "ff"))
        after = model(idx)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert len(summary.layers) == 2 * 6
    lora = sum(layer.lora_A["default"].numel() + layer.lora_B["default"].numel()
               for layer in lora_layers(model).values())
    assert summary.trainable == lora and summary.total == sum(p.numel() for p in model.parameters())
    assert summary.fraction == pytest.approx(lora / summary.total)


def test_only_adapter_params_get_gradients():
    model = _model()
    add_lora(model, rank=2, alpha=4)
    model(_idx()).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B starts at zero, so A's gradient is zero at first and B's is not (as in the paper)
    layer = model.trf_blocks[0].att.W_query
    assert torch.count_nonzero(layer.lora_B["default"].grad) > 0


def test_classifier_head_stays_trainable():
    clf = GPTClassifier(_model(), num_classes=2)
    summary = add_lora(clf, rank=2, alpha=4)
    clf(_idx()).sum().backward()
    head = clf.gpt.out_head
    assert head.weight.grad is not None and head.bias.grad is not None
    assert clf.gpt.tok_emb.weight.grad is None and clf.gpt.final_norm.weight.grad is None
    assert summary.trainable == sum(p.numel() for p in clf.parameters() if p.requires_grad)


def test_classifier_adapter_saves_and_loads_without_its_head(tmp_path):
    clf = GPTClassifier(_model(), num_classes=2)
    add_lora(clf, rank=2, alpha=4)
    _randomize(clf, "default")
    save_adapter(clf, tmp_path / "ad")
    other = GPTClassifier(_model(), num_classes=2)
    other.load_state_dict({k.replace(".base.", "."): v for k, v in clf.state_dict().items() if "lora_" not in k})
    assert load_adapter(other, tmp_path / "ad")[0] == "gpt.trf_blocks.0.att.W_query"
    with torch.no_grad():
        torch.testing.assert_close(other(_idx()), clf(_idx()), atol=1e-6, rtol=1e-5)
    add_lora(other, rank=2, alpha=4, targets=("head",), name="h")
    assert not other.gpt.out_head.base.weight.requires_grad
    with pytest.raises(ValueError, match="head has a LoRA adapter"):
        save_adapter(other, tmp_path / "h", name="h")


def test_merge_unmerge():
    model, idx = _model(), _idx()
    add_lora(model, rank=4, alpha=8, targets=("attention", "ff"))
    _randomize(model, "default")
    originals = {n: layer.base.weight.clone() for n, layer in lora_layers(model).items()}
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        merged = model(idx)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.trf_blocks[0].att.W_query.base.weight, originals["trf_blocks.0.att.W_query"])
    with pytest.raises(ValueError, match="unmerge_lora"):
        set_adapter(model, None)
    unmerge_lora(model)
    for n, layer in lora_layers(model).items():
        assert torch.equal(layer.base.weight, originals[n]), n
    with torch.no_grad():
        torch.testing.assert_close(model(idx), unmerged, rtol=0, atol=0)
        plain = unload_lora(model)(idx)
    assert not lora_layers(model) and isinstance(model.trf_blocks[0].att.W_query, nn.Linear)
    torch.testing.assert_close(plain, unmerged, atol=1e-5, rtol=1e-5)


def test_mixed_adapter_batch_equals_each_row_alone():
    model, idx = _model(), _idx(B=5)
    add_lora(model, rank=2, alpha=4, name="spam")
    add_lora(model, rank=4, alpha=4, targets=("attention", "ff"), name="instr")
    _randomize(model, "spam", seed=1)
    _randomize(model, "instr", seed=2)
    rows = ["spam", None, "instr", "instr", "spam"]
    with torch.no_grad(), adapter_rows(model, rows):
        mixed = model(idx)
    for i, name in enumerate(rows):
        set_adapter(model, name)
        with torch.no_grad():
            alone = model(idx[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-6, rtol=1e-5)
    assert model.trf_blocks[0].att.W_query.active == "spam"               # the last set_adapter, not the rows
    set_adapter(model, None)
    base_out = model(idx)
    set_adapter(model, "instr")
    assert not torch.allclose(model(idx), base_out)
    with pytest.raises(ValueError, match="per-row"):
        with adapter_rows(model, ["spam", None]):
            model(idx)


def test_swapping_adapters_shares_base_weights():
    model = _model()
    add_lora(model, rank=2, alpha=4, name="a")
    add_lora(model, rank=2, alpha=4, name="b")
    w = model.trf_blocks[0].att.W_query.base.weight
    ptr = w.data_ptr()
    set_adapter(model, "a")
    set_adapter(model, ["a", "b"])
    assert model.trf_blocks[0].att.W_query.base.weight.data_ptr() == ptr
    delete_adapter(model, "a")
    assert "a" not in model.trf_blocks[0].att.W_query.lora_A
    with pytest.raises(ValueError, match=r"unknown adapter 'a'.*\['b'\]"):
        set_adapter(model, "a")


def test_adapter_files_atomic_and_not_overwritten(tmp_path):
    model = _model()
    add_lora(model, rank=2, alpha=4)
    _randomize(model, "default")
    folder = save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    before = (folder / "adapter_model.safetensors").read_bytes()
    _randomize(model, "default", seed=5)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    save_adapter(model, folder, overwrite=True)
    assert (folder / "adapter_model.safetensors").read_bytes() != before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    other = _model()
    load_adapter(other, folder, "x")
    with torch.no_grad():
        torch.testing.assert_close(other(_idx()), model(_idx()), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="already has an adapter named 'x'"):
        load_adapter(other, folder, "x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(other, tmp_path / "nothing", "y")


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"alpha": 0}, "alpha must be a positive number"),
    ({"alpha": -1.0}, "alpha must be a positive number"),
    ({"dropout": 1.0}, "dropout"),
    ({"name": "a.b"}, "adapter name"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        add_lora(_model(), **({"rank": 2, "alpha": 4} | kwargs))


def test_target_matching_nothing_lists_linear_layers():
    with pytest.raises(ValueError, match=r"'c_attn' matches no linear layer.*trf_blocks\.\{i\}\.att\.W_query"):
        add_lora(_model(), targets=("W_query", "c_attn"))
    with pytest.raises(TypeError, match="targets"):
        add_lora(_model(), targets="W_query")
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), 2, 4)


def test_unknown_adapter_names():
    model = _model()
    with pytest.raises(ValueError, match="no LoRA layers"):
        set_adapter(model, "x")
    add_lora(model, rank=2, alpha=4, name="spam")
    for call in (lambda: set_adapter(model, "nope"), lambda: set_adapter(model, ["spam", "nope"]),
                 lambda: delete_adapter(model, "nope"), lambda: save_adapter(model, "unused", name="nope")):
        with pytest.raises(ValueError, match=r"unknown adapter 'nope'.*\['spam'\]"):
            call()
    with pytest.raises(ValueError, match="already has an adapter named 'spam'"):
        add_lora(model, rank=2, alpha=4, name="spam")
