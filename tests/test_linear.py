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


@pytest.mark.parametrize("shape", [(1, 8), (2, 8), (4, 1, 8), (3, 5, 8)])
def test_few_rows_linear_without_the_copy_gives_the_same_numbers_as_a_view(shape):
    x, w, b = torch.randn(shape), torch.randn(300, 8), torch.randn(300)
    got = few_rows_linear(x, w, b, contiguous=False)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert got.shape == (*shape[:-1], 300)
    assert got.is_contiguous() == (x.numel() == 8)       # more than one row: the product as computed


def test_fast_decoding_gives_the_head_a_view_and_takes_it_back(monkeypatch):
    """The output head (or the base layer of a LoRA-adapted head) skips the transposing copy; the
    logits of a batch equal nn.Linear's; switching off leaves no trace."""
    from course_lib.lora import add_lora

    monkeypatch.setattr(inference, "FEW_ROWS_MIN_SIZE", 0)
    model = GPTModel(get_config("gpt-tiny")).eval()
    idx = torch.randint(0, 50257, (3, 1))
    with torch.no_grad():
        want = model(idx)
        fast_decoding(model)
        got = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not got.is_contiguous() and model.out_head.contiguous_output is False
    assert all(m.contiguous_output for m in model.trf_blocks.modules() if type(m) is Linear)
    fast_decoding(model, False)
    assert type(model.out_head) is nn.Linear and "contiguous_output" not in vars(model.out_head)
    add_lora(model, rank=2, alpha=4, targets=["head"])
    fast_decoding(model)
    assert model.out_head.base.contiguous_output is False
    with torch.no_grad():
        torch.testing.assert_close(model(idx), want, rtol=1e-5, atol=1e-5)      # a fresh adapter: no change


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
    assert len(calls) == 4 * cfg.n_layers + 1  # Q, K and V as one product, out_proj, two feed-forward, the head
    torch.testing.assert_close(fast, model(idx), rtol=1e-5, atol=1e-5)
    assert len(calls) == 4 * cfg.n_layers + 1


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
        assert all(issubclass(t, Linear) for t in _linear_types(model)) and repr(model) == text
        assert all(a is b for a, b in zip(model.parameters(), params)) and model.out_head.weight is model.tok_emb.weight
        assert model.state_dict().keys() == state.keys()
        torch.testing.assert_close(model(idx), plain, rtol=1e-5, atol=1e-5)
        assert len(calls) == 4 * cfg.n_layers + 1
        fast_decoding(model, False)
        assert set(_linear_types(model)) == {nn.Linear}
        assert torch.equal(model(idx), plain)       # back to nn.Linear: bit for bit
    assert len(calls) == 4 * cfg.n_layers + 1
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
    assert len(calls) == 5 * (4 * model.cfg.n_layers + 1)  # every linear (Q/K/V fused), at each of the 5 forwards
    assert set(_linear_types(model)) == {nn.Linear}          # put back
    fast_decoding(model)
    assert generate(model, idx, 5).tolist() == out.tolist()
    assert all(issubclass(t, Linear) for t in _linear_types(model))  # a model switched by hand stays switched
    with few_rows_route(False):
        calls.clear()
        assert generate(fast_decoding(model, False), idx, 5).tolist() == out.tolist()
    assert calls == []


# --------------------------------------------------------------------------- #
# fast_decoding: the Q, K and V products of each attention layer as one
# --------------------------------------------------------------------------- #
def _moved(model):
    with torch.no_grad():  # weights away from their init (zero biases would hide a bias mix-up)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _pair(qkv_bias=True, tie_weights=False):
    cfg = get_config("gpt-tiny", vocab_size=300, qkv_bias=qkv_bias)
    model = _moved(GPTModel(cfg, tie_weights=tie_weights).eval())
    plain = GPTModel(cfg, tie_weights=tie_weights).eval()
    plain.load_state_dict(model.state_dict())
    return model, plain


