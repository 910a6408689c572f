"""course_lib.generation: greedy decoding against Hugging Face's, and the text helpers against tiktoken."""

from __future__ import annotations

import pytest
import tiktoken
import torch
import torch.nn as nn

from course_lib.config import GPTConfig, get_config
from course_lib.generation import generate_text_simple, text_to_token_ids, token_ids_to_text
from course_lib.model import GPTModel


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def gpt2_encoding():
    """tiktoken's GPT-2 encoding, the reference for the text helpers: tiktoken's own registry when its
    files are cached, else the same BPE files loaded into a tiktoken ``Encoding`` by step 2."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # offline without TIKTOKEN_CACHE_DIR
        from course_lib.tokenizers import tiktoken_gpt2
        try:
            return tiktoken_gpt2()
        except Exception as err:
            pytest.skip(f"GPT-2's BPE files are not available offline: {err}")


class LastTokenPlusOne(nn.Module):
    """A fake 'model' whose greedy choice is (last token + 1) mod vocab; records what it was fed."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        self.vocab = vocab
        self.seen: list[int] = []
        self.anchor = nn.Parameter(torch.zeros(()))  # so the model has a device

    def forward(self, idx):
        self.seen.append(idx.shape[1])
        nxt = (idx + 1) % self.vocab                            # [B, T]
        return nn.functional.one_hot(nxt, self.vocab).float()   # [B, T, V]


# --------------------------------------------------------------------------- #
# Greedy decoding
# --------------------------------------------------------------------------- #
def test_greedy_loop_and_context_cropping_on_a_known_model():
    fake = LastTokenPlusOne()
    out = generate_text_simple(fake, torch.tensor([[3, 4, 5]]), max_new_tokens=6, context_size=4)
    assert out.tolist() == [[3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert fake.seen == [3, 4, 4, 4, 4, 4]  # never more than context_size tokens


def test_context_defaults_to_the_models_context_length():
    cfg = get_config("gpt-tiny", context_length=8, vocab_size=100)
    model = GPTModel(cfg)
    out = generate_text_simple(model, torch.zeros(2, 5, dtype=torch.long), max_new_tokens=12)
    assert out.shape == (2, 17)  # ran well past the context length of 8 without an error


def test_greedy_equals_a_full_recompute_argmax_loop():
    cfg = get_config("gpt-tiny", vocab_size=300)
    model = GPTModel(cfg).eval()
    prompt = torch.randint(0, 300, (3, 4))
    out = generate_text_simple(model, prompt, max_new_tokens=5, context_size=cfg.context_length)
    ids = prompt
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    assert torch.equal(out[:, :4], prompt)


def _hf_and_ours():
    """A small random GPT-2 in transformers, its weights moved away from init, and the same weights in a GPTModel."""
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig(vocab_size=211, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=211, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).eval()
    with torch.no_grad():  # move the weights away from init so the choices are not near-ties
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = GPTModel(cfg, tie_weights=True).eval()
    sd = {}
    d = cfg.emb_dim
    for name, t in hf.state_dict().items():
        n = name.removeprefix("transformer.")
        if n.startswith("h."):
            _, i, *rest = n.split(".")
            sub, p = ".".join(rest[:-1]), rest[-1]
            pre = f"trf_blocks.{i}."
            if sub == "attn.c_attn":
                for k, w in enumerate(("W_query", "W_key", "W_value")):
                    piece = t[..., k * d:(k + 1) * d]
                    sd[f"{pre}att.{w}.{p}"] = piece.T if p == "weight" else piece
            else:
                ours = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.layers.0",
                        "mlp.c_proj": "ff.layers.2"}[sub]
                sd[pre + ours + "." + p] = t.T if p == "weight" and sub.startswith(("attn", "mlp")) else t
        else:
            sd[{"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "final_norm.weight",
                "ln_f.bias": "final_norm.bias", "lm_head.weight": "out_head.weight"}[n]] = t
    model.load_state_dict(sd)
    return hf, model


def _hf_greedy(hf, prompt, n):
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                       pad_token_id=0, eos_token_id=None)


