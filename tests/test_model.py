"""course_lib.model against torch's own modules, hand-computed formulas and Hugging Face's GPT-2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.config import GPT_CONFIGS, GPTConfig, get_config
from course_lib.model import (GELU, FeedForward, GPTModel, LayerNorm, TransformerBlock, count_parameters,
                              model_memory_bytes)

try:  # a dev dependency: only the tests against Hugging Face need it
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:  # pragma: no cover
    GPT2Config = GPT2LMHeadModel = None
needs_hf = pytest.mark.skipif(GPT2LMHeadModel is None, reason="transformers is not installed (pip install -e .[dev])")

GPT2_SIZES = ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
# A small GPT-2 (QKV bias on, as in GPT-2) that runs in milliseconds.
SMALL = GPTConfig(vocab_size=503, context_length=32, emb_dim=48, n_heads=4, n_layers=3, drop_rate=0.0,
                  qkv_bias=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- #
# Components against torch and against the formulas
# --------------------------------------------------------------------------- #
def test_layernorm_equals_torch_layernorm_with_the_same_parameters():
    torch_ln = nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        torch_ln.weight.normal_()
        torch_ln.bias.normal_()
    ours = LayerNorm(16)
    ours.load_state_dict(torch_ln.state_dict())  # same parameter names: weight and bias
    x = torch.randn(3, 5, 16) * 4 + 2
    assert torch.allclose(ours(x), torch_ln(x), atol=1e-6, rtol=0)
    assert ours.eps == torch_ln.eps == 1e-5


def test_layernorm_matches_the_formula_in_float64():
    ours = LayerNorm(6).double()
    with torch.no_grad():
        ours.weight.copy_(torch.arange(1.0, 7.0))
        ours.bias.fill_(0.5)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 15.0]], dtype=torch.float64)
    mean = sum(x[0].tolist()) / 6
    var = sum((v - mean) ** 2 for v in x[0].tolist()) / 6   # biased variance
    want = [(v - mean) / math.sqrt(var + 1e-5) * g + 0.5 for v, g in zip(x[0].tolist(), range(1, 7))]
    assert torch.allclose(ours(x)[0], torch.tensor(want, dtype=torch.float64), atol=1e-6)


def test_fresh_layernorm_gives_mean_zero_variance_one():
    y = LayerNorm(64)(torch.randn(4, 64) * 10 - 3)
    assert torch.allclose(y.mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(4), atol=1e-3)


def test_gelu_equals_torch_tanh_gelu_and_the_formula():
    x = torch.linspace(-6, 6, 1001)
    ours = GELU()(x)
    assert torch.allclose(ours, nn.GELU(approximate="tanh")(x), atol=1e-6, rtol=0)
    xd = x.double()
    formula = 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    assert torch.allclose(ours.double(), formula, atol=1e-6, rtol=0)
    # the approximation is close to, but not, the exact erf GELU
    assert 0 < (ours - F.gelu(x)).abs().max() < 1e-3


def test_feedforward_is_expand_gelu_contract():
    ff = FeedForward(8)
    assert ff.layers[0].weight.shape == (32, 8) and ff.layers[2].weight.shape == (8, 32)
    x = torch.randn(2, 3, 8)
    w1, b1, w2, b2 = ff.layers[0].weight, ff.layers[0].bias, ff.layers[2].weight, ff.layers[2].bias
    want = F.gelu(x @ w1.T + b1, approximate="tanh") @ w2.T + b2
    assert torch.allclose(ff(x), want, atol=1e-6)
    assert FeedForward(8, hidden_dim=5).layers[0].out_features == 5


def test_block_equals_a_reference_built_from_torch_modules():
    cfg = GPTConfig(vocab_size=10, context_length=8, emb_dim=12, n_heads=3, n_layers=1, drop_rate=0.0,
                    qkv_bias=True)
    block = TransformerBlock(cfg).eval()
    a = block.att
    # torch's own multi-head attention, loaded with the block's weights
    mha = nn.MultiheadAttention(12, 3, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([a.W_query.weight, a.W_key.weight, a.W_value.weight]))
        mha.in_proj_bias.copy_(torch.cat([a.W_query.bias, a.W_key.bias, a.W_value.bias]))
        mha.out_proj.weight.copy_(a.out_proj.weight)
        mha.out_proj.bias.copy_(a.out_proj.bias)
    ln1, ln2 = nn.LayerNorm(12), nn.LayerNorm(12)
    ln1.load_state_dict(block.norm1.state_dict())
    ln2.load_state_dict(block.norm2.state_dict())
    x = torch.randn(2, 8, 12)
    mask = torch.triu(torch.ones(8, 8, dtype=torch.bool), diagonal=1)
    h = ln1(x)
    x1 = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
    want = x1 + block.ff.layers[2](F.gelu(block.ff.layers[0](ln2(x1)), approximate="tanh"))
    with torch.no_grad():
        assert torch.allclose(block(x), want, atol=1e-5)


# --------------------------------------------------------------------------- #
# Architecture identical to GPT-2 (Hugging Face transformers)
# --------------------------------------------------------------------------- #
def _hf_config(cfg: GPTConfig, tied: bool):
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                      n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=cfg.drop_rate,
                      embd_pdrop=cfg.drop_rate, attn_pdrop=cfg.drop_rate, layer_norm_epsilon=1e-5,
                      activation_function="gelu_new", tie_word_embeddings=tied)


def _hf_to_ours(hf_state: dict, d: int) -> dict:
    """Rename (and reshape) Hugging Face GPT-2 tensors into our names.

    HF's ``Conv1D`` stores weights as ``[in, out]`` (ours, ``nn.Linear``: ``[out, in]``), and
    ``c_attn`` holds queries, keys and values side by side in one ``[d, 3d]`` matrix.
    """
    out = {}
    for name, t in hf_state.items():
        n = name.removeprefix("transformer.")
        if n == "wte.weight":
            out["tok_emb.weight"] = t
        elif n == "wpe.weight":
            out["pos_emb.weight"] = t
        elif n.startswith("ln_f."):
            out["final_norm." + n.split(".")[-1]] = t
        elif n == "lm_head.weight":
            out["out_head.weight"] = t
        elif n.startswith("h."):
            _, i, *rest = n.split(".")
            rest, p = ".".join(rest[:-1]), rest[-1]
            b = f"trf_blocks.{i}."
            if rest == "attn.c_attn":
                for k, part in enumerate(("W_query", "W_key", "W_value")):
                    piece = t[..., k * d:(k + 1) * d]
                    out[f"{b}att.{part}.{p}"] = piece.T if p == "weight" else piece
            else:
                ours = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "att.out_proj",
                        "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}[rest]
                out[f"{b}{ours}.{p}"] = t.T if p == "weight" and rest != "ln_1" and rest != "ln_2" else t
        else:
            raise AssertionError(f"unexpected Hugging Face tensor {name}")
    return out


@needs_hf
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("cfg", [GPT_CONFIGS["gpt2-small"], SMALL], ids=["gpt2-small", "small"])
def test_every_tensor_shape_and_the_count_equal_hugging_face_gpt2(cfg, tied):
    with torch.device("meta"):
        hf = GPT2LMHeadModel(_hf_config(cfg, tied))
        ours = GPTModel(cfg, tie_weights=tied)
    assert count_parameters(ours) == hf.num_parameters() == count_parameters(hf)
    mapped = _hf_to_ours(hf.state_dict(), cfg.emb_dim)
    ours_state = ours.state_dict()
    assert set(mapped) == set(ours_state), (set(mapped) ^ set(ours_state))
    for name, t in mapped.items():
        assert tuple(t.shape) == tuple(ours_state[name].shape), name
    assert (ours.out_head.weight is ours.tok_emb.weight) == tied
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tied


@needs_hf
def test_same_weights_give_the_same_logits_as_hugging_face_gpt2():
    hf = GPT2LMHeadModel(_hf_config(SMALL, tied=True)).eval()
    with torch.no_grad():  # weights far from their init, so that every detail shows in the logits
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours = GPTModel(SMALL, tie_weights=True).eval()
    missing = ours.load_state_dict(_hf_to_ours(hf.state_dict(), SMALL.emb_dim), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    idx = torch.randint(0, SMALL.vocab_size, (2, SMALL.context_length))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx)
    assert got.shape == want.shape == (2, SMALL.context_length, SMALL.vocab_size)
    assert want.std() > 1
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("name", GPT2_SIZES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_counts_and_memory_agree_with_the_step1_anatomy(name, tied):
    anatomy = pytest.importorskip("course_lib.anatomy")
    cfg = get_config(name)
    with torch.device("meta"):
        model = GPTModel(cfg, tie_weights=tied)
    assert count_parameters(model) == anatomy.parameter_counts(cfg, tied=tied)["total"]
    assert model_memory_bytes(model, torch.bfloat16) == anatomy.memory_bytes(cfg, "bfloat16", tied=tied)
    if tied:
        assert count_parameters(model) == anatomy.PUBLISHED_GPT2_PARAMETERS[name]


# --------------------------------------------------------------------------- #
# Parameter count and memory
# --------------------------------------------------------------------------- #
def test_count_and_memory_tied_and_untied():
    cfg = get_config("gpt-tiny")
    untied, tied = GPTModel(cfg), GPTModel(cfg, tie_weights=True)
    by_hand = sum(p.numel() for p in {id(p): p for p in untied.parameters()}.values())
    assert count_parameters(untied) == by_hand
    assert count_parameters(untied) - count_parameters(tied) == cfg.vocab_size * cfg.emb_dim
    assert model_memory_bytes(untied) == 4 * count_parameters(untied)            # float32
    assert model_memory_bytes(untied, "bf16") == 2 * count_parameters(untied)
    assert model_memory_bytes(untied.to(torch.bfloat16)) == 2 * count_parameters(untied)
    masks = sum(b.numel() for b in tied.buffers())  # boolean causal masks, one byte each
    assert masks == cfg.n_layers * cfg.context_length ** 2
    assert model_memory_bytes(tied, include_buffers=True) == 4 * count_parameters(tied) + masks
    for p in tied.trf_blocks.parameters():
        p.requires_grad_(False)
    frozen = count_parameters(tied.trf_blocks)
    assert count_parameters(tied, trainable_only=True) == count_parameters(tied) - frozen


def test_count_and_memory_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        count_parameters("gpt2")
    with pytest.raises(ValueError, match="unknown dtype"):
        model_memory_bytes(nn.Linear(2, 2), "float13")
    with pytest.raises(TypeError, match="dtype"):
        model_memory_bytes(nn.Linear(2, 2), 4)


# --------------------------------------------------------------------------- #
# Initialisation, determinism, causality
# --------------------------------------------------------------------------- #
def test_gpt2_initialisation():
    cfg = GPTConfig(vocab_size=2000, context_length=64, emb_dim=128, n_heads=4, n_layers=8, qkv_bias=True)
    model = GPTModel(cfg)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 1e-3
    assert abs(model.pos_emb.weight.std().item() - 0.02) < 2e-3
    assert abs(model.out_head.weight.std().item() - 0.02) < 1e-3
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    for block in model.trf_blocks:
        assert abs(block.att.W_query.weight.std().item() - 0.02) < 2e-3
        assert abs(block.att.out_proj.weight.std().item() - residual) < 5e-4
        assert abs(block.ff.layers[2].weight.std().item() - residual) < 5e-4
        assert torch.all(block.att.W_query.bias == 0) and torch.all(block.ff.layers[0].bias == 0)
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)


def test_fresh_model_predicts_roughly_uniformly():
    # With GPT-2's init the logits start small, so the first loss is close to ln(vocab_size):
    # every token equally likely. (With N(0, 1) embeddings it starts far above.)
    cfg = get_config("gpt-tiny")
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.context_length))
    with torch.no_grad():
        logits = model(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), torch.randint(0, cfg.vocab_size, (4 * cfg.context_length,)))
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    assert logits.abs().max() < 3


def test_same_seed_same_model_and_eval_is_deterministic():
    cfg = get_config("gpt-tiny", drop_rate=0.5)
    torch.manual_seed(1)
    a = GPTModel(cfg)
    torch.manual_seed(1)
    b = GPTModel(cfg)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        a.eval()
        assert torch.equal(a(idx), a(idx))
        a.train()  # dropout is really on in training mode
        assert not torch.equal(a(idx), a(idx))


def test_logits_do_not_depend_on_later_tokens():
    cfg = get_config("gpt-tiny")
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_shorter_sequences_and_tied_state_dict_roundtrip():
    cfg = get_config("gpt-tiny")
    model = GPTModel(cfg, tie_weights=True)
    assert model(torch.zeros(3, 1, dtype=torch.long)).shape == (3, 1, cfg.vocab_size)
    other = GPTModel(cfg, tie_weights=True)
    other.load_state_dict(model.state_dict())
    assert other.out_head.weight is other.tok_emb.weight
    assert torch.equal(other.out_head.weight, model.tok_emb.weight)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_positions_per_row_for_a_kv_cache():
    model = GPTModel(SMALL).eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 3))
    got = model.embed(idx, torch.tensor([0, 5]))
    want = model.tok_emb(idx) + model.pos_emb(torch.tensor([[0, 1, 2], [5, 6, 7]]))
    assert torch.equal(got, want)
    assert torch.equal(model.embed(idx, 4), model.tok_emb(idx) + model.pos_emb(torch.arange(4, 7)))

    class Rows:  # a cache whose rows sit at positions 30 and 2: 30 + 3 tokens pass the context of 32
        pos, batch_size = torch.tensor([30, 2]), 2

    with pytest.raises(ValueError, match="KV cache holds 30 positions, so 3 more tokens would exceed"):
        model(idx, kv_cache=Rows())


def test_clear_errors():
    cfg = get_config("gpt-tiny")
    model = GPTModel(cfg)
    with pytest.raises(ValueError, match="context_length is 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="50257"):
        model(torch.tensor([[1, 2, 50257]]))
    with pytest.raises(ValueError, match="-1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="GPTConfig"):
        GPTModel({"vocab_size": 10, "context_length": 4, "emb_dim": 8, "n_heads": 2, "n_layers": 1})
    with pytest.raises(TypeError, match="GPTConfig"):
        TransformerBlock("gpt2-small")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTModel(cfg.replace(emb_dim=66))
    with pytest.raises(ValueError, match="last dimension must be 8"):
        LayerNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="emb_dim"):
        FeedForward(0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16])
def test_ids_of_small_integer_dtypes_are_refused(dtype):
    # torch.tensor([[300]], dtype=torch.uint8) already holds 44: such ids cannot be trusted.
    model = GPTModel(get_config("gpt-tiny", vocab_size=300)).eval()
    with pytest.raises(TypeError, match=rf"got {dtype}.*idx\.long\(\)"):
        model(torch.tensor([[1, 2, 3]]).to(dtype))
    with torch.no_grad():  # int32 is what nn.Embedding takes besides int64: accepted, same logits
        torch.testing.assert_close(model(torch.tensor([[1, 299]], dtype=torch.int32)), model(torch.tensor([[1, 299]])))


# --------------------------------------------------------------------------- #
# The production path: bf16 autocast and torch.compile, without changes
# --------------------------------------------------------------------------- #
def _train_steps(model, forward, steps, autocast=False):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=g)  # one batch, learned by heart
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(idx[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_trains_under_bf16_autocast():
    cfg = get_config("gpt-tiny", vocab_size=256)
    model = GPTModel(cfg)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(idx)
    assert low.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.allclose(low.float(), model(idx), atol=0.05)
    losses = _train_steps(model, model, steps=8, autocast=True)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_trains_under_torch_compile_without_graph_breaks():
    # Compiling on CPU takes ~20 s (inductor generates C++), hence "slow".
    cfg = get_config("gpt-tiny", vocab_size=256)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.allclose(compiled(idx), model(idx), atol=1e-4)
    losses = _train_steps(model, compiled, steps=3)
    assert losses[-1] < losses[0], losses