def _groups(model):
    return [m.W_query._qkv[0] for m in model.modules() if type(getattr(m, "W_query", None)) is inference._QKVLinear]


@pytest.mark.parametrize("min_size", [0, None], ids=["few-rows-route", "default-size"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["bias", "no-bias"])
def test_fused_qkv_gives_the_logits_of_the_unfused_model(monkeypatch, qkv_bias, min_size):
    from course_lib.inference import decode_step, prefill

    if min_size is not None:
        monkeypatch.setattr(inference, "FEW_ROWS_MIN_SIZE", min_size)
    model, plain = _pair(qkv_bias)
    fast_decoding(model)
    assert len(_groups(model)) == model.cfg.n_layers
    prompts = [torch.randint(0, 300, (n,)) for n in (3, 7)]      # rows of different lengths
    with torch.no_grad():
        for idx in (torch.randint(0, 300, (1, 1)), torch.randint(0, 300, (3, 6))):
            torch.testing.assert_close(model(idx), plain(idx), rtol=1e-5, atol=1e-5)
        cache, logits = prefill(model, prompts)
        ref_cache, ref_logits = prefill(plain, prompts)
        for _ in range(4):
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            next_ids = ref_logits.argmax(-1)
            logits, ref_logits = decode_step(model, cache, next_ids), decode_step(plain, ref_cache, next_ids)
        torch.testing.assert_close(cache.keys, ref_cache.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values, ref_cache.values, rtol=1e-5, atol=1e-5)


def test_fused_weight_is_built_once_and_kept_while_the_weights_stay(monkeypatch):
    calls = _counting(monkeypatch)
    model, _ = _pair()
    fast_decoding(model)
    idx = torch.randint(0, 300, (1, 1))
    with torch.no_grad():
        model(idx)
        built = [(g.weight, g.bias) for g in _groups(model)]
        assert all(w.shape == (3 * 64, 64) and b.shape == (3 * 64,) for w, b in built)
        model(idx)
        model(idx)
    assert [(g.weight, g.bias) for g in _groups(model)] == built   # the same tensors: not rebuilt
    assert len(calls) == 3 * (4 * model.cfg.n_layers + 1)
    assert all(g._x is None for g in _groups(model))               # nothing held between forward passes


def test_fused_qkv_sees_weights_changed_after_switching_on():
    model, plain = _pair()
    fast_decoding(model)
    idx = torch.randint(0, 300, (2, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        with torch.no_grad():
            torch.testing.assert_close(model(idx), plain(idx), rtol=1e-5, atol=1e-5)  # builds the fused weights
        # training with the model switched on: plain nn.Linear products, then an optimizer step
        plain_loss, loss = plain(idx).logsumexp(-1).mean(), model(idx).logsumexp(-1).mean()
        loss.backward()
        plain_loss.backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                q -= 0.5 * q.grad
            q.grad = None
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), plain(idx), rtol=1e-5, atol=1e-5)
        # load_state_dict (in place), a parameter replaced, a model moved to another dtype
        for att in (model.trf_blocks[0].att, plain.trf_blocks[0].att):
            att.W_key.weight.mul_(-1)
        plain.trf_blocks[1].att.W_value.bias.add_(1.0)
        model.load_state_dict(plain.state_dict())
        torch.testing.assert_close(model(idx), plain(idx), rtol=1e-5, atol=1e-5)
        new_weight = torch.randn_like(plain.trf_blocks[1].att.W_query.weight)
        for net in (model, plain):
            net.trf_blocks[1].att.W_query.weight = nn.Parameter(new_weight.clone())
        torch.testing.assert_close(model(idx), plain(idx), rtol=1e-5, atol=1e-5)
        model.double()
        plain.double()
        torch.testing.assert_close(model(idx), plain(idx), rtol=1e-10, atol=1e-10)
        assert _groups(model)[0].weight.dtype == torch.float64


def test_a_change_through_data_is_seen_after_switching_on_again():
    model, plain = _pair()
    fast_decoding(model)
    idx = torch.randint(0, 300, (1, 2))
    with torch.no_grad():
        model(idx)
        for net in (model, plain):
            net.trf_blocks[0].att.W_query.weight.data.mul_(2)     # no _version bump: not seen ...
        assert not torch.allclose(model(idx), plain(idx), rtol=1e-5, atol=1e-5)
        fast_decoding(model)                                       # ... until switched on again
        torch.testing.assert_close(model(idx), plain(idx), rtol=1e-5, atol=1e-5)


def test_switching_off_restores_the_modules_exactly():
    model, plain = _pair(tie_weights=True)
    before = {name: (type(m), dict(vars(m))) for name, m in model.named_modules()}
    params, text, state = list(model.parameters()), repr(model), model.state_dict()
    idx = torch.randint(0, 300, (1, 4))
    with torch.no_grad():
        fast_decoding(model)(idx)
        assert repr(model) == text and model.state_dict().keys() == state.keys()
        assert fast_decoding(model, False) is model
    after = {name: (type(m), dict(vars(m))) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name, (cls, attrs) in before.items():
        assert after[name][0] is cls and after[name][1].keys() == attrs.keys(), name
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))
    out = torch.randint(0, 300, (1, 4))
    from course_lib.inference import generate
    generate(model, out, 3)                                        # generate switches on and back too
    assert {name: type(m) for name, m in model.named_modules()} == {name: c for name, (c, _) in before.items()}
    assert all(not hasattr(m, "_qkv") for m in model.modules())


