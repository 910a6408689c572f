"""Steps 1-5, bad input: tokenizers, text data, embeddings, attention, the model, generation,
the bigram model and the anatomy — clear errors that name the argument, never silent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from course_lib import anatomy
from course_lib.attention import MultiHeadAttention
from course_lib.bigram import BigramLM, apply_temperature
from course_lib.config import GPTConfig
from course_lib.embeddings import sinusoidal_positions
from course_lib.generation import text_to_token_ids, token_ids_to_text
from course_lib.model import GELU, FeedForward, GPTModel, LayerNorm, count_parameters, model_memory_bytes
from course_lib.text_data import GPTDataset, create_dataloader, encode_text, split_text
from course_lib.tokenizers import BPETokenizer, GPT2Tokenizer, RegexTokenizer, bytes_to_unicode

CFG = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False)
NAN, INF = math.nan, math.inf


class _FloatTok:
    """A custom tokenizer whose encode returns floats."""

    def encode(self, text):
        return [1.7, 2.2, 3.0, 4.9]


class _NumpyTok:
    def encode(self, text):
        return np.arange(len(text), dtype=np.int64)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG).eval()


def _byte_gpt2() -> GPT2Tokenizer:
    """GPT-2's tokenizer class with the 256 bytes and no merges (no files needed)."""
    return GPT2Tokenizer({c: b for b, c in bytes_to_unicode().items()}, [])


# --------------------------------------------------------------------------- #
# 1. float token ids from a custom tokenizer are refused, not truncated
# --------------------------------------------------------------------------- #
def test_float_token_ids_from_a_tokenizer_are_refused_not_truncated():
    with pytest.raises(TypeError, match=r"token id must be an integer, got the float 1\.7.*tokenizer\.encode"):
        GPTDataset("abc", 2, 1, tokenizer=_FloatTok())
    with pytest.raises(TypeError, match=r"float 1\.7.*token ids must be integers"):
        text_to_token_ids("abc", _FloatTok())
    with pytest.raises(TypeError, match="tokenizer.encode must return a list of int token ids"):
        encode_text("abc", type("T", (), {"encode": lambda self, text: None})())
    assert encode_text("abcd", _NumpyTok()) == [0, 1, 2, 3]  # NumPy integers are still fine


# --------------------------------------------------------------------------- #
# 2. decode refuses float and bool ids
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("make", [lambda: BPETokenizer([]), _byte_gpt2], ids=["bpe", "gpt2"])
def test_byte_level_decode_refuses_float_and_bool_ids(make):
    tok = make()
    with pytest.raises(TypeError, match=r"token ids must be integers, got the float 104\.0 at position 0"):
        tok.decode([104.0])
    with pytest.raises(TypeError, match=r"float 104\.0 .*dtype torch\.float32: use ids\.long\(\)"):
        tok.decode(torch.tensor([104.0, 105.0]))
    with pytest.raises(TypeError, match="token ids must be integers, got the bool True"):
        tok.decode([True])
    with pytest.raises(TypeError, match="token ids must be integers"):
        tok.decode_tokens_bytes([104.5])
    assert tok.decode([104, np.int64(105)]) == tok.decode(torch.tensor([104, 105])) == "hi"


def test_regex_decode_refuses_float_ids_and_none():
    tok = RegexTokenizer.from_text("a b c")
    with pytest.raises(TypeError, match=r"token ids must be integers, got the float 1\.0"):
        tok.decode([1.0])
    with pytest.raises(TypeError, match="ids must be a flat sequence of int token ids, got NoneType"):
        tok.decode(None)
    assert tok.decode([0, np.int64(1)]) == "a b"


# --------------------------------------------------------------------------- #
# 3. BPETokenizer.save does not destroy a file it did not write
# --------------------------------------------------------------------------- #
def test_bpe_save_refuses_to_replace_another_file(tmp_path):
    tok = BPETokenizer.train("aaabdaaabac", 258)
    other = tmp_path / "notes.json"
    other.write_text('{"my": "notes"}', encoding="utf-8")
    with pytest.raises(FileExistsError, match="not a tokenizer file written by BPETokenizer.save.*overwrite=True"):
        tok.save(other)
    assert other.read_text(encoding="utf-8") == '{"my": "notes"}'
    assert BPETokenizer.load(tok.save(other, overwrite=True)).merges == tok.merges
    path = tok.save(tmp_path / "tok.json")
    BPETokenizer([]).save(path)  # a tokenizer file of ours is replaced (a notebook cell run again)
    assert BPETokenizer.load(path).merges == []
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        tok.save(path, overwrite="yes")


