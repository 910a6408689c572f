"""LoRA layers, injection, merging and many adapters on one base (course_lib.lora), on tiny models."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.classification import GPTClassifier
from course_lib.config import GPTConfig
from course_lib.lora import (LoRAEmbedding, LoRALinear, add_lora, adapter_rows, delete_adapter, load_adapter, lora_layers,
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


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_mixed_adapter_batch_equals_each_row_alone(mode):
    """no_grad / inference_mode: the stacked per-row route; grad ("instr" trains): rows grouped."""
    model, idx = _model(), _idx(B=5)
    add_lora(model, rank=2, alpha=4, name="spam")
    add_lora(model, rank=4, alpha=4, targets=("attention", "ff"), name="instr")
    _randomize(model, "spam", seed=1)
    _randomize(model, "instr", seed=2)
    rows = ["spam", None, "instr", "instr", "spam"]
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": contextlib.nullcontext}
    with context[mode](), adapter_rows(model, rows):
        mixed = model(idx)
    stacked = [layer._rows is not None for layer in lora_layers(model).values()]
    assert all(stacked) if mode != "grad" else not any(stacked)          # the route this mode must take
    if mode == "grad":
        mixed[2].sum().backward()                                          # row 2 is "instr": its B gets a gradient
        assert model.trf_blocks[0].att.W_query.lora_B["instr"].grad.abs().sum() > 0
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


def _rows_by_hand(layer, x, rows):
    base = F.linear(x, layer.base.weight, layer.base.bias)                       # [B, .., out]
    return torch.stack([base[i] if n is None else
                        base[i] + layer.scale[n] * (x[i] @ layer.lora_A[n].T) @ layer.lora_B[n].T
                        for i, n in enumerate(rows)])


def test_per_row_stacks_mixed_ranks_and_rebuilt_on_change():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), rank=2, alpha=4, name="a").eval()
    layer.add_adapter("b", 3, 1.5, B=torch.randn(5, 3))
    layer.add_adapter("c", 1, 2.0, rslora=True, B=torch.randn(5, 1))
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(4, 7, 6)
    rows = ["a", "b", None, "c"]
    set_adapter(layer, rows)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _rows_by_hand(layer, x, rows))
        first = layer._rows
        assert first[3].shape == (4, 6, 3) and first[4].shape == (4, 3, 5)   # padded to the largest rank
        layer(x)
        assert layer._rows is first                                         # kept while nothing changed
        layer.lora_B["a"].add_(1)                                           # in place: _version moves
        torch.testing.assert_close(layer(x), _rows_by_hand(layer, x, rows))
        assert layer._rows is not first
    with torch.inference_mode():
        rows = ["c", "c", "a", "b"]
        set_adapter(layer, rows)
        torch.testing.assert_close(layer(x), _rows_by_hand(layer, x, rows))
        torch.testing.assert_close(layer(x[:, 0]), _rows_by_hand(layer, x[:, 0], rows))   # 2-D x
        x4 = x.view(4, 7, 1, 6)
        torch.testing.assert_close(layer(x4), _rows_by_hand(layer, x4, rows))
    layer.lora_A["b"] = nn.Parameter(torch.randn(3, 6))                     # replaced, not changed in place
    delete_adapter(layer, "c")
    for p in layer.parameters():
        p.requires_grad_(False)
    out = layer(x)                                                            # grad on, nothing to train: stacks
    torch.testing.assert_close(out, _rows_by_hand(layer, x, [None, None, "a", "b"]))
    assert layer._rows is not None and layer._rows[0][0] == (None, None, "a", "b")


def test_per_row_dropout_in_training_mode_is_applied():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), rank=2, alpha=4, dropout=0.5, name="d").train()
    with torch.no_grad():
        layer.lora_B["d"].normal_()
        x = torch.randn(3, 4, 6)
        set_adapter(layer, ["d", "d", "d"])
        torch.manual_seed(1)
        out = layer(x)
        torch.manual_seed(1)
        want = layer.base(x) + layer.scale["d"] * (F.dropout(x, 0.5, True) @ layer.lora_A["d"].T) @ layer.lora_B["d"].T
        torch.testing.assert_close(out, want)
        assert layer._rows is None
        layer.eval()
        torch.testing.assert_close(layer(x), _rows_by_hand(layer, x, ["d"] * 3))


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
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"alpha": -1.0}, "alpha must be a finite number > 0"),
    ({"dropout": 1.0}, "dropout"),
    ({"name": "a.b"}, "adapter name"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        add_lora(_model(), **({"rank": 2, "alpha": 4} | kwargs))


def test_target_matching_nothing_lists_linear_layers():
    with pytest.raises(ValueError, match=r"'c_attn' matches no linear or embedding layer.*trf_blocks\.\{i\}\.att\.W_query"):
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


# --------------------------------------------------------------------------- #
# Bad input: our errors, naming the argument (each was a deep error or silently accepted)
# --------------------------------------------------------------------------- #
def test_set_adapter_rejects_wrong_types():
    model = _model()
    add_lora(model, rank=2, alpha=4)
    for bad in (3, b"default", [], [3], ("default", 1.5)):
        with pytest.raises(TypeError, match="name|per-row"):
            set_adapter(model, bad)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        set_adapter("model", "default")


def test_add_lora_refuses_a_name_already_used_on_other_layers():
    model = _model()
    add_lora(model, rank=2, alpha=4, name="spam")                          # attention layers
    with pytest.raises(ValueError, match="already has an adapter named 'spam'"):
        add_lora(model, rank=2, alpha=4, targets=("ff",), name="spam")    # would freeze the first half
    assert all("spam" not in layer.lora_A for n, layer in lora_layers(model).items() if ".ff." in n)


def test_training_a_merged_adapter_is_refused():
    model = _model()
    add_lora(model, rank=2, alpha=4)
    merge_lora(model)
    model.train()
    with pytest.raises(ValueError, match="unmerge_lora"):
        model(_idx())
    model.eval()
    with torch.no_grad():
        model(_idx())                                                      # inference merged: fine
    unmerge_lora(model)
    model.train()
    model(_idx()).sum().backward()
    assert model.trf_blocks[0].att.W_query.lora_B["default"].grad is not None


def test_add_adapter_rejects_non_tensors():
    layer = LoRALinear(nn.Linear(2, 2), 2, 4)
    with pytest.raises(TypeError, match="A must be a floating-point tensor"):
        layer.add_adapter("x", 2, 4, A=[[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="B must be a floating-point tensor"):
        layer.add_adapter("x", 2, 4, B=torch.zeros(2, 2, dtype=torch.long))


def test_save_adapter_bad_paths_and_flags(tmp_path):
    model = _model()
    add_lora(model, rank=2, alpha=4)
    (tmp_path / "file").write_text("x")
    for folder in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ValueError, match="is a file"):
            save_adapter(model, folder)
    with pytest.raises(TypeError, match="folder must be a folder path"):
        save_adapter(model, None)
    save_adapter(model, tmp_path / "ad")
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    _randomize(model, "default")
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        save_adapter(model, tmp_path / "ad", overwrite="yes")              # a truthy string is not consent
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before


def _edited_copy(src, dst, config=None, tensors=None):
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if config is not None:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if tensors is not None:
        with safe_open(dst / "adapter_model.safetensors", "pt") as fh:
            metadata = fh.metadata()
        ts = load_file(dst / "adapter_model.safetensors")
        tensors(ts)
        save_file(ts, dst / "adapter_model.safetensors", metadata=metadata)
    return dst


KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"


@pytest.mark.parametrize("config, tensors, error, match", [
    (lambda c: [1, 2], None, ValueError, "must hold a JSON object"),
    (lambda c: c | {"peft_type": "IA3"}, None, ValueError, "peft_type is 'IA3'"),
    (lambda c: c | {"r": "8"}, None, ValueError, "r must be a positive integer"),
    (lambda c: c | {"lora_alpha": "x"}, None, ValueError, "alpha must be a finite number > 0"),
    (lambda c: c | {"lora_dropout": "x"}, None, ValueError, "lora_dropout must be a probability"),
    (lambda c: c | {"rank_pattern": [1]}, None, ValueError, "rank_pattern must be a mapping"),
    (lambda c: c | {"use_rslora": "false"}, None, ValueError, "use_rslora must be true or false"),
    (lambda c: c | {"rank_pattern": {"h.1.attn.c_proj": 8.9}}, None, ValueError, "rank_pattern.*positive integer"),
    (lambda c: c | {"rank_pattern": {"h.1.attn.c_proj": "x"}}, None, ValueError, "rank_pattern.*positive integer"),
    (lambda c: c | {"alpha_pattern": {"h.1.attn.c_proj": -4}}, None, ValueError, "alpha_pattern.*finite number > 0"),
    (None, lambda ts: ts.pop(KEY), ValueError, r"c_attn lacks its lora_A"),
    (None, lambda ts: ts.update({"foo.weight": torch.zeros(2)}), ValueError, "'foo.weight' is not a LoRA"),
    (None, lambda ts: ts.update({KEY: torch.zeros(6, 33)}), ValueError, r"c_attn\.lora_A\.weight.*shapes"),
    (None, lambda ts: ts.update({KEY: ts[KEY].long()}), ValueError, "must be floating point"),
])
def test_load_adapter_refuses_damaged_files(tmp_path, config, tensors, error, match):
    model = _model()
    add_lora(model, rank=2, alpha=4)
    save_adapter(model, tmp_path / "ad")
    bad = _edited_copy(tmp_path / "ad", tmp_path / "bad", config, tensors)
    fresh = _model()
    with pytest.raises(error, match=match):
        load_adapter(fresh, bad)
    assert not lora_layers(fresh)                                          # nothing half-loaded


@pytest.mark.parametrize("split", ['{"transformer.h.0.attn.c_attn": [["W_query", 2]]}',
                                   '{"transformer.h.0.attn.c_attn": [["W_x", 2], ["W_key", 2], ["W_value", 2]]}',
                                   '{"transformer.h.0.attn.c_attn": [["W_query", 20], ["W_key", 2], ["W_value", 2]]}',
                                   '{"transformer.h.0.attn.c_attn": [["W_query", 2.0]]}'])
def test_load_adapter_refuses_a_damaged_qkv_split(tmp_path, split):
    from safetensors.torch import load_file, save_file

    model = _model()
    add_lora(model, rank=2, alpha=4)
    folder = save_adapter(model, tmp_path / "ad")
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "course_lib.qkv_split": split})
    fresh = _model()
    with pytest.raises(ValueError, match="qkv_split metadata.*damaged"):   # it dropped key and value silently
        load_adapter(fresh, folder)
    assert not lora_layers(fresh)


def test_lora_functions_check_every_argument_before_changing_the_model(tmp_path):
    for kwargs, error, match in (({"dropout": 1.5}, ValueError, "dropout"),
                                 ({"rslora": "yes"}, TypeError, "rslora must be True or False"),
                                 ({"train_head": "no"}, TypeError, "train_head must be True or False")):
        model = _model()
        with pytest.raises(error, match=match):
            add_lora(model, **kwargs)
        assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())   # nothing frozen
    model = _model()
    add_lora(model, rank=2, alpha=4)
    _randomize(model, "default")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(TypeError, match="merge must be True or False"):       # "no" merged the adapter anyway
        unload_lora(model, merge="no")
    with pytest.raises(TypeError, match="keep_original must be True or False"):
        merge_lora(model, keep_original="no")
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    folder = save_adapter(model, tmp_path / "ad")
    merge_lora(model)
    with pytest.raises(ValueError, match="merged into its weight.*activate=False"):
        load_adapter(model, folder, "again")
    assert all("again" not in layer.lora_A for layer in lora_layers(model).values())


def test_load_adapter_bad_paths_and_flags(tmp_path):
    model = _model()
    add_lora(model, rank=2, alpha=4)
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(TypeError, match="path must be a folder path"):
        load_adapter(_model(), None)
    with pytest.raises(TypeError, match="trainable must be True or False"):
        load_adapter(_model(), tmp_path / "ad", trainable="no")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json missing"):
        load_adapter(_model(), tmp_path / "half")


def test_adapter_from_another_base_of_the_same_shape_is_refused(tmp_path):
    """The shapes fit any base of the config; the recorded fingerprint of the base weights does not."""
    model = _model(seed=0)
    add_lora(model, rank=2, alpha=4, targets=("attention", "embedding"))
    _randomize(model, "default")
    folder = save_adapter(model, tmp_path / "ad", base_model_name_or_path="base 0")
    with pytest.raises(ValueError, match=r"trained on another base model \(recorded: base 0.*check_base=False"):
        load_adapter(_model(seed=1), folder)
    other = _model(seed=1)
    assert load_adapter(other, folder, check_base=False)                   # on request: loaded anyway
    with pytest.raises(TypeError, match="check_base must be True or False"):
        load_adapter(_model(), folder, check_base="no")
    same = _model(seed=0)                                                 # the same base: loads, and computes the same
    load_adapter(same, folder)
    with torch.no_grad():
        torch.testing.assert_close(same(_idx()), model(_idx()))
    load_adapter(_model(seed=0).to(torch.bfloat16), folder)              # the base cast to bfloat16 is the same base
    merged = _model(seed=0)                                               # another adapter merged in: the base is read
    add_lora(merged, rank=2, alpha=4, name="m")                            # from the kept original weights
    _randomize(merged, "m")
    merge_lora(merged)
    load_adapter(merged, folder, "x", activate=False)
    retrained = _model(seed=0)                                            # one weight moved: another base
    with torch.no_grad():
        retrained.trf_blocks[1].norm2.weight.add_(0.5)
    with pytest.raises(ValueError, match="another base model"):
        load_adapter(retrained, folder)


# --------------------------------------------------------------------------- #
# Adapters with the KV cache and fast decoding (course_lib.inference)
# --------------------------------------------------------------------------- #
def _greedy_without_cache(model, idx, n):
    out = idx
    with torch.no_grad():
        for _ in range(n):
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)   # [B, T + 1]
    return out


@pytest.mark.parametrize("switch_first", [False, True])
def test_generate_with_adapters_equals_step_by_step_forward(monkeypatch, switch_first):
    """fast_decoding switches LoRALinear.base to the few-rows route and must not fuse (skip) the
    adapters of a LoRA-wrapped W_query/W_key/W_value; with it switched on before add_lora, the
    bases are fused Q/K/V layers inside the wrappers."""
    from course_lib import inference
    monkeypatch.setattr(inference, "FEW_ROWS_MIN_SIZE", 0)               # small layers take the routes too
    model, idx = _model(), _idx(B=3, T=5)
    if switch_first:
        inference.fast_decoding(model)
    add_lora(model, rank=2, alpha=4, name="a")
    add_lora(model, rank=2, alpha=4, targets=("W_query", "W_value", "ff"), name="b")
    _randomize(model, "a", seed=1)
    _randomize(model, "b", seed=2)
    set_adapter(model, "a")
    torch.testing.assert_close(inference.generate(model, idx, 8), _greedy_without_cache(model, idx, 8))
    with adapter_rows(model, [None, None, None]):
        base_text = inference.generate(model, idx, 8)
    assert not torch.equal(base_text, inference.generate(model, idx, 8))  # the adapter changes the text
    rows = ["a", None, "b"]
    with adapter_rows(model, rows):
        mixed = inference.generate(model, idx, 8)
    for i, name in enumerate(rows):
        set_adapter(model, name)
        torch.testing.assert_close(mixed[i:i + 1], _greedy_without_cache(model, idx[i:i + 1], 8))
    # prefill/decode_step with fast decoding on by hand, and merged weights picked up by the fused copy
    inference.fast_decoding(model)
    assert type(model.trf_blocks[0].att.W_query) is LoRALinear
    set_adapter(model, "b")
    with torch.no_grad():
        want = model(idx)                                                  # [B, T, V]
        cache, logits = inference.prefill(model, idx[:, :4])
        torch.testing.assert_close(logits, want[:, 3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inference.decode_step(model, cache, idx[:, 4]), want[:, 4], atol=1e-5, rtol=1e-5)
        merge_lora(model)
        torch.testing.assert_close(inference.prefill(model, idx)[1], want[:, -1], atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
    inference.fast_decoding(model, False)


def test_merging_a_head_adapter_leaves_a_tied_token_embedding_alone():
    """Regression: the merge wrote into the weight the tied head shares with the token embedding."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=False)
    model = GPTModel(cfg, tie_weights=True).eval()
    embedding = model.tok_emb.weight.detach().clone()
    add_lora(model, rank=2, alpha=4, targets=["head", "W_query"])
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"])
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        assert torch.equal(model.tok_emb.weight, embedding) and model.tie_weights is False
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
        unmerge_lora(model)
        assert model.out_head.base.weight is model.tok_emb.weight and model.tie_weights is True
        unload_lora(model)
        assert torch.equal(model.tok_emb.weight, embedding) and model.tie_weights is False
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)