def test_fused_qkv_is_skipped_where_it_does_not_apply(monkeypatch):
    calls = _counting(monkeypatch)
    model, plain = _pair()
    fast_decoding(model)
    att, ref = model.trf_blocks[0].att, plain.trf_blocks[0].att
    x, y = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    with torch.no_grad():
        # different inputs (as cross-attention would give): each output still its own layer's
        torch.testing.assert_close(att.W_query(x), ref.W_query(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(att.W_key(y), ref.W_key(y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(att.W_value(y), ref.W_value(y), rtol=1e-5, atol=1e-5)
        x.add_(1.0)                                                 # the same tensor, changed in place
        torch.testing.assert_close(att.W_key(x), ref.W_key(x), rtol=1e-5, atol=1e-5)
        # too many rows, or the routes turned off: each layer is nn.Linear itself
        calls.clear()
        long = torch.randn(1, FEW_ROWS + 1, 64)
        assert torch.equal(att.W_key(long), ref.W_key(long)) and calls == []
        with few_rows_route(False):
            ids = torch.randint(0, 300, (1, 3))
            assert torch.equal(model(ids), plain(ids)) and torch.equal(att.W_value(x), ref.W_value(x))
        assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert torch.equal(att.W_query(x), ref.W_query(x))
    assert calls == []
    # three projections that cannot be one product are left as they are
    mixed = nn.Module()
    mixed.W_query, mixed.W_key, mixed.W_value = nn.Linear(4, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 4)
    fast_decoding(mixed)
    assert [type(m) for m in (mixed.W_query, mixed.W_key, mixed.W_value)] == [Linear] * 3


def test_fused_qkv_under_inference_mode_and_the_explicit_attention(monkeypatch):
    from course_lib.inference import generate

    monkeypatch.setattr(inference, "FEW_ROWS_MIN_SIZE", 0)
    model, plain = _pair()
    idx = torch.randint(0, 300, (2, 5))
    want = generate(plain, idx, 12, use_cache=False)
    with few_rows_route(False):
        assert torch.equal(generate(plain, idx, 12), want)
    with torch.inference_mode():
        assert torch.equal(generate(model, idx, 12), want)
    for block in model.trf_blocks:
        block.att.use_sdpa = False
    assert torch.equal(generate(model, idx, 12), want)
