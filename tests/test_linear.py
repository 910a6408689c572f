"""course_lib.inference.Linear, few_rows_linear and fast_decoding against torch's own nn.Linear / F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import course_lib.inference as inference
from course_lib.config import get_config
from course_lib.inference import FEW_ROWS, Linear, fast_decoding, few_rows_linear, few_rows_route
from course_lib.model import GPTModel


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", [(8,), (1, 8), (2, 8), (1, 1, 8), (3, 5, 8), (64, 8), (100, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [1, 6, 300])
def test_few_rows_linear_equals_f_linear(shape, bias, out_features):
    x = torch.randn(shape)
    w = torch.randn(out_features, 8)
    b = torch.randn(out_features) if bias else None
    got = few_rows_linear(x, w, b)
    want = F.linear(x, w, b)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_few_rows_linear_on_gpt2_small_shapes():
    # The product it exists for: one token through GPT-2 small's matrices, head included.
    for d_in, d_out in [(768, 768), (768, 3072), (3072, 768), (768, 50257)]:
        x, w, b = torch.randn(1, 1, d_in), torch.randn(d_out, d_in) * 0.02, torch.randn(d_out)
        torch.testing.assert_close(few_rows_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_few_rows_linear_leaves_bad_shapes_to_f_linear():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        few_rows_linear(torch.randn(2, 7), torch.randn(3, 8))
    assert few_rows_linear(torch.randn(0, 8), torch.randn(3, 8)).shape == (0, 3)


def _counting(monkeypatch, min_size=0):
    monkeypatch.setattr(inference, "FEW_ROWS_MIN_SIZE", min_size)  # small test layers take the route too
    calls = []
    original = inference.few_rows_linear

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "few_rows_linear", spy)
    return calls


def test_linear_is_an_nn_linear_with_the_same_state_dict():
    ours, ref = Linear(8, 5), nn.Linear(8, 5)
    assert isinstance(ours, nn.Linear)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(ref)
    assert Linear(8, 5, bias=False).bias is None


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS])
def test_linear_takes_the_few_rows_route_only_without_gradients(monkeypatch, rows):
    calls = _counting(monkeypatch)
    ours = Linear(8, 5)
    ref = nn.Linear(8, 5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(rows, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1
    # with gradients it is nn.Linear itself: same numbers, same gradients
    xg = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    out, want = ours(xg), ref(xr)
    assert torch.equal(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(xg.grad, xr.grad)
    assert len(calls) == 1


def test_linear_with_frozen_weights_uses_the_route_under_grad_mode(monkeypatch):
    calls = _counting(monkeypatch)
    ours = Linear(8, 5).requires_grad_(False)
    ours(torch.randn(2, 8))
    assert len(calls) == 1


@pytest.mark.parametrize("case", ["many rows", "float64", "empty", "small weight", "autocast"])
def test_linear_keeps_nn_linear_elsewhere(monkeypatch, case):
    calls = _counting(monkeypatch, min_size=41 if case == "small weight" else 0)
    ours = Linear(8, 5)
    x = {"many rows": torch.randn(FEW_ROWS + 1, 8), "empty": torch.randn(0, 8)}.get(case, torch.randn(2, 8))
    if case == "float64":
        ours = ours.double()
        x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = ours(x)
        want = F.linear(x, ours.weight, ours.bias)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert calls == []


def test_default_size_threshold(monkeypatch):
    calls = _counting(monkeypatch, min_size=inference.FEW_ROWS_MIN_SIZE)
    big = Linear(1, inference.FEW_ROWS_MIN_SIZE)          # exactly the threshold: the few-rows route
    small = Linear(1, inference.FEW_ROWS_MIN_SIZE - 1)    # one number fewer: nn.Linear
    with torch.no_grad():
        big(torch.randn(1, 1))
        assert len(calls) == 1
        small(torch.randn(1, 1))
        assert len(calls) == 1


def test_model_logits_for_one_token_match_with_and_without_gradients(monkeypatch):
    calls = _counting(monkeypatch)
    cfg = get_config("gpt-tiny", vocab_size=300)
    model = fast_decoding(GPTModel(cfg).eval())
    idx = torch.randint(0, 300, (1, 1))
    with torch.no_grad():
        fast = model(idx)
    assert len(calls) == 6 * cfg.n_layers + 1  # Q, K, V, out_proj, two feed-forward, and the head
    torch.testing.assert_close(fast, model(idx), rtol=1e-5, atol=1e-5)
    assert len(calls) == 6 * cfg.n_layers + 1


def test_few_rows_route_switches_the_route_off_and_back(monkeypatch):
    calls = _counting(monkeypatch)
    layer, x = Linear(8, 5), torch.randn(1, 8)
    with torch.no_grad():
        with few_rows_route(False):
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert calls == [] and inference.FEW_ROWS == FEW_ROWS
        with pytest.raises(KeyError), few_rows_route(False):
            raise KeyError("an error inside the block")
        assert inference.FEW_ROWS == FEW_ROWS  # restored even after an error
        with few_rows_route(True):
            layer(x)
    assert len(calls) == 1


# --------------------------------------------------------------------------- #
# fast_decoding: the one-line switch on a model
# --------------------------------------------------------------------------- #
def _linear_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.Linear)]


def test_steps_3_and_4_build_plain_nn_linear():
    model = GPTModel(get_config("gpt-tiny", vocab_size=300))
    assert set(_linear_types(model)) == {nn.Linear} and len(_linear_types(model)) == 6 * model.cfg.n_layers + 1


def test_fast_decoding_switches_every_linear_and_back_keeping_the_parameters(monkeypatch):
    calls = _counting(monkeypatch)
    cfg = get_config("gpt-tiny", vocab_size=300)
    model = GPTModel(cfg, tie_weights=True).eval()
    reference = GPTModel(cfg, tie_weights=True).eval()
    reference.load_state_dict(model.state_dict())
    params, state, text = list(model.parameters()), model.state_dict(), repr(model)
    idx = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        plain = reference(idx)
        assert fast_decoding(model) is model
        assert set(_linear_types(model)) == {Linear} and repr(model) == text
        assert all(a is b for a, b in zip(model.parameters(), params)) and model.out_head.weight is model.tok_emb.weight
        assert model.state_dict().keys() == state.keys()
        torch.testing.assert_close(model(idx), plain, rtol=1e-5, atol=1e-5)
        assert len(calls) == 6 * cfg.n_layers + 1
        fast_decoding(model, False)
        assert set(_linear_types(model)) == {nn.Linear}
        assert torch.equal(model(idx), plain)       # back to nn.Linear: bit for bit
    assert len(calls) == 6 * cfg.n_layers + 1
    with pytest.raises(TypeError, match="enabled must be True or False"):
        fast_decoding(model, "yes")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fast_decoding(lambda x: x)


def test_fast_decoding_leaves_subclasses_of_nn_linear_alone():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(nn.Linear(4, 4), Scaled(4, 4))
    fast_decoding(net)
    assert [type(m) for m in net] == [Linear, Scaled]


def test_generate_takes_the_route_for_the_call_and_puts_the_layers_back(monkeypatch):
    from course_lib.inference import generate

    calls = _counting(monkeypatch)
    model = GPTModel(get_config("gpt-tiny", vocab_size=300)).eval()
    idx = torch.randint(0, 300, (1, 4))
    out = generate(model, idx, 5)
    assert len(calls) == 5 * (6 * model.cfg.n_layers + 1)  # every linear, at every one of the 5 forwards
    assert set(_linear_types(model)) == {nn.Linear}          # put back
    fast_decoding(model)
    assert generate(model, idx, 5).tolist() == out.tolist()
    assert set(_linear_types(model)) == {Linear}             # a model switched by hand stays switched
    with few_rows_route(False):
        calls.clear()
        assert generate(fast_decoding(model, False), idx, 5).tolist() == out.tolist()
    assert calls == []