def test_greedy_equals_hugging_face_greedy_generate():
    hf, model = _hf_and_ours()
    prompt = torch.randint(0, 211, (1, 5))
    got = generate_text_simple(model, prompt, max_new_tokens=10, context_size=32)
    assert got.tolist() == _hf_greedy(hf, prompt, 10).tolist()


@pytest.mark.parametrize("min_size", [None, 0], ids=["default-threshold", "every-layer-on-the-few-rows-route"])
def test_inference_generate_equals_hugging_face_greedy_with_and_without_the_cache(monkeypatch, min_size):
    # course_lib.inference.generate: KV cache, few-rows route and the fused Q/K/V product of fast decoding
    import course_lib.inference as inference

    if min_size is not None:
        monkeypatch.setattr(inference, "FEW_ROWS_MIN_SIZE", min_size)
    hf, model = _hf_and_ours()
    prompt = torch.randint(0, 211, (2, 5))
    want = _hf_greedy(hf, prompt, 20).tolist()
    assert inference.generate(model, prompt, 20).tolist() == want
    assert inference.generate(model, prompt, 20, use_cache=False).tolist() == want
    with torch.inference_mode():
        assert inference.generate(model, prompt, 20).tolist() == want


def test_generation_is_reproducible_and_restores_training_mode():
    cfg = get_config("gpt-tiny", drop_rate=0.5, vocab_size=500)
    model = GPTModel(cfg)
    model.train()
    prompt = torch.randint(0, 500, (2, 3))
    a = generate_text_simple(model, prompt, 8)
    b = generate_text_simple(model, prompt, 8)
    assert torch.equal(a, b)  # dropout is off while generating, even for a model in train()
    assert model.training
    model.eval()
    assert torch.equal(generate_text_simple(model, prompt, 8), a)
    assert not model.training
    assert torch.equal(generate_text_simple(model, prompt, 0), prompt)


def test_generation_errors():
    model = LastTokenPlusOne()
    with pytest.raises(ValueError, match="unsqueeze"):
        generate_text_simple(model, torch.tensor([1, 2]), 3, 4)
    with pytest.raises(TypeError, match="integer"):
        generate_text_simple(model, torch.tensor([[1.0]]), 3, 4)
    with pytest.raises(TypeError, match="text_to_token_ids"):
        generate_text_simple(model, [[1, 2]], 3, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text_simple(model, torch.tensor([[1]]), -1, 4)
    with pytest.raises(ValueError, match="context_size"):
        generate_text_simple(model, torch.tensor([[1]]), 3, 0)
    with pytest.raises(ValueError, match="context_size is required"):
        generate_text_simple(model, torch.tensor([[1]]), 3)
    with pytest.raises(TypeError, match="nn.Module"):
        generate_text_simple(lambda x: x, torch.tensor([[1]]), 3, 4)


class NaNFromStep(nn.Module):
    """LastTokenPlusOne whose logits turn NaN once the sequence reaches ``length`` tokens."""

    def __init__(self, length: int, vocab: int = 50):
        super().__init__()
        self.inner, self.length = LastTokenPlusOne(vocab), length

    def forward(self, idx):
        logits = self.inner(idx)
        return logits * float("nan") if idx.shape[1] >= self.length else logits


def test_greedy_decoding_refuses_non_finite_logits():
    # argmax of NaN logits is token 0: without the check a diverged model "says" 0, 0, 0, ...
    with pytest.raises(ValueError, match="new token 3 of 5: the model's logits are not finite.*diverged"):
        generate_text_simple(NaNFromStep(length=4), torch.tensor([[1, 2]]), 5, context_size=8)
    model = GPTModel(get_config("gpt-tiny", vocab_size=300))
    with torch.no_grad():
        model.final_norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="new token 1 of 3.*not finite"):
        generate_text_simple(model, torch.tensor([[1, 2]]), 3)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_greedy_decoding_refuses_small_id_dtypes(dtype):
    # uint8 would wrap every generated id above 255 around, silently.
    with pytest.raises(TypeError, match=rf"idx must hold integer token ids.*got {dtype}.*idx\.long\(\)"):
        generate_text_simple(LastTokenPlusOne(300), torch.tensor([[100]], dtype=dtype), 3, 4)
    model = GPTModel(get_config("gpt-tiny", vocab_size=300))
    idx = torch.tensor([[254, 3]])
    assert generate_text_simple(model, idx.int(), 4).tolist() == generate_text_simple(model, idx, 4).tolist()


