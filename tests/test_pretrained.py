"""GPT-2 weights in and out: parity with Hugging Face transformers, and named errors.

Real GPT-2 weights cannot be downloaded in CI, so the parity tests use a randomly initialised
``GPT2LMHeadModel`` with a small config, built offline and saved with ``save_pretrained``: the
mapping does not depend on the size.
"""

from __future__ import annotations

import json

import pytest
import torch

import course_lib.pretrained as pretrained
from course_lib.config import GPTConfig
from course_lib.generation import generate_text_simple
from course_lib.inference import generate
from course_lib.model import GPTModel
from course_lib.pretrained import export_hf, load_gpt2

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()
SMALL = dict(vocab_size=301, n_positions=32, n_embd=48, n_layer=3, n_head=4)


def _hf_model(tied=True, seed=0, noise=0.1):
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # move the weights away from their init so that every tensor shows in the logits
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * noise)
    return hf


def _ids(n=2, t=SMALL["n_positions"], seed=1):
    return torch.randint(0, SMALL["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- #
# Hugging Face -> ours
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_pretrained_folder_loads_with_the_same_logits(tmp_path, tied):
    hf = _hf_model(tied)
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    assert isinstance(ours, GPTModel) and not ours.training
    assert ours.tie_weights == tied
    assert ours.cfg == GPTConfig(301, 32, 48, 4, 3, 0.1, True)
    idx = _ids()
    with torch.no_grad():
        want, got = hf(idx).logits, ours(idx)
    assert want.std() > 0.5  # logits that vary, so that a mistake would show
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_twenty_greedy_tokens_equal_hugging_face_generate(tmp_path):
    hf = _hf_model(noise=0.3)
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    prompt = _ids(1, 5, seed=3)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
                           do_sample=False, pad_token_id=0)
    got = generate_text_simple(ours, prompt, 20)
    assert got.shape == (1, 25)
    assert got.tolist() == want.tolist()
    assert generate(ours, prompt, 20, use_cache=True).tolist() == want.tolist()  # with our KV cache too
    assert len(set(got[0, 5:].tolist())) > 3  # not one token repeated: a real comparison


def test_original_openai_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """OpenAI's files on the hub have no ``transformer.`` prefix and carry the causal masks."""
    hf = _hf_model()
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    n = SMALL["n_positions"]
    for i in range(SMALL["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **SMALL}))
    ours = load_gpt2(tmp_path)
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_registry_names_fetch_the_right_file_and_config(tmp_path, monkeypatch):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    asked = []

    def fake_fetch(name, **kwargs):
        asked.append(name)
        return tmp_path / "model.safetensors"

    monkeypatch.setattr("course_lib.data.fetch", fake_fetch)
    monkeypatch.setitem(pretrained.GPT_CONFIGS, "gpt2-medium", GPTConfig(301, 32, 48, 4, 3, 0.1, True))
    model = load_gpt2("gpt2-medium")
    assert asked == ["gpt2-medium-weights"]
    assert model.tie_weights and model.cfg.emb_dim == 48
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), hf(_ids()).logits, atol=1e-5, rtol=1e-5)
    # the real presets: the right entries and configs
    assert {k: v for k, v in pretrained.GPT2_NAMES.items()}["gpt2"] == ("gpt2-weights", "gpt2-small")
    assert pretrained.GPT2_NAMES["gpt2-xl"] == ("gpt2-xl-weights", "gpt2-xl")


# --------------------------------------------------------------------------- #
# Errors that name the tensor
# --------------------------------------------------------------------------- #
def _saved(tmp_path, **changes):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for k, v in changes.items():
        if v is None:
            del state[k]
        else:
            state[k] = v
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    folder = _saved(tmp_path, **{"transformer.h.1.mlp.c_fc.bias": None})
    with pytest.raises(ValueError, match=r"'h\.1\.mlp\.c_fc\.bias'"):
        load_gpt2(folder)


def test_misshapen_tensor_is_named(tmp_path):
    folder = _saved(tmp_path, **{"transformer.h.2.attn.c_attn.weight": torch.zeros(48, 100)})
    with pytest.raises(ValueError, match=r"'h\.2\.attn\.c_attn\.weight' has shape \[48, 100\], expected \[48, 144\]"):
        load_gpt2(folder)


def test_unknown_tensor_is_named(tmp_path):
    folder = _saved(tmp_path, **{"transformer.h.7.ln_1.weight": torch.zeros(48)})
    with pytest.raises(ValueError, match=r"h\.7\.ln_1\.weight"):
        load_gpt2(folder)


def test_truncated_weights_file(tmp_path):
    folder = _saved(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        load_gpt2(folder)


def test_a_truncated_registry_file_is_named_like_a_folders(tmp_path, monkeypatch):
    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setattr("course_lib.data.fetch", lambda name, **kwargs: weights)
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file .*truncated"):
        load_gpt2("gpt2")


def test_bad_names_and_configs(tmp_path):
    with pytest.raises(ValueError, match="gpt2-medium"):
        load_gpt2("gpt3")
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        load_gpt2(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        load_gpt2(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt2(folder)


@pytest.mark.parametrize("write, says", [
    (lambda f, cfg: f.write_bytes(b"\xff\xfe{ not text"), "not a text file"),
    (lambda f, cfg: f.write_text('{"n_embd": 48,', encoding="utf-8"), "not valid JSON"),
    (lambda f, cfg: f.write_text("[48, 3]", encoding="utf-8"), "JSON list, not an object"),
    (lambda f, cfg: f.write_text(json.dumps({k: v for k, v in cfg.items() if k != "n_embd"})), r"lacks \['n_embd'\]"),
    (lambda f, cfg: f.write_text(json.dumps({**cfg, "n_embd": "48"})), "n_embd is \"48\", but must be a whole number"),
    (lambda f, cfg: f.write_text(json.dumps({**cfg, "n_head": True})), "n_head is true, but must be a whole number"),
    (lambda f, cfg: f.write_text(json.dumps({**cfg, "n_positions": None})), "n_positions is null"),
    (lambda f, cfg: f.write_text(json.dumps({**cfg, "layer_norm_epsilon": "1e-5"})), "layer_norm_epsilon"),
    (lambda f, cfg: f.write_text(json.dumps({**cfg, "resid_pdrop": None})), "resid_pdrop is null"),
    (lambda f, cfg: f.write_text(json.dumps({**cfg, "tie_word_embeddings": "false"})), "must be true or false"),
    (lambda f, cfg: f.write_text(json.dumps({**cfg, "n_head": 5})), "divisible by n_heads"),
    (lambda f, cfg: f.write_text(json.dumps({**cfg, "n_layer": 0})), "n_layers must be a positive integer"),
], ids=["not-utf8", "not-json", "a-list", "missing-key", "str-size", "bool-size", "null-size", "str-eps",
        "null-dropout", "str-tie", "heads-do-not-divide", "zero-layers"])
def test_broken_config_json_is_named(tmp_path, write, says):
    folder = _saved(tmp_path)
    config_file = folder / "config.json"
    write(config_file, json.loads(config_file.read_text()))
    with pytest.raises(ValueError, match=says) as err:
        load_gpt2(folder)
    assert str(config_file) in str(err.value)


def test_broken_shard_index_is_named(tmp_path):
    folder = _saved(tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = folder / "model.safetensors.index.json"
    for text, says in [("{oops", "not valid JSON"), ('{"metadata": {}}', "weight_map"), ("[1]", "weight_map")]:
        index.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=says) as err:
            load_gpt2(folder)
        assert str(index) in str(err.value)
    index.write_text(json.dumps({"weight_map": {"wte.weight": "model-00001-of-00001.safetensors"}}))
    assert load_gpt2(folder).cfg.n_layers == SMALL["n_layer"]


# --------------------------------------------------------------------------- #
# Ours -> Hugging Face
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv-bias", "no-qkv-bias"])
def test_export_hf_is_loaded_by_transformers_with_our_logits(tmp_path, tied, qkv_bias):
    torch.manual_seed(0)
    cfg = GPTConfig(301, 32, 48, 4, 3, 0.0, qkv_bias)
    ours = GPTModel(cfg, tie_weights=tied).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_hf(ours, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tied
    idx = _ids()
    with torch.no_grad():
        want = ours(idx)
        torch.testing.assert_close(hf(idx).logits, want, atol=1e-5, rtol=1e-5)
        back = load_gpt2(tmp_path / "export")  # and back into ours
        torch.testing.assert_close(back(idx), want, atol=1e-6, rtol=1e-6)


def test_export_never_overwrites_silently(tmp_path):
    model = GPTModel(GPTConfig(301, 32, 48, 4, 1, 0.0, True))
    export_hf(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hf(GPTModel(GPTConfig(301, 32, 48, 4, 1, 0.0, True)), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    export_hf(model, tmp_path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_refuses_string_flags_nan_weights_and_adapters_it_cannot_write(tmp_path):
    model = GPTModel(GPTConfig(301, 32, 48, 4, 1, 0.0, True))
    export_hf(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    other = GPTModel(GPTConfig(301, 32, 48, 4, 1, 0.0, True))
    with pytest.raises(TypeError, match="overwrite must be True or False"):     # "no" replaced the export
        export_hf(other, tmp_path, overwrite="no")
    with pytest.raises(TypeError, match="include_tokenizer must be True or False"):
        export_hf(other, tmp_path / "b", include_tokenizer="no")
    with torch.no_grad():
        other.final_norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="nan or inf.*final_norm.weight"):
        export_hf(other, tmp_path, overwrite=True)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    from course_lib.lora import add_lora

    add_lora(model, rank=2, alpha=4)
    with pytest.raises(ValueError, match="LoRA adapters.*unload_lora"):        # a KeyError before
        export_hf(model, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_load_gpt2_takes_a_dtype_name_and_names_a_bad_dtype_or_device(tmp_path):
    export_hf(GPTModel(GPTConfig(301, 32, 48, 4, 1, 0.0, True)), tmp_path)
    assert next(load_gpt2(tmp_path, dtype="bfloat16").parameters()).dtype == torch.bfloat16   # an "Invalid device
    with pytest.raises(TypeError, match="floating-point torch dtype"):                       # string" error before
        load_gpt2(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="'gpu'"):
        load_gpt2(tmp_path, device="gpu")


def test_export_with_gpt2_vocabulary_includes_a_tokenizer_transformers_reads(tmp_path):
    tiktoken_gpt2 = pytest.importorskip("course_lib.tokenizers").tiktoken_gpt2
    model = GPTModel(GPTConfig(50257, 16, 8, 2, 1, 0.0, True), tie_weights=True)
    export_hf(model, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Every effort moves you, naturally.<|endoftext|> Hello!"
    assert tok(text)["input_ids"] == tiktoken_gpt2().encode(text, allowed_special="all")
