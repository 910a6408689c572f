"""Step 5 — OpenAI's GPT-2 weights in our model, our weights out to the ecosystem.

* :func:`load_gpt2` — ``"gpt2"``, ``"gpt2-medium"``, ``"gpt2-large"``, ``"gpt2-xl"`` (fetched
  through the data registry as Hugging Face ``model.safetensors``), or a local folder in
  Hugging Face's layout (``config.json`` + ``model.safetensors``), loaded into our
  :class:`~course_lib.model.GPTModel`.
* :func:`export_hf` — the reverse: write a folder that ``transformers`` (and every tool
  that reads Hugging Face checkpoints) loads as a ``GPT2LMHeadModel``.
* :func:`hf_to_course_state` / :func:`course_to_hf_state` — the tensor-by-tensor mapping.

(The base model each profile fine-tunes, pretrained here on ``tiny``/``cpu``, is
:func:`course_lib.base_model.load_base_model`.)

How GPT-2's tensors map onto ours (``d = emb_dim``, block ``i``):

================================  ==========================================  ===========================
Hugging Face (``transformer.``)   ours                                        how
================================  ==========================================  ===========================
``wte.weight`` [V, d]             ``tok_emb.weight`` (and the tied head)       as is
``wpe.weight`` [ctx, d]           ``pos_emb.weight``                           as is
``h.i.ln_1`` / ``ln_2``           ``trf_blocks.i.norm1`` / ``norm2``           as is
``h.i.attn.c_attn.weight`` [d,3d] ``att.W_query`` / ``W_key`` / ``W_value``    split in three, transpose
``h.i.attn.c_attn.bias`` [3d]     their biases                                 split in three
``h.i.attn.c_proj`` [d, d]        ``att.out_proj``                             transpose the weight
``h.i.mlp.c_fc`` [d, 4d]          ``ff.layers.0``                              transpose the weight
``h.i.mlp.c_proj`` [4d, d]        ``ff.layers.2``                              transpose the weight
``ln_f``                          ``final_norm``                               as is
``lm_head.weight`` [V, d]         ``out_head.weight``                          only if not tied
================================  ==========================================  ===========================

GPT-2 was written in TensorFlow with ``Conv1D`` layers that store weights as ``[in, out]``;
``nn.Linear`` stores ``[out, in]``, hence the transposes.

Choices worth knowing:

* **Tied head.** OpenAI's weights share one matrix between the embedding and the output
  head, so :func:`load_gpt2` returns ``GPTModel(cfg, tie_weights=True)`` unless the folder
  says ``tie_word_embeddings: false`` (then ``lm_head.weight`` must be in the file).
* **Strict.** A missing tensor, a tensor of the wrong shape or an unknown tensor is a
  ``ValueError`` that names it; the causal-mask buffers older GPT-2 files carry
  (``attn.bias``, ``attn.masked_bias``) are recognised and skipped.
* **Exports are GPT-2, exactly.** :func:`export_hf` writes ``model_type: gpt2`` with
  ``gelu_new`` and ``layer_norm_epsilon = 1e-5`` (our model's GELU and LayerNorm). A model
  built with ``qkv_bias=False`` is exported with zero query/key/value biases, which computes
  the same thing. Each file is written atomically; an existing export is replaced only with
  ``overwrite=True``. When the vocabulary is GPT-2's (50,257 tokens), the tokenizer files
  (``vocab.json``, ``merges.txt``) are written too, so ``AutoTokenizer`` loads the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import data
from .checks import boolean
from .config import GPT_CONFIGS, GPTConfig
from .files import atomic_write
from .model import LAYER_NORM_EPS, GPTModel
from .tokenizers import ENDOFTEXT

__all__ = [
    "GPT2_NAMES",
    "load_gpt2",
    "export_hf",
    "hf_config_to_course",
    "hf_to_course_state",
    "course_to_hf_state",
]

#: Accepted names -> (data registry entry, config preset).
GPT2_NAMES: dict[str, tuple[str, str]] = {
    "gpt2": ("gpt2-weights", "gpt2-small"),
    "gpt2-small": ("gpt2-weights", "gpt2-small"),
    "gpt2-medium": ("gpt2-medium-weights", "gpt2-medium"),
    "gpt2-large": ("gpt2-large-weights", "gpt2-large"),
    "gpt2-xl": ("gpt2-xl-weights", "gpt2-xl"),
}
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks stored by older GPT-2 files: not weights
_WEIGHTS_FILE, _INDEX_FILE, _CONFIG_FILE = "model.safetensors", "model.safetensors.index.json", "config.json"


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
def hf_config_to_course(hf: dict[str, Any], where: str = "config.json") -> tuple[GPTConfig, bool]:
    """Read a Hugging Face GPT-2 ``config.json`` (as a dict): ``(GPTConfig, tie_weights)``.

    Raises:
        ValueError: not a GPT-2 config (not a JSON object, a size missing or of the wrong
            type), or a variant our model does not compute (another activation, LayerNorm
            epsilon, feed-forward width, or attention scaling); the message names ``where``.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"{where} holds a JSON {type(hf).__name__}, not an object of settings; "
                         "is this a GPT-2 config.json?")
    _check_hf_types(hf, where)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}; only GPT-2 checkpoints "
                         "(model_type 'gpt2') map onto GPTModel")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"{where} lacks {missing}; is this a GPT-2 config.json?")
    d = hf["n_embd"]
    problems = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} (ours is GELU, tanh form: 'gelu_new')")
    if abs(float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS)) - LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']} (ours is {LAYER_NORM_EPS})")
    if hf.get("n_inner") not in (None, 4 * d):
        problems.append(f"n_inner {hf['n_inner']} (ours is 4 * n_embd = {4 * d})")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("a non-standard attention scaling")
    if problems:
        raise ValueError(f"{where} describes a GPT-2 variant GPTModel does not compute: {'; '.join(problems)}")
    try:
        cfg = GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
                        emb_dim=d, n_heads=hf["n_head"], n_layers=hf["n_layer"],
                        drop_rate=float(hf.get("resid_pdrop", 0.1)), qkv_bias=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} does not describe a model GPTModel can build: {err}") from None
    return cfg, hf.get("tie_word_embeddings", True)