def test_embedding_adapter_is_a_lookup_of_a_low_rank_update():
    """LoRAEmbedding against the plain formula: the lookup of W + scale * (B @ A).T."""
    torch.manual_seed(0)
    base = nn.Embedding(50, 8)
    layer = LoRAEmbedding(base, rank=3, alpha=6)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(layer(ids), base(ids))                            # fresh: A is zeros, a no-op
    with torch.no_grad():
        layer.lora_A["default"].normal_()
    expected = F.embedding(ids, base.weight + 2.0 * (layer.lora_B["default"] @ layer.lora_A["default"]).T)
    torch.testing.assert_close(layer(ids), expected)
    with pytest.raises(TypeError, match="nn.Embedding"):
        LoRAEmbedding(nn.Linear(2, 2), 2, 4)


def test_embedding_targets_take_their_own_rank_and_merge_exactly():
    torch.manual_seed(0)
    model = _model()
    summary = add_lora(model, rank=8, alpha=16, targets=["attention", "embedding"], rank_pattern={"embedding": 2})
    emb = model.tok_emb
    assert isinstance(emb, LoRAEmbedding) and emb.rank["default"] == 2 and emb.scale["default"] == 8.0
    attention = 4 * CFG.n_layers * 8 * 2 * CFG.emb_dim
    assert summary.trainable == attention + 2 * (CFG.vocab_size + CFG.emb_dim)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_A["default"])
            torch.nn.init.normal_(layer.lora_B["default"])
    x = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-4)
        unmerge_lora(model)
        set_adapter(model, ["default", None])
        torch.testing.assert_close(model(x)[0], adapted[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"rank_pattern key 'ff' matches none of the targets"):
        add_lora(_model(), targets=["attention"], rank_pattern={"ff": 2})
    with pytest.raises(ValueError, match=r"rank_pattern\['embedding'\] must be a positive integer"):
        add_lora(_model(), targets=["embedding"], rank_pattern={"embedding": 0})


def test_numpy_numbers_are_numbers_for_add_lora():
    import numpy as np

    model = _model()
    add_lora(model, rank=np.int64(2), alpha=np.float32(4.0))          # "alpha must be a positive number" before
    assert {layer.scale["default"] for layer in lora_layers(model).values()} == {2.0}
