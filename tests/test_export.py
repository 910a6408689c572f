"""`course_lib.export.export_gguf` (step 9): GGUF files for llama.cpp and Ollama, read back with ``gguf``'s reader.

The references are independent of the writer: every GGUF tensor against the PyTorch layer it must
hold, in the shape llama.cpp's GPT-2 loader asks for (a table written here); every token's bytes and
every merge against tiktoken; the logits of ``transformers``' GGUF loader (which follows llama.cpp's
conventions) against ours; and llama-cpp-python's logits where it is installed (skipped otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from course_lib.config import GPTConfig  # noqa: E402
from course_lib.export import export_gguf  # noqa: E402
from course_lib.lora import add_lora  # noqa: E402
from course_lib.model import GPTModel  # noqa: E402

# GPT-2's vocabulary (the tokenizer goes in the file), a tiny body, a context length other than 1024
CFG = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=False)
F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16


def _model(cfg, tied, seed):
    torch.manual_seed(seed)
    model = GPTModel(cfg, tie_weights=tied).eval()
    with torch.no_grad():  # LayerNorms start at 1 / 0: make them tell weight from bias
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def untied_f32(tmp_path_factory):
    """No query/key/value biases, an untied head, float32."""
    torch.set_num_threads(1)
    model = _model(CFG, tied=False, seed=0)
    path = export_gguf(model, tmp_path_factory.mktemp("gguf") / "untied.gguf")
    return model, path, gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def tied_f16(tmp_path_factory):
    """Query/key/value biases, the head tied to the embedding, float16, context 24."""
    model = _model(CFG.replace(qkv_bias=True, context_length=24), tied=True, seed=1)
    path = export_gguf(model, tmp_path_factory.mktemp("gguf") / "tied.gguf", dtype="f16", name="tiny tied")
    return model, path, gguf.GGUFReader(path)


def _expected(model: GPTModel) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """llama.cpp's GPT-2 tensors: name -> (what it holds, its ``ne`` as llama.cpp's loader creates it)."""
    d, V, ctx, ff = model.cfg.emb_dim, model.cfg.vocab_size, model.cfg.context_length, 4 * model.cfg.emb_dim
    out = {"token_embd.weight": (model.tok_emb.weight, (d, V)),
           "position_embd.weight": (model.pos_emb.weight, (d, ctx)),
           "output_norm.weight": (model.final_norm.weight, (d,)), "output_norm.bias": (model.final_norm.bias, (d,)),
           "output.weight": (model.out_head.weight, (d, V))}
    for i, blk in enumerate(model.trf_blocks):
        att = blk.att
        qkv_b = (torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias]) if att.W_query.bias is not None
                 else torch.zeros(3 * d))
        out |= {f"blk.{i}.attn_norm.weight": (blk.norm1.weight, (d,)),
                f"blk.{i}.attn_norm.bias": (blk.norm1.bias, (d,)),
                f"blk.{i}.attn_qkv.weight": (torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight]),
                                             (d, 3 * d)),
                f"blk.{i}.attn_qkv.bias": (qkv_b, (3 * d,)),
                f"blk.{i}.attn_output.weight": (att.out_proj.weight, (d, d)),
                f"blk.{i}.attn_output.bias": (att.out_proj.bias, (d,)),
                f"blk.{i}.ffn_norm.weight": (blk.norm2.weight, (d,)), f"blk.{i}.ffn_norm.bias": (blk.norm2.bias, (d,)),
                f"blk.{i}.ffn_up.weight": (blk.ff.layers[0].weight, (d, ff)),
                f"blk.{i}.ffn_up.bias": (blk.ff.layers[0].bias, (ff,)),
                f"blk.{i}.ffn_down.weight": (blk.ff.layers[2].weight, (ff, d)),
                f"blk.{i}.ffn_down.bias": (blk.ff.layers[2].bias, (d,))}
    return out


@pytest.mark.parametrize("case", ["untied_f32", "tied_f16"])
def test_every_tensor_in_llama_cpp_layout(case, request):
    model, _, reader = request.getfixturevalue(case)
    half = case.endswith("f16")
    expected = _expected(model)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(expected)
    for name, (value, ne) in expected.items():
        t = tensors[name]
        assert tuple(int(n) for n in t.shape) == ne, name
        in_f16 = half and value.dim() == 2 and name != "position_embd.weight"   # as llama.cpp's converter
        assert t.tensor_type == (F16 if in_f16 else F32), name
        want = value.detach().numpy()
        np.testing.assert_array_equal(t.data.reshape(want.shape), want.astype(np.float16) if in_f16 else want,
                                      err_msg=name)
    if not model.cfg.qkv_bias:
        assert not tensors["blk.0.attn_qkv.bias"].data.any()


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("case", ["untied_f32", "tied_f16"])
def test_metadata(case, request):
    model, path, reader = request.getfixturevalue(case)
    cfg = model.cfg
    K = gguf.Keys
    arch = "gpt2"
    assert _field(reader, K.General.ARCHITECTURE) == arch
    assert _field(reader, K.General.NAME) == ("tiny tied" if case == "tied_f16" else "course_lib GPT")
    assert _field(reader, K.LLM.CONTEXT_LENGTH.format(arch=arch)) == cfg.context_length
    assert _field(reader, K.LLM.EMBEDDING_LENGTH.format(arch=arch)) == cfg.emb_dim
    assert _field(reader, K.LLM.FEED_FORWARD_LENGTH.format(arch=arch)) == 4 * cfg.emb_dim
    assert _field(reader, K.LLM.BLOCK_COUNT.format(arch=arch)) == cfg.n_layers
    assert _field(reader, K.Attention.HEAD_COUNT.format(arch=arch)) == cfg.n_heads
    assert _field(reader, K.Attention.LAYERNORM_EPS.format(arch=arch)) == pytest.approx(1e-5, rel=1e-6)
    assert _field(reader, K.General.FILE_TYPE) == (1 if case == "tied_f16" else 0)    # MOSTLY_F16 / ALL_F32
    assert _field(reader, K.Tokenizer.MODEL) == "gpt2" and _field(reader, K.Tokenizer.PRE) == "gpt-2"
    assert _field(reader, K.Tokenizer.BOS_ID) == _field(reader, K.Tokenizer.EOS_ID) == 50256
    assert _field(reader, K.Tokenizer.ADD_BOS) is False


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (the byte-level BPE's alphabet), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def test_tokenizer_is_gpt2s_byte_for_byte(untied_f32):
    """Every token's bytes equal tiktoken's; merge k joins two tokens into token 256 + k."""
    import tiktoken

    _, _, reader = untied_f32
    enc = tiktoken.get_encoding("gpt2")
    to_byte = _unicode_to_byte()
    tokens = _field(reader, gguf.Keys.Tokenizer.LIST)
    as_bytes = [bytes(to_byte[c] for c in t) if i != 50256 else t.encode() for i, t in enumerate(tokens)]
    assert len(tokens) == enc.n_vocab == 50257
    assert as_bytes == [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    assert tokens[50256] == "<|endoftext|>"
    types = _field(reader, gguf.Keys.Tokenizer.TOKEN_TYPE)
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    merges = _field(reader, gguf.Keys.Tokenizer.MERGES)
    assert len(merges) == 50000
    for k, merge in enumerate(merges):
        left, right = merge.split(" ")
        assert bytes(to_byte[c] for c in left + right) == as_bytes[256 + k], merge


def test_transformers_gguf_loader_gives_our_logits(untied_f32):
    """transformers reads GGUF the way llama.cpp lays it out; its GPT-2 computes our logits."""
    transformers = pytest.importorskip("transformers")
    model, path, _ = untied_f32
    hf = transformers.GPT2LMHeadModel.from_pretrained(
        path.parent, gguf_file=path.name, n_positions=CFG.context_length, tie_word_embeddings=False).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


def test_llama_cpp_gives_our_logits(untied_f32):
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp's own logits are not compared (the layout is "
              "checked tensor by tensor and through transformers' GGUF loader)")
        pytest.skip("llama-cpp-python is not installed")
    model, path, _ = untied_f32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CFG.context_length, logits_all=True, verbose=False)
    tokens = torch.randint(0, CFG.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    llm.eval(tokens.tolist())
    theirs = torch.tensor(np.asarray(llm.scores[:12]), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs, model(tokens[None])[0], atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- #
# Refusals, and nothing a learner made is replaced by accident
# --------------------------------------------------------------------------- #
def test_refuses_bad_arguments(tmp_path):
    model = GPTModel(CFG)
    with pytest.raises(ValueError, match="dtype must be one of f32, f16"):
        export_gguf(model, tmp_path / "m.gguf", dtype="bf16")
    with pytest.raises(TypeError, match="GPTModel"):
        export_gguf(torch.nn.Linear(2, 2), tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="101 ids, fewer than GPT-2's 50257"):
        export_gguf(GPTModel(CFG.replace(vocab_size=101)), tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        export_gguf(model, tmp_path)
    add_lora(model, rank=2)
    with pytest.raises(ValueError, match="LoRA layers; merge them first"):
        export_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_when_asked_and_only_when_complete(tmp_path, untied_f32, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"a learner's file")
    model = untied_f32[0]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(model, path)
    assert path.read_bytes() == b"a learner's file"

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
        with pytest.raises(OSError, match="No space"):
            export_gguf(model, path, overwrite=True)
    assert path.read_bytes() == b"a learner's file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]          # no temporary file left behind
    export_gguf(model, path, overwrite=True)
    assert path.read_bytes() == untied_f32[1].read_bytes()            # deterministic, and complete


def test_a_padded_vocabulary_gets_unused_pad_tokens():
    from course_lib.export import _gpt2_vocab

    tokens, types, merges = _gpt2_vocab(50304)
    assert tokens[50256] == "<|endoftext|>" and tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)]
    assert set(types[50257:]) == {gguf.TokenType.UNUSED} and len(merges) == 50000