# config.json key -> (JSON types it may have, what to write), checked before anything is read.
_HF_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model_type": ((str,), "a string such as \"gpt2\""),
    "vocab_size": ((int,), "a whole number"),
    "n_positions": ((int,), "a whole number"),
    "n_ctx": ((int,), "a whole number"),
    "n_embd": ((int,), "a whole number"),
    "n_layer": ((int,), "a whole number"),
    "n_head": ((int,), "a whole number"),
    "n_inner": ((int, type(None)), "a whole number or null"),
    "activation_function": ((str,), "a string such as \"gelu_new\""),
    "layer_norm_epsilon": ((int, float), "a number"),
    "resid_pdrop": ((int, float), "a number in [0, 1)"),
    "scale_attn_weights": ((bool,), "true or false"),
    "scale_attn_by_inverse_layer_idx": ((bool,), "true or false"),
    "tie_word_embeddings": ((bool,), "true or false"),
}


def _check_hf_types(hf: dict[str, Any], where: str) -> None:
    for key, (types, wanted) in _HF_TYPES.items():
        if key not in hf:
            continue
        value = hf[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{where}: {key} is {json.dumps(value)[:40]}, but must be {wanted}; "
                             "fix the file or save the model again")


def _read_json(path: Path) -> Any:
    """A model folder's ``config.json`` (or shard index); a clear error naming it if unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (not UTF-8); it must be the JSON that save_pretrained "
                         "or export_hf writes") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it may be truncated or hand-edited: "
                         "fix it, or save the model again") from None


def _course_config_to_hf(cfg: GPTConfig, tied: bool) -> dict[str, Any]:
    has_gpt2_vocab = cfg.vocab_size >= 50257
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied,
        "bos_token_id": 50256 if has_gpt2_vocab else None,
        "eos_token_id": 50256 if has_gpt2_vocab else None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------- #
# Tensor mapping
# --------------------------------------------------------------------------- #
_LINEAR = {"attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}
_NORMS = {"ln_1": "norm1", "ln_2": "norm2"}


def _expected_hf_shapes(cfg: GPTConfig, tied: bool) -> dict[str, tuple[int, ...]]:
    d, V = cfg.emb_dim, cfg.vocab_size
    shapes = {"wte.weight": (V, d), "wpe.weight": (cfg.context_length, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        shapes |= {h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
                   h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
                   h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
                   h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
                   h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def _strip(name: str) -> str:
    return name.removeprefix("transformer.")


def hf_to_course_state(hf_state: dict[str, torch.Tensor], cfg: GPTConfig, tied: bool = True,
                       source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Map Hugging Face GPT-2 tensors (with or without the ``transformer.`` prefix) to our names.

    Raises:
        ValueError: a tensor is missing, has the wrong shape, or is not a GPT-2 tensor; the
            message names it (``source`` says which file).
    """
    state = {_strip(k): v for k, v in hf_state.items() if not k.endswith(_BUFFERS)}
    if tied and "lm_head.weight" in state:  # some files store the tied head twice
        if not torch.equal(state["lm_head.weight"], state.get("wte.weight", state["lm_head.weight"])):
            raise ValueError(f"{source} says the head is tied (tie_word_embeddings) but lm_head.weight differs from "
                             "wte.weight; set tie_word_embeddings to false in config.json")
        del state["lm_head.weight"]
    expected = _expected_hf_shapes(cfg, tied)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{source} has no tensor {missing[0]!r} (expected shape {list(expected[missing[0]])})"
                         + (f" and {len(missing) - 1} more missing" if len(missing) > 1 else "")
                         + f"; the file is incomplete or does not match its config ({cfg})")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(f"{source} holds tensors GPT-2 does not have: {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                         + "; is its config.json (n_layer, tie_word_embeddings) right?")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {list(state[k].shape)}, expected {list(shape)} "
                             f"for {cfg}")

    d = cfg.emb_dim
    out = {"tok_emb.weight": state["wte.weight"], "pos_emb.weight": state["wpe.weight"],
           "final_norm.weight": state["ln_f.weight"], "final_norm.bias": state["ln_f.bias"]}
    out["out_head.weight"] = state["wte.weight"] if tied else state["lm_head.weight"]
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for hf_name, ours in _NORMS.items():
            out[b + ours + ".weight"] = state[h + hf_name + ".weight"]
            out[b + ours + ".bias"] = state[h + hf_name + ".bias"]
        w = state[h + "attn.c_attn.weight"]                  # [d, 3d]: q | k | v side by side
        bias = state[h + "attn.c_attn.bias"]                 # [3d]
        for k, part in enumerate(("W_query", "W_key", "W_value")):
            out[f"{b}att.{part}.weight"] = w[:, k * d:(k + 1) * d].T  # Conv1D [in, out] -> Linear [out, in]
            if cfg.qkv_bias:
                out[f"{b}att.{part}.bias"] = bias[k * d:(k + 1) * d]
        for hf_name, ours in _LINEAR.items():
            out[b + ours + ".weight"] = state[h + hf_name + ".weight"].T
            out[b + ours + ".bias"] = state[h + hf_name + ".bias"]
    return out


