"""LoRA adapters in Hugging Face PEFT's format, both ways, against ``peft`` itself.

(a) our adapter, saved with ``save_adapter``, loaded by ``peft.PeftModel.from_pretrained`` onto
the ``GPT2LMHeadModel`` that ``export_hf`` wrote: the same logits as our model with the adapter;
(b) an adapter made and saved by ``peft`` on a small random GPT-2, read by ``load_adapter`` into
our model built from the same weights: the same logits as ``peft``'s model.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from course_lib.config import GPTConfig  # noqa: E402
from course_lib.lora import add_lora, load_adapter, lora_layers, save_adapter, set_adapter  # noqa: E402
from course_lib.model import GPTModel  # noqa: E402
from course_lib.pretrained import export_hf, hf_to_course_state  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True:UserWarning")]

CFG = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


def _randomize_adapters(model, name, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                b = layer.lora_B[name]
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)


def _idx(seed=0, B=3, T=12):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets, rslora", [
    (("W_query", "W_key", "W_value", "out_proj"), False),
    (("W_query", "W_value", "ff"), True),                  # k left out of c_attn; both mlp layers
    (("attention", "ff", "head"), False),                  # the LM head too (lm_head, a Linear in GPT-2)
])
def test_our_adapter_in_peft_gives_our_logits(tmp_path, targets, rslora):
    torch.manual_seed(0)
    model = GPTModel(CFG, tie_weights=False).eval()
    export_hf(model, tmp_path / "base")
    add_lora(model, rank=4, alpha=8, targets=targets, rslora=rslora)
    _randomize_adapters(model, "default")
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    assert config["use_rslora"] is rslora and config["bias"] == "none"

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        before = hf(_idx()).logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = _idx()
    with torch.no_grad():
        theirs, ours = peft_model(idx).logits, model(idx)
    assert not torch.allclose(before, theirs, atol=1e-3)         # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    # and back: our own file splits c_attn into rank-4 q/k/v adapters again
    model2 = GPTModel(CFG, tie_weights=False).eval()
    model2.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    load_adapter(model2, tmp_path / "adapter", "again")
    assert all(layer.rank["again"] == 4 for layer in lora_layers(model2).values())
    with torch.no_grad():
        torch.testing.assert_close(model2(idx), ours, atol=1e-5, rtol=1e-5)


def _peft_adapter(tmp_path, seed=0, **lora_kwargs):
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(vocab_size=CFG.vocab_size, n_positions=CFG.context_length, n_embd=CFG.emb_dim,
                        n_layer=CFG.n_layers, n_head=CFG.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    base_state = {k: v.clone() for k, v in hf.state_dict().items()}
    kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True) | lora_kwargs
    pm = peft.get_peft_model(hf, peft.LoraConfig(**kwargs)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_A" in n:   # PEFT starts B (an embedding's: A) at zeros
                p.copy_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(tmp_path / "peft")
    ours = GPTModel(CFG, tie_weights=True).eval()
    ours.load_state_dict(hf_to_course_state(base_state, CFG, tied=True))
    return pm, ours


@pytest.mark.parametrize("lora_kwargs", [{}, {"use_rslora": True, "r": 3, "lora_alpha": 5},
                                         {"target_modules": ["c_attn", "wte"], "rank_pattern": {"wte": 2}}])
def test_peft_adapter_in_our_model_gives_peft_logits(tmp_path, lora_kwargs):
    pm, ours = _peft_adapter(tmp_path, **lora_kwargs)
    idx = _idx(1)
    with torch.no_grad():
        base = ours(idx)
        wrapped = load_adapter(ours, tmp_path / "peft", "peft")
        theirs, mine = pm(idx).logits, ours(idx)
    if "wte" in lora_kwargs.get("target_modules", ()):
        assert "tok_emb" in wrapped and ours.tok_emb.rank["peft"] == 2
    else:  # "c_proj" reaches both attn.c_proj and mlp.c_proj, as in PEFT
        assert "trf_blocks.1.ff.layers.2" in wrapped and "trf_blocks.1.att.out_proj" in wrapped
    assert not torch.allclose(base, mine, atol=1e-3)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    set_adapter(ours, None)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), base)


def test_adapter_for_another_base_is_refused_by_tensor_name(tmp_path):
    _, _ = _peft_adapter(tmp_path)
    wider = GPTModel(GPTConfig(101, 16, 48, 4, 2, 0.0, True))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.lora_A\.weight|h\.\d\..*lora_A"):
        load_adapter(wider, tmp_path / "peft")
    shallow = GPTModel(GPTConfig(101, 16, 32, 4, 1, 0.0, True))
    with pytest.raises(ValueError, match=r"h\.1\..*another base"):
        load_adapter(shallow, tmp_path / "peft")


@pytest.mark.parametrize("tied, targets, pattern", [
    (True, ("attention", "embedding"), {"embedding": 2}),
    (False, ("attention", "embedding"), {"embedding": 2}),
    (False, ("attention", "head", "embedding"), {"embedding": 2, "head": 3}),    # the cpu instruction recipe's shape
])
def test_our_embedding_adapter_in_peft_gives_our_logits(tmp_path, tied, targets, pattern):
    """The token embedding's adapter (``wte``, PEFT's ``lora_embedding_A/B``), at its own rank."""
    torch.manual_seed(0)
    model = GPTModel(CFG, tie_weights=tied).eval()
    export_hf(model, tmp_path / "base")
    add_lora(model, rank=4, alpha=8, targets=targets, rank_pattern=pattern)
    with torch.no_grad():
        model.tok_emb.lora_A["default"].normal_()
    _randomize_adapters(model, "default")
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "wte" in config["target_modules"] and config["rank_pattern"]["wte"] == 2
    assert config["rank_pattern"].get("lm_head") == pattern.get("head")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