# --------------------------------------------------------------------------- #
# Text helpers
# --------------------------------------------------------------------------- #
def test_text_round_trip_with_the_default_tokenizer(gpt2_encoding):
    text = "Every effort moves you<|endoftext|> Hello, world."
    ids = text_to_token_ids(text)
    assert ids.shape == (1, len(gpt2_encoding.encode(text, allowed_special={"<|endoftext|>"})))
    assert ids.dtype == torch.long
    assert ids[0].tolist() == gpt2_encoding.encode(text, allowed_special={"<|endoftext|>"})
    assert 50256 in ids[0].tolist()
    assert token_ids_to_text(ids) == text
    assert token_ids_to_text(ids[0]) == text
    assert token_ids_to_text(ids[0].tolist()) == text


def test_text_helpers_take_any_tokenizer(gpt2_encoding):
    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    assert text_to_token_ids("abc", Chars()).tolist() == [[97, 98, 99]]
    assert token_ids_to_text(torch.tensor([[97, 98]]), Chars()) == "ab"
    assert text_to_token_ids("hi there", gpt2_encoding)[0].tolist() == gpt2_encoding.encode("hi there")


def test_untrained_model_makes_text_of_the_right_length(gpt2_encoding):
    cfg = get_config("gpt-tiny")
    model = GPTModel(cfg)
    out = generate_text_simple(model, text_to_token_ids("Hello, I am", gpt2_encoding), 6)
    assert out.shape == (1, 4 + 6)
    assert isinstance(token_ids_to_text(out, gpt2_encoding), str)


def test_token_ids_past_the_vocabulary_are_named(gpt2_encoding):
    for ids in ([15496, 50257], torch.tensor([[15496, 99999]]), [-1]):
        bad = ids[0, 1].item() if isinstance(ids, torch.Tensor) else ids[-1]
        with pytest.raises(ValueError, match=rf"token id {bad} is not in the tokenizer's vocabulary of 50257 ids"):
            token_ids_to_text(ids, gpt2_encoding)
    with pytest.raises(KeyError):  # what tiktoken itself does: the reason for the check
        gpt2_encoding.decode([15496, 50257])
    assert token_ids_to_text([15496, 50256], gpt2_encoding) == gpt2_encoding.decode([15496, 50256])


def test_a_tokenizer_name_or_class_is_not_a_tokenizer():
    from course_lib.tokenizers import GPT2Tokenizer

    # "gpt2" has str.encode, which used to be called with the text as its encoding name.
    for call in (lambda: text_to_token_ids("hi", "gpt2"), lambda: text_to_token_ids("hi", b"gpt2")):
        with pytest.raises(TypeError, match="tokenizer must be a tokenizer object with .encode.*'gpt2'"):
            call()
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer object with .decode.*tiktoken.get_encoding"):
        token_ids_to_text([1, 2], "gpt2")
    with pytest.raises(TypeError, match="not the class GPT2Tokenizer"):
        text_to_token_ids("hi", GPT2Tokenizer)


def test_text_helper_errors(gpt2_encoding):
    with pytest.raises(TypeError, match="str"):
        text_to_token_ids(123, gpt2_encoding)
    with pytest.raises(ValueError, match="one at a time"):
        token_ids_to_text(torch.zeros(2, 3, dtype=torch.long), gpt2_encoding)
    with pytest.raises(TypeError, match="integer"):
        token_ids_to_text(torch.zeros(1, 3), gpt2_encoding)
    with pytest.raises(TypeError, match="decode"):
        token_ids_to_text([1, 2], tokenizer=object())
    with pytest.raises(TypeError, match="encode"):
        text_to_token_ids("hi", tokenizer=object())