def course_to_hf_state(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our model's tensors under Hugging Face GPT-2 names (``transformer.`` prefix), contiguous
    and on the CPU, ready for ``safetensors``. The tied head is stored once (as ``wte``)."""
    if not isinstance(model, GPTModel):
        raise TypeError(f"model must be a course_lib GPTModel, got {type(model).__name__}")
    adapted = next((k for k in model.state_dict() if ".lora_" in k or k.endswith(".base.weight")), None)
    if adapted is not None:
        raise ValueError(f"the model has LoRA adapters ({adapted}), which GPT-2's layout has no place for: fold "
                         "the active one in first (course_lib.lora.unload_lora(model)), or write the adapter "
                         "beside the base with course_lib.lora.save_adapter")
    cfg, sd = model.cfg, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    d = cfg.emb_dim
    t = "transformer."
    out = {t + "wte.weight": sd["tok_emb.weight"], t + "wpe.weight": sd["pos_emb.weight"],
           t + "ln_f.weight": sd["final_norm.weight"], t + "ln_f.bias": sd["final_norm.bias"]}
    if not model.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"]
    for i in range(cfg.n_layers):
        h, b = f"{t}h.{i}.", f"trf_blocks.{i}."
        for hf_name, ours in _NORMS.items():
            out[h + hf_name + ".weight"] = sd[b + ours + ".weight"]
            out[h + hf_name + ".bias"] = sd[b + ours + ".bias"]
        parts = ("W_query", "W_key", "W_value")
        out[h + "attn.c_attn.weight"] = torch.cat([sd[f"{b}att.{p}.weight"].T for p in parts], dim=1)  # [d, 3d]
        out[h + "attn.c_attn.bias"] = (torch.cat([sd[f"{b}att.{p}.bias"] for p in parts]) if cfg.qkv_bias
                                       else torch.zeros(3 * d, dtype=sd[f"{b}att.W_query.weight"].dtype))
        for hf_name, ours in _LINEAR.items():
            out[h + hf_name + ".weight"] = sd[b + ours + ".weight"].T
            out[h + hf_name + ".bias"] = sd[b + ours + ".bias"]
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder: ``model.safetensors``, or the shards
    its ``model.safetensors.index.json`` names."""
    index = folder / _INDEX_FILE
    if not index.is_file() or (folder / _WEIGHTS_FILE).is_file():
        return [folder / _WEIGHTS_FILE]
    stored = _read_json(index)
    weight_map = stored.get("weight_map") if isinstance(stored, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index} has no \"weight_map\" of tensor name -> file name; save the model again")
    return [folder / f for f in sorted(set(weight_map.values()))]


