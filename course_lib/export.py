"""Step 9 — deployment: reading a model to serve, and writing it for other runtimes.

* :func:`load_model`, :class:`LoadedModel` — a language model from a course checkpoint, a run
  folder of ``course finetune instruct`` / ``course pretrain``, a Hugging Face folder, or a
  profile's base model: what ``course serve``, ``course chat``, ``course export`` and
  ``course adapters merge`` start from.
* :func:`export_gguf` — one GGUF file (GPT-2 architecture, f32 or f16, GPT-2's tokenizer
  inside) for llama.cpp and Ollama. (The Hugging Face layout that vLLM and TGI serve is step
  5's :func:`~course_lib.pretrained.export_hf`.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checks import boolean
from .model import GPTModel

__all__ = ["LoadedModel", "load_model", "MODEL_FILES", "export_gguf", "GGUF_DTYPES"]

#: The files :func:`load_model` looks for in a folder, in this order: ``course finetune`` writes
#: ``model.pt``, ``course pretrain`` writes ``checkpoint.pt``, ``export_hf`` / ``save_pretrained``
#: write ``config.json`` with the safetensors weights.
MODEL_FILES: tuple[str, ...] = ("model.pt", "checkpoint.pt", "config.json")


@dataclass
class LoadedModel:
    """What :func:`load_model` returns.

    Attributes:
        model: the :class:`~course_lib.model.GPTModel`, in ``eval()`` mode.
        style: the prompt template it was instruction-tuned with (``"alpaca"``, ``"phi3"``), or
            ``None`` when the file records none (a base model).
        source: where it came from (a file, a folder, or ``"profile <name>"``).
        kind: ``"checkpoint"``, ``"hf"`` or ``"profile"``.
    """

    model: GPTModel
    style: str | None
    source: str
    kind: str


def _checkpoint_file(path: Path) -> Path | None:
    if path.is_file():
        return None if path.name == "config.json" else path
    for name in MODEL_FILES[:2]:
        if (path / name).is_file():
            return path / name
    return None


def load_model(path: str | os.PathLike | None = None, *, profile: str | None = None,
               device: Any = None) -> LoadedModel:
    """A language model to serve, chat with or export.

    Args:
        path: a course checkpoint file (``model.pt``, ``checkpoint.pt``), a folder holding one
            (the ``--out`` of ``course finetune instruct`` or ``course pretrain``), or a Hugging
            Face GPT-2 folder (``config.json`` + ``model.safetensors``, as :func:`export_hf`
            writes). ``None``: the base model of ``profile``.
        profile: with ``path=None``, ``tiny``/``cpu``/``gpu``
            (:func:`~course_lib.base_model.load_base_model`); default the active profile.
        device: where to put the model. Default CPU.

    Returns:
        a :class:`LoadedModel`.

    Raises:
        ValueError: ``path`` and ``profile`` both given; ``path`` does not exist or holds no model
            (the message lists what was looked for); the checkpoint holds a model that does not
            write text (step 6's classifier); a damaged file (``CheckpointError``).
        FileNotFoundError: a Hugging Face folder without its weights.
    """
    if path is None:
        from .base_model import load_base_model
        from .config import get_profile

        name = get_profile(profile).name
        return LoadedModel(load_base_model(name, device=device, verbose=False), None, f"profile {name}", "profile")
    if profile is not None:
        raise ValueError(f"give a model path or profile={profile!r}, not both")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path, got {type(path).__name__}")
    target = Path(path).expanduser()
    if not target.exists():
        raise ValueError(f"{target} does not exist; give a course checkpoint (model.pt), the --out folder of "
                         "`course finetune instruct` or `course pretrain`, or a Hugging Face GPT-2 folder")
    ckpt = _checkpoint_file(target)
    if ckpt is None:
        folder = target.parent if target.is_file() else target
        if not (folder / "config.json").is_file():
            raise ValueError(f"{target} holds no model: looked for {', '.join(MODEL_FILES)}; give the --out folder "
                             "of `course finetune instruct` or `course pretrain`, or a Hugging Face GPT-2 folder")
        from .pretrained import load_gpt2

        return LoadedModel(load_gpt2(folder, device=device), None, str(folder), "hf")
    from .checkpoint import model_from_checkpoint

    model, extra = model_from_checkpoint(ckpt, device=device, return_extra=True)     # one read of the file
    if not isinstance(model, GPTModel):
        hint = " (a spam classifier: `course classify` uses it)" if type(model).__name__ == "GPTClassifier" else ""
        raise ValueError(f"{ckpt} holds a {type(model).__name__}{hint}, not a language model that writes text; "
                         "give a model from `course finetune instruct`, `course pretrain` or a GPT-2 folder")
    style = extra.get("style") if isinstance(extra.get("style"), str) else None
    return LoadedModel(model, style, str(ckpt), "checkpoint")


# --------------------------------------------------------------------------- #
# GGUF, for llama.cpp and Ollama
# --------------------------------------------------------------------------- #
#: The tensor types :func:`export_gguf` writes.
GGUF_DTYPES: tuple[str, ...] = ("f32", "f16")
_GPT2_VOCAB = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|> (id 50256)


# llama.cpp's name in block i -> ours in trf_blocks.i (each has .weight and .bias)
_GGUF_BLOCK = {"attn_norm": "norm1", "attn_output": "att.out_proj", "ffn_norm": "norm2",
               "ffn_up": "ff.layers.0",      # [4d, d]
               "ffn_down": "ff.layers.2"}    # [d, 4d]


def _gguf_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's GPT-2 names, as float32 CPU tensors in ``nn.Linear``'s
    ``[out, in]`` layout (GGUF lists a tensor's dims the other way round: ``ne = [in, out]``).

    Biases llama.cpp requires but a ``qkv_bias=False`` model lacks are zeros (the same
    computation); a tied head is written out as ``output.weight`` (a copy of ``token_embd``),
    as llama.cpp's own converter does for GPT-2.
    """
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    d = model.cfg.emb_dim
    out = {"token_embd.weight": sd["tok_emb.weight"],            # [V, d]
           "position_embd.weight": sd["pos_emb.weight"],         # [ctx, d]
           "output_norm.weight": sd["final_norm.weight"], "output_norm.bias": sd["final_norm.bias"],
           "output.weight": sd["out_head.weight"]}               # [V, d]
    for i in range(model.cfg.n_layers):
        b, g = f"trf_blocks.{i}.", f"blk.{i}."
        for gguf_name, ours in _GGUF_BLOCK.items():   # weights [out, in] as nn.Linear holds them
            for kind in ("weight", "bias"):
                out[f"{g}{gguf_name}.{kind}"] = sd[f"{b}{ours}.{kind}"]
        qkv = [f"{b}att.{p}" for p in ("W_query", "W_key", "W_value")]
        out[g + "attn_qkv.weight"] = torch.cat([sd[p + ".weight"] for p in qkv])          # [3d, d]: q | k | v
        out[g + "attn_qkv.bias"] = (torch.cat([sd[p + ".bias"] for p in qkv]) if model.cfg.qkv_bias
                                    else torch.zeros(3 * d))                           # [3d]
    return out


def _gpt2_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """GPT-2's BPE as GGUF stores it: tokens by id (byte-level strings, as in ``encoder.json``),
    their types, and the merges (``"a b"``, in rank order, from ``vocab.bpe``). Ids past 50,256
    (a vocabulary padded for speed) are ``[PAD<id>]`` of type UNUSED, as llama.cpp's converter writes them."""
    import gguf

    from . import data
    from .tokenizers import ENDOFTEXT

    encoder = json.loads(data.fetch("gpt2-encoder", progress=False).read_text(encoding="utf-8"))
    by_id = {i: t for t, i in encoder.items()}
    if sorted(by_id) != list(range(_GPT2_VOCAB)):
        raise ValueError("the cached encoder.json is not GPT-2's 50,257-token vocabulary; fetch it again "
                         "(course data fetch gpt2-encoder)")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if t == ENDOFTEXT else gguf.TokenType.NORMAL if i < _GPT2_VOCAB
             else gguf.TokenType.UNUSED for i, t in enumerate(tokens)]
    lines = data.fetch("gpt2-vocab-bpe", progress=False).read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    return tokens, [int(t) for t in types], merges