# --------------------------------------------------------------------------- #
# 4. string flags are refused, not read as True
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("call, name", [
    (lambda: MultiHeadAttention(8, 8, 4, 0.0, 2, qkv_bias="no"), "qkv_bias"),
    (lambda: MultiHeadAttention(8, 8, 4, 0.0, 2, use_sdpa="False"), "use_sdpa"),
    (lambda: count_parameters(torch.nn.Linear(2, 2), trainable_only="no"), "trainable_only"),
    (lambda: model_memory_bytes(torch.nn.Linear(2, 2), include_buffers="no"), "include_buffers"),
    (lambda: anatomy.count_parameters(CFG, tied="no"), "tied"),
    (lambda: anatomy.flops_per_token(CFG, training="no"), "training"),
    (lambda: BPETokenizer.train("aaab", 258, verbose="no"), "verbose"),
    (lambda: BPETokenizer.train("aaab", 258, progress="no"), "progress"),
], ids=["qkv_bias", "use_sdpa", "trainable_only", "include_buffers", "tied", "training", "verbose", "progress"])
def test_string_flags_are_refused(call, name):
    with pytest.raises(TypeError, match=f"{name} must be True or False, got '"):
        call()


# --------------------------------------------------------------------------- #
# 5. NaN, inf and non-integers are refused
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("call, error, match", [
    (lambda: apply_temperature(torch.tensor([0.5, 0.5]), NAN), ValueError, "temperature must be a finite number >= 0"),
    (lambda: apply_temperature(torch.tensor([0.5, 0.5]), INF), ValueError, "temperature must be a finite number"),
    (lambda: BigramLM(smoothing=NAN), ValueError, "smoothing must be a finite number >= 0"),
    (lambda: BigramLM(smoothing=INF), ValueError, "smoothing must be a finite number >= 0"),
    (lambda: sinusoidal_positions(4, 4, base=NAN), ValueError, "base must be a finite number"),
    (lambda: LayerNorm(4, eps=INF), ValueError, "eps must be a finite number > 0.*1e-5"),
    (lambda: anatomy.score_plan(CFG, 1000, NAN), ValueError, "budget_flops must be a finite number > 0"),
    (lambda: anatomy.flops_per_token(CFG, n_ctx=2.9), TypeError, "n_ctx must be an integer, got the float 2.9"),
    (lambda: anatomy.training_flops(CFG, 2.5), TypeError, "n_tokens must be an integer, got the float 2.5"),
], ids=["temperature-nan", "temperature-inf", "smoothing-nan", "smoothing-inf", "base-nan", "eps-inf",
        "budget-nan", "n_ctx-float", "n_tokens-float"])
def test_nan_inf_and_fractions_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- #
# 6. tokenizer arguments
# --------------------------------------------------------------------------- #
def test_tokenizer_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="pattern is empty.*encode to \\[\\]"):
        BPETokenizer([], pattern="")
    with pytest.raises(ValueError, match="special_tokens contains an empty string"):
        RegexTokenizer.from_text("a b", special_tokens=[""])
    with pytest.raises(TypeError, match="special_tokens must contain strings only, got the int 1"):
        RegexTokenizer.from_text("a b", special_tokens=[1])
    with pytest.raises(TypeError, match="special_tokens must be a sequence of strings.*got NoneType"):
        RegexTokenizer.from_text("a b", special_tokens=None)
    with pytest.raises(TypeError, match="callback must be None or a function.*got str"):
        BPETokenizer.train("aaab", 258, callback="x")
    with pytest.raises(TypeError, match="documents must be a list of strings, got NoneType"):
        RegexTokenizer.from_text("a b").encode_documents(None)
    with pytest.raises(TypeError, match="encoder must be a dict token -> id.*from_files"):
        GPT2Tokenizer([], [])
    with pytest.raises(TypeError, match=r"bpe_merges\[0\] must be a \(left, right\) pair of strings"):
        GPT2Tokenizer({c: b for b, c in bytes_to_unicode().items()}, ["ab"])


# --------------------------------------------------------------------------- #
# 7. an unfitted bigram model says so
# --------------------------------------------------------------------------- #
def test_unfitted_bigram_model_says_fit_first():
    with pytest.raises(RuntimeError, match="not been fitted yet"):
        BigramLM().sample("a", 1)
    with pytest.raises(RuntimeError, match="not been fitted yet"):
        BigramLM().next_token_probs("a")


# --------------------------------------------------------------------------- #
# 8. input dtypes of the layers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("layer, dtype", [
    (lambda: MultiHeadAttention(4, 4, 4, 0.0, 1), torch.float64),
    (lambda: MultiHeadAttention(4, 4, 4, 0.0, 1), torch.long),
    (lambda: FeedForward(4), torch.float64),
    (lambda: LayerNorm(4), torch.long),
], ids=["mha-float64", "mha-long", "ff-float64", "layernorm-long"])
def test_layers_name_the_dtype_they_expect(layer, dtype):
    with pytest.raises(TypeError, match=rf"expects an input of dtype torch\.float32 \(its parameters' dtype\), "
                                        rf"but x has dtype {dtype}; convert the input with x\.to\(torch\.float32\)"):
        layer()(torch.zeros(1, 2, 4, dtype=dtype))