def _read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files``, by name.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is not safetensors (truncated, or something else); the message names it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; a Hugging Face model folder needs {_CONFIG_FILE} and "
                                    f"{_WEIGHTS_FILE} (transformers' save_pretrained or export_hf writes both)")
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{f} is not a readable safetensors file ({err}); it may be truncated: "
                             "download, fetch or export it again") from err
    return state


def _resolve(name_or_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], GPTConfig, bool, str]:
    key = str(name_or_path).strip()
    if key.lower() in GPT2_NAMES:
        entry, preset = GPT2_NAMES[key.lower()]
        path = data.fetch(entry)                         # cache, mirror, or download (verified)
        return _read_safetensors([path]), GPT_CONFIGS[preset], True, str(path)
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        raise ValueError(f"{name_or_path!r} is neither a GPT-2 name ({', '.join(GPT2_NAMES)}) nor an existing "
                         "folder; give one of the names, or a folder holding config.json and model.safetensors")
    if folder.is_file():
        raise ValueError(f"{folder} is a file; give the folder that holds {_CONFIG_FILE} and {_WEIGHTS_FILE}")
    config_file = folder / _CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; a Hugging Face model folder needs {_CONFIG_FILE} and "
                                f"{_WEIGHTS_FILE}")
    cfg, tied = hf_config_to_course(_read_json(config_file), str(config_file))
    return _read_safetensors(_weight_files(folder)), cfg, tied, str(folder)