def export_gguf(model: GPTModel, path: str | os.PathLike, *, dtype: str = "f32", overwrite: bool = False,
                name: str | None = None, chat_template: str | None = None) -> Path:
    """Write ``model`` as one GGUF file that llama.cpp (``llama-cli -m``, ``llama-server``) and
    Ollama (``FROM ./model.gguf``) run: GPT-2's architecture, weights and BPE tokenizer.

    Layout (llama.cpp's ``gpt2``; ``d = emb_dim``, shapes as PyTorch sees them, GGUF lists
    dims reversed): ``token_embd`` [V, d], ``position_embd`` [ctx, d], per block ``i``
    ``blk.i.attn_norm``, ``attn_qkv`` [3d, d] (query, key, value rows in that order),
    ``attn_output`` [d, d], ``ffn_norm``, ``ffn_up`` [4d, d], ``ffn_down`` [d, 4d] (weights and
    biases), then ``output_norm`` and ``output`` [V, d]. llama.cpp needs every bias, so a model
    built with ``qkv_bias=False`` gets zero query/key/value biases (the same computation), and
    a tied head is written as its own ``output.weight``. Metadata: ``gpt2.context_length``,
    ``embedding_length``, ``feed_forward_length``, ``block_count``, ``attention.head_count``,
    ``attention.layer_norm_epsilon``; the tokenizer as ``tokenizer.ggml.*`` (model ``gpt2``,
    pre-tokenizer ``gpt-2``, bos = eos = 50256, no BOS added, as GPT-2 was trained).

    Args:
        model: a :class:`~course_lib.model.GPTModel` with GPT-2's vocabulary (50,257 ids, or
            more for a padded one); adapters must be merged first (``unload_lora``).
        path: the ``.gguf`` file to write (its folder is created).
        dtype: ``"f32"`` (default) or ``"f16"``: the type of the matrices; norms, biases and
            the position table stay float32, as in llama.cpp's converter.
        overwrite: replace an existing file. Default ``False``.
        name: ``general.name`` in the file. Default ``"course_lib GPT"``.
        chat_template: a Jinja chat template (``course_lib.serve.chat_template(style)``) written as
            ``tokenizer.chat_template``, which llama.cpp's server applies to chats. Default ``None``.

    Returns:
        the path written (atomically: a failed export leaves any earlier file as it was).

    Raises:
        TypeError: ``model`` not a ``GPTModel``; ``path``/``name``/``chat_template`` of the wrong type.
        ValueError: an unknown ``dtype``; a vocabulary smaller than GPT-2's; a model with
            LoRA layers; ``path`` is a folder.
        FileExistsError: ``path`` exists and ``overwrite`` is ``False``.
        OSError: the file could not be written (the earlier file, if any, is kept).
        course_lib.data.DataFetchError: GPT-2's ``encoder.json``/``vocab.bpe`` could not be fetched.
    """
    import gguf

    from .files import check_writable, publish, scratch_file
    from .lora import lora_layers
    from .model import LAYER_NORM_EPS

    if not isinstance(model, GPTModel):
        raise TypeError(f"model must be a course_lib GPTModel, got {type(model).__name__}")
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    overwrite = boolean("overwrite", overwrite)
    for arg, value in (("name", name), ("chat_template", chat_template)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{arg} must be a string or None, got {type(value).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or Path), got {type(path).__name__}")
    if lora_layers(model):
        raise ValueError("the model has LoRA layers; merge them first (course_lib.lora.unload_lora(model)), "
                         "since GGUF holds plain GPT-2 weights")
    cfg = model.cfg
    if cfg.vocab_size < _GPT2_VOCAB:
        raise ValueError(f"the model's vocabulary has {cfg.vocab_size} ids, fewer than GPT-2's {_GPT2_VOCAB}; "
                         "export_gguf includes GPT-2's tokenizer, so it needs a model trained on it")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name inside it, e.g. {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another name")
    check_writable(path, "the GGUF file")
    tokens, types, merges = _gpt2_vocab(cfg.vocab_size)
    half = dtype == "f16"

    with scratch_file(path, suffix=".tmp") as tmp:   # renamed into place only once complete
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        w.add_name(name or "course_lib GPT")
        w.add_context_length(cfg.context_length)
        w.add_embedding_length(cfg.emb_dim)
        w.add_feed_forward_length(4 * cfg.emb_dim)
        w.add_block_count(cfg.n_layers)
        w.add_head_count(cfg.n_heads)
        w.add_layer_norm_eps(LAYER_NORM_EPS)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(_GPT2_VOCAB - 1)
        w.add_eos_token_id(_GPT2_VOCAB - 1)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        if chat_template is not None:
            w.add_chat_template(chat_template)
        for key, t in _gguf_tensors(model).items():
            keep_f32 = t.dim() == 1 or key == "position_embd.weight"
            w.add_tensor(key, (t if keep_f32 or not half else t.half()).contiguous().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        publish(tmp, path)
    return path
