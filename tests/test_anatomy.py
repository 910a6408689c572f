"""Parameter, memory and FLOP anatomy against Hugging Face's GPT-2 and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch

from course_lib import anatomy
from course_lib.config import GPT_CONFIGS, GPTConfig

transformers = pytest.importorskip("transformers")


def hf_model(cfg: GPTConfig, tied: bool = True, device: str = "meta", attn: str = "eager"):
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length,
                                     n_embd=cfg.emb_dim, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                                     tie_word_embeddings=tied, attn_implementation=attn)
    with torch.device(device):
        return transformers.GPT2LMHeadModel(hf_cfg)


def unique_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_counts_equal_hf_gpt2_on_meta_device(name):
    cfg = GPT_CONFIGS[name]
    assert anatomy.count_parameters(cfg, tied=True) == unique_params(hf_model(cfg, tied=True))
    assert anatomy.count_parameters(cfg, tied=True) == anatomy.PUBLISHED_GPT2_PARAMETERS[name]


def test_untied_head_adds_one_embedding_matrix():
    cfg = GPTConfig(vocab_size=1000, context_length=32, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)
    assert anatomy.count_parameters(cfg, tied=False) == unique_params(hf_model(cfg, tied=False))
    assert anatomy.count_parameters(cfg, tied=False) - anatomy.count_parameters(cfg) == 1000 * 64


def test_components_by_hand_for_a_toy_config():
    cfg = GPTConfig(vocab_size=10, context_length=4, emb_dim=2, n_heads=1, n_layers=1, qkv_bias=False)
    c = anatomy.parameter_counts(cfg, tied=False)
    assert (c["token_embedding"], c["position_embedding"]) == (20, 8)
    assert c["attention"] == 3 * 4 + 4 + 2           # three 2x2 projections, 2x2 out_proj + bias
    assert c["feed_forward"] == 2 * 8 + 8 + 8 * 2 + 2  # 2->8 (+bias), 8->2 (+bias)
    assert c["layer_norms"] == 2 * 4 + 4
    assert c["total"] == 20 + 8 + 18 + 42 + 12 + 20


def test_memory():
    cfg = GPT_CONFIGS["gpt2-small"]
    assert anatomy.memory_bytes(cfg, "float32") == 124_439_808 * 4
    assert anatomy.memory_bytes(cfg, "bf16") == 124_439_808 * 2
    assert anatomy.training_memory_bytes(cfg) == 4 * 124_439_808 * 4
    with pytest.raises(ValueError, match="dtype"):
        anatomy.memory_bytes(cfg, "float7")


def test_forward_flops_equal_torch_flop_counter():
    """torch.utils.flop_counter counts every matmul of a real forward pass (2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = GPTConfig(vocab_size=500, context_length=32, emb_dim=64, n_heads=4, n_layers=3, qkv_bias=True)
    model = hf_model(cfg, device="cpu", attn="eager").eval()
    T = cfg.context_length
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, T, dtype=torch.long))
    assert counter.get_total_flops() == T * anatomy.flops_per_token(cfg, training=False)


def test_training_is_three_forward_passes_and_6ND():
    cfg = GPT_CONFIGS["gpt2-small"]
    fwd = anatomy.flops_per_token(cfg, training=False)
    assert anatomy.flops_per_token(cfg) == 3 * fwd
    n = anatomy.matmul_parameters(cfg)
    assert anatomy.training_flops(cfg, 1000) == 1000 * (6 * n + 12 * 12 * 1024 * 768)


def test_score_plan():
    cfg = GPT_CONFIGS["gpt2-small"]
    n = anatomy.count_parameters(cfg)
    tokens = 20 * n
    budget = anatomy.training_flops(cfg, tokens) / 0.95
    plan = anatomy.score_plan(cfg, tokens, budget)
    assert plan.score == pytest.approx(100.0) and plan.tokens_per_parameter == pytest.approx(20.0)
    assert anatomy.score_plan(cfg, tokens, budget / 2).score == 0.0  # over budget
    assert anatomy.score_plan(cfg, 2 * n, budget).score < 10        # ten times too few tokens
    with pytest.raises(ValueError):
        anatomy.score_plan(cfg, tokens, 0)
    with pytest.raises(TypeError):
        anatomy.count_parameters({"emb_dim": 768})