def load_gpt2(name_or_path: str | os.PathLike, *, device: Any = None, dtype: torch.dtype | None = None) -> GPTModel:
    """GPT-2's weights in a :class:`~course_lib.model.GPTModel`, in ``eval()`` mode.

    Args:
        name_or_path: ``"gpt2"`` (124M; ``"gpt2-small"`` works too), ``"gpt2-medium"``
            (355M), ``"gpt2-large"`` (774M) or ``"gpt2-xl"`` (1.5B) — fetched with
            :func:`course_lib.data.fetch` (cache, then ``$COURSE_DATA_MIRROR``, then a
            checked download from the Hugging Face hub) — or a folder in Hugging Face layout:
            ``config.json`` plus ``model.safetensors`` (or sharded ``model-*.safetensors`` with
            ``model.safetensors.index.json``), as ``save_pretrained`` or :func:`export_hf` write.
            A name wins over a folder of the same name: write ``./gpt2`` for the folder.
        device: move the model there. Default CPU.
        dtype: convert the weights (e.g. ``torch.bfloat16``, or its name ``"bfloat16"``). Default float32.

    Raises:
        TypeError: ``dtype`` is not a floating-point dtype.
        ValueError: an unknown name; a folder whose ``config.json`` is not GPT-2's, not JSON,
            or lacks or mistypes a setting (the file is named); a tensor missing, misshapen
            or unexpected (named in the message).
        FileNotFoundError: the folder lacks ``config.json`` or the weights.
        course_lib.data.DataFetchError: the weights could not be fetched (the message says
            how to stage them by hand).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a GPT-2 name or a folder path, got {type(name_or_path).__name__}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch dtype such as torch.bfloat16 (or 'bfloat16'), got "
                        f"{dtype!r}")
    if device is not None:
        from .config import get_device

        device = get_device(device)              # before minutes of download and loading
    hf_state, cfg, tied, source = _resolve(name_or_path)
    state = hf_to_course_state(hf_state, cfg, tied, source)
    model = GPTModel(cfg, tie_weights=tied)
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


# --------------------------------------------------------------------------- #
# Exporting
# --------------------------------------------------------------------------- #
def export_hf(model: GPTModel, folder: str | os.PathLike, *, overwrite: bool = False,
              include_tokenizer: bool | None = None, chat_template: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder: ``config.json`` + ``model.safetensors``.

    ``transformers.GPT2LMHeadModel.from_pretrained(folder)`` (or ``AutoModelForCausalLM``)
    loads it and computes the same logits; :func:`load_gpt2` reads it back.

    Args:
        model: a :class:`~course_lib.model.GPTModel` (any size; tied or not).
        folder: created if needed.
        overwrite: replace an existing export in ``folder``. Default ``False``.
        include_tokenizer: also write GPT-2's ``vocab.json`` and ``merges.txt`` (from the data
            registry) and a ``tokenizer_config.json``. Default: when the model's vocabulary is
            GPT-2's 50,257 tokens.
        chat_template: a Jinja chat template (``course_lib.serve.chat_template(style)``) for
            ``tokenizer_config.json``, so that ``apply_chat_template``, vLLM and TGI format chats
            as the model was tuned. Needs the tokenizer. Default ``None``: none written.

    Returns:
        the folder.

    Raises:
        TypeError: ``model`` is not a ``GPTModel``; ``chat_template`` not a string; ``overwrite``
            or ``include_tokenizer`` not ``True``/``False``; ``folder`` not a path.
        ValueError: ``chat_template`` without the tokenizer; a weight that is ``nan``/``inf`` (a
            diverged model); LoRA adapters still in the model (merge them first).
        FileExistsError: ``folder`` already holds an export and ``overwrite`` is ``False``.
    """
    from safetensors.torch import save as safetensors_bytes

    from .checkpoint import nonfinite_parameters

    if not isinstance(model, GPTModel):
        raise TypeError(f"model must be a course_lib GPTModel, got {type(model).__name__}")
    overwrite = boolean("overwrite", overwrite)      # "no" is truthy: it replaced an export
    if include_tokenizer is not None:
        include_tokenizer = boolean("include_tokenizer", include_tokenizer)
    if not isinstance(folder, (str, os.PathLike)) or not str(folder).strip():
        raise TypeError(f"folder must be the export's folder path (a str or Path), got {folder!r}")
    bad = nonfinite_parameters(model)
    if bad:
        raise ValueError(f"not exporting: {len(bad)} weight tensor(s) hold nan or inf ({', '.join(bad[:3])}), so "
                         "the model has diverged; export a checkpoint from before it did")
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; export_hf writes a folder")
    existing = [f for f in (_WEIGHTS_FILE, _CONFIG_FILE) if (folder / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds an exported model ({', '.join(existing)}); pass "
                              "overwrite=True to replace it, or choose another folder")
    if include_tokenizer is None:
        include_tokenizer = model.cfg.vocab_size == 50257
    if chat_template is not None and not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a Jinja template string or None, got {type(chat_template).__name__}")
    if chat_template is not None and not include_tokenizer:
        raise ValueError("chat_template goes into tokenizer_config.json: pass include_tokenizer=True as well")
    tensors = course_to_hf_state(model)           # refuses a model with adapters before a folder is made
    folder.mkdir(parents=True, exist_ok=True)
    blob = safetensors_bytes(tensors, metadata={"format": "pt"})
    atomic_write(folder / _WEIGHTS_FILE, lambda fh: fh.write(blob), overwrite=True)
    del blob
    config = _course_config_to_hf(model.cfg, model.tie_weights)
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _write_json(folder / _CONFIG_FILE, config)
    if include_tokenizer:
        _write_tokenizer(folder, model.cfg.context_length, chat_template)
    return folder


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), overwrite=True)


def _write_tokenizer(folder: Path, context_length: int, chat_template: str | None = None) -> None:
    for name, target in (("gpt2-encoder", "vocab.json"), ("gpt2-vocab-bpe", "merges.txt")):
        blob = data.fetch(name).read_bytes()  # OpenAI's encoder.json / vocab.bpe are HF's vocab.json / merges.txt
        atomic_write(folder / target, lambda fh, blob=blob: fh.write(blob), overwrite=True)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "add_prefix_space": False,
              "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(folder / "tokenizer_config.json", config)