def test_gelu_refuses_an_integer_tensor():
    with pytest.raises(TypeError, match=r"GELU expects a floating-point tensor, got dtype torch\.int64"):
        GELU()(torch.zeros(2, dtype=torch.long))


def test_mixed_precision_that_torch_supports_still_runs():
    x = torch.randn(1, 2, 4, dtype=torch.bfloat16)
    assert LayerNorm(4)(x).dtype == torch.bfloat16                  # F.layer_norm: bf16 input, fp32 weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FeedForward(4)(torch.randn(1, 2, 4)).dtype == torch.bfloat16
        assert MultiHeadAttention(4, 4, 4, 0.0, 1)(x).shape == (1, 2, 4)
    assert FeedForward(4).double()(torch.randn(1, 2, 4, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------- #
# 10. a seed torch cannot take
# --------------------------------------------------------------------------- #
def test_create_dataloader_refuses_a_seed_out_of_range():
    with pytest.raises(ValueError, match=r"seed must be an integer from -2\*\*63 to 2\*\*64 - 1"):
        create_dataloader(list(range(20)), batch_size=1, max_length=4, stride=4, seed=2**70)
    assert len(create_dataloader(list(range(20)), batch_size=1, max_length=4, stride=4, seed=2**64 - 1)) == 4


# --------------------------------------------------------------------------- #
# 11. GPTModel.embed and the KV cache argument
# --------------------------------------------------------------------------- #
def test_embed_and_kv_cache_arguments():
    model, idx = _model(), torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="start_pos must be at least 0, got -1"):
        model.embed(idx, -1)
    with pytest.raises(ValueError, match="start_pos=14 plus 3 tokens runs past the model's context_length of 16"):
        model.embed(idx, 14)
    with pytest.raises(TypeError, match="kv_cache must be None or a course_lib.inference.KVCache.*got str"):
        model(idx, kv_cache="x")
    with pytest.raises(TypeError, match="kv_cache must be None or a course_lib.inference.KVCache.*got str"):
        MultiHeadAttention(4, 4, 4, 0.0, 1)(torch.zeros(1, 2, 4), kv_cache="x")


# --------------------------------------------------------------------------- #
# 12. numbers given as str, None or NaN to the bigram model and the anatomy
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("call, error, match", [
    (lambda: BigramLM(smoothing="1"), ValueError, "smoothing must be a finite number >= 0, got the str '1'"),
    (lambda: BigramLM(smoothing=None), ValueError, "smoothing must be a finite number >= 0, got None"),
    (lambda: BigramLM().fit(list("hello")).sample("l", "3"), ValueError, "n must be an integer >= 0, got '3'"),
    (lambda: BigramLM().fit(list("hello")).sample("l", NAN), ValueError, "n must be an integer >= 0, got nan"),
    (lambda: BigramLM().fit(list("hello")).sample("l", 3, temperature="1"), ValueError,
     "temperature must be a finite number >= 0, got the str '1'"),
    (lambda: apply_temperature(torch.tensor([1.0]), None), ValueError, "temperature must be a finite number"),
    (lambda: anatomy.training_flops(CFG, "10"), TypeError, "n_tokens must be an integer, got the str '10'"),
    (lambda: anatomy.training_flops(CFG, NAN), TypeError, "n_tokens must be an integer, got the float nan"),
    (lambda: anatomy.score_plan(CFG, "10", 1e18), TypeError, "n_tokens must be an integer"),
    (lambda: anatomy.score_plan(CFG, 10, None), ValueError, "budget_flops must be a finite number > 0, got None"),
    (lambda: anatomy.flops_per_token(CFG, n_ctx="3"), TypeError, "n_ctx must be an integer, got the str '3'"),
], ids=["smoothing-str", "smoothing-none", "n-str", "n-nan", "temperature-str", "temperature-none",
        "n_tokens-str", "n_tokens-nan", "score-n_tokens-str", "budget-none", "n_ctx-str"])
def test_numbers_given_as_strings_none_or_nan(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- #
# 13. NumPy numbers are accepted where a Python number is
# --------------------------------------------------------------------------- #
def test_numpy_numbers_are_accepted():
    assert split_text("abcdefgh", np.float32(0.5)) == ("abcd", "efgh")
    assert torch.equal(sinusoidal_positions(4, 4, base=np.float64(100.0)), sinusoidal_positions(4, 4, base=100.0))
    assert LayerNorm(4, eps=np.float32(1e-5)).eps == pytest.approx(1e-5)
    tok = RegexTokenizer.from_text("a b c")
    assert token_ids_to_text([np.int64(0), np.int64(1)], tok) == "a b"
    with pytest.raises(TypeError, match=r"ids\[0\] must be an integer, got the float 0\.0"):
        token_ids_to_text([0.0], tok)
