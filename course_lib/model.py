"""Step 4 — the complete GPT: the pieces around attention, then the model itself.

One small class per idea, in the order the notebook builds them:

* :class:`LayerNorm` — normalise each token's vector to mean 0 and variance 1, then
  scale and shift it with two learned vectors. Equal to :class:`torch.nn.LayerNorm`.
* :class:`GELU` — the smooth activation GPT-2 uses (its tanh approximation).
* :class:`FeedForward` — two linear layers around a GELU, 4x wider in the middle.
* :class:`TransformerBlock` — pre-norm attention and feed-forward, each wrapped in a
  shortcut (residual) connection with dropout.
* :class:`GPTModel` — token and position embeddings, dropout, ``n_layers`` blocks, a
  final norm and a bias-free output head that turns vectors back into vocabulary logits.
* :func:`count_parameters`, :func:`model_memory_bytes` — what a built model weighs
  (the step-1 anatomy computes the same from the config alone).

The architecture is GPT-2's, tensor for tensor: for the same configuration
``GPTModel`` has exactly the parameters of Hugging Face's ``GPT2LMHeadModel``
(``tests/test_model.py`` checks every shape).

Choices worth knowing:

* **LayerNorm parameters are called ``weight`` and ``bias``** (the paper's gain γ and
  bias β; some texts say *scale* and *shift*), as in :class:`torch.nn.LayerNorm`, so the
  two load each other's ``state_dict``. ``eps`` is ``1e-5`` as in GPT-2.
* **The teaching math lives in the notebook, the fused kernels here.** ``LayerNorm`` and
  ``GELU`` compute with :func:`torch.nn.functional.layer_norm` and
  :func:`torch.nn.functional.gelu` (``approximate="tanh"``): the same numbers as the
  formulas in their docstrings (to float rounding), but one kernel each, with less
  memory kept for the backward pass. The notebook writes the formulas out and asserts
  they agree with these classes.
* **Weight tying is an option, off by default**: ``GPTModel(cfg, tie_weights=True)``
  makes the output head share the token-embedding matrix, as OpenAI's GPT-2 weights do
  (124,439,808 parameters for GPT-2 small instead of 163,037,184). Off by default so a
  model trained from scratch has a head of its own to learn; GPT-2's weights load into
  either form.
* **Initialisation follows GPT-2**: every linear and embedding weight ~ N(0, 0.02),
  biases 0, LayerNorm weight 1 and bias 0, and the two projections that write into the
  residual stream in every block (``att.out_proj`` and ``ff.layers[2]``) ~
  N(0, 0.02/sqrt(2·n_layers)), so the stream's variance does not grow with depth.
  PyTorch's default N(0, 1) embeddings would make the first logits huge (and, with a
  tied head, make the output layer's backward pass many times slower on CPU).
* **Input checks.** ``forward`` raises a ``TypeError`` for ids that are not a tensor of
  ``torch.long`` or ``torch.int32`` (smaller integer types wrap large ids around), and a
  ``ValueError`` for ids that are not 2-D, more tokens than ``context_length`` and ids outside
  ``[0, vocab_size)`` (an embedding lookup would fail with an index error deep in torch,
  or a device-side assert on a GPU). The range check reads the ids' min and max (on a
  GPU, one small synchronisation per call), so it is skipped while ``torch.compile``
  traces the model (it would break the graph);
  everything else is unchanged under ``torch.compile`` and autocast.
* **Positions are looked up in one place** (:meth:`GPTModel.embed`), with
  ``torch.arange(start_pos, start_pos + tokens)``: ``start_pos`` is 0 unless a KV cache
  (step 5, :class:`course_lib.inference.KVCache`, passed as ``model(idx, kv_cache=cache)``)
  already holds the tokens before these.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiHeadAttention, _check_dtype, _weight_dtype
from .checks import boolean, finite_number, integer, positive_int
from .config import GPTConfig

__all__ = [
    "LayerNorm",
    "GELU",
    "FeedForward",
    "TransformerBlock",
    "GPTModel",
    "count_parameters",
    "model_memory_bytes",
    "LAYER_NORM_EPS",
    "INIT_STD",
]

#: The epsilon GPT-2 adds to the variance inside every LayerNorm.
LAYER_NORM_EPS = 1e-5
#: Standard deviation of GPT-2's initial weights.
INIT_STD = 0.02
# Dtypes token ids may have: what nn.Embedding indexes with, wide enough for any vocabulary.
_ID_DTYPES = (torch.long, torch.int32)


def _check_features(x, emb_dim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor of shape [..., {emb_dim}], got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != emb_dim:
        raise ValueError(f"{what} was built for vectors of {emb_dim} features, but the input has shape "
                         f"{tuple(x.shape)}; the last dimension must be {emb_dim}")


# --------------------------------------------------------------------------- #
# Layer normalisation
# --------------------------------------------------------------------------- #
class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension (Ba et al., 2016).

    For each vector ``x`` (one token)::

        mean = x.mean(-1)                      var = x.var(-1, unbiased=False)
        y = (x - mean) / sqrt(var + eps) * weight + bias

    ``weight`` (the scale γ) starts at 1 and ``bias`` (the shift β) at 0, so a fresh layer
    returns vectors with mean 0 and variance 1; training may learn to undo that.
    The variance is the biased one (divide by ``emb_dim``, not ``emb_dim - 1``).

    Args:
        emb_dim: size of the last dimension.
        eps: added to the variance to avoid dividing by zero. Default ``1e-5`` (GPT-2).

    Shape:
        x: ``[..., emb_dim]`` -> same shape.

    Raises:
        ValueError: ``emb_dim`` not a positive integer, ``eps`` not a finite number above 0
            (NaN and inf included), or an input whose last dimension is not ``emb_dim``.
        TypeError: an input of another dtype than the parameters (an integer tensor, float64
            into a float32 layer; float16/bfloat16 into a float32 layer is fine).
    """

    def __init__(self, emb_dim: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.emb_dim = positive_int("emb_dim", emb_dim)
        self.eps = finite_number("eps", eps, positive=True, hint="; use a small positive number such as 1e-5")
        self.weight = nn.Parameter(torch.ones(emb_dim))   # scale, γ
        self.bias = nn.Parameter(torch.zeros(emb_dim))    # shift, β

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.emb_dim, "LayerNorm")
        weight = self.weight
        _check_dtype(x, weight.dtype, "LayerNorm", reduced_ok=True)
        return F.layer_norm(x, (self.emb_dim,), weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.emb_dim}, eps={self.eps}"


# --------------------------------------------------------------------------- #
# GELU activation
# --------------------------------------------------------------------------- #
class GELU(nn.Module):
    """The Gaussian Error Linear Unit in GPT-2's tanh approximation (Hendrycks & Gimpel, 2016)::

        GELU(x) ≈ 0.5 · x · (1 + tanh(sqrt(2/π) · (x + 0.044715 · x³)))

    Smooth everywhere, close to ReLU for large ``|x|``, slightly negative for small
    negative ``x`` (minimum ≈ -0.17 near x ≈ -0.75), so negative inputs still pass a gradient.
    Equal to ``torch.nn.functional.gelu(x, approximate="tanh")``, which computes it.

    Shape:
        x: any shape -> same shape.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"GELU expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"GELU expects a floating-point tensor, got dtype {x.dtype}; use x.float()")
        return F.gelu(x, approximate="tanh")


# --------------------------------------------------------------------------- #
# Feed-forward network
# --------------------------------------------------------------------------- #
class FeedForward(nn.Module):
    """The position-wise feed-forward network: expand, GELU, contract.

    Every token is processed on its own (no mixing between tokens; that is attention's
    job): ``emb_dim -> hidden_dim -> emb_dim``.

    Args:
        emb_dim: width of the token vectors.
        hidden_dim: width of the middle layer. Default ``4 * emb_dim`` (GPT-2).

    Attributes:
        layers: ``nn.Sequential(nn.Linear(emb_dim, hidden_dim), GELU(), nn.Linear(hidden_dim, emb_dim))``;
            both linear layers have a bias.

    Shape:
        x: ``[..., emb_dim]`` -> ``[..., emb_dim]``.

    Raises:
        ValueError: a size that is not a positive integer, or an input whose last
            dimension is not ``emb_dim``.
        TypeError: an input of another dtype than the parameters (an integer tensor, float64
            into a float32 layer).
    """

    def __init__(self, emb_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.emb_dim = positive_int("emb_dim", emb_dim)
        hidden_dim = 4 * emb_dim if hidden_dim is None else positive_int("hidden_dim", hidden_dim)
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, hidden_dim),   # expand:   [.., d] -> [.., 4d]
            GELU(),
            nn.Linear(hidden_dim, emb_dim),   # contract: [.., 4d] -> [.., d]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.emb_dim, "FeedForward")
        # layers[0]'s dtype; _modules["0"] skips Sequential.__getitem__, a measurable cost per call
        _check_dtype(x, _weight_dtype(self.layers._modules["0"]), "FeedForward")
        return self.layers(x)


# --------------------------------------------------------------------------- #
# Transformer block
# --------------------------------------------------------------------------- #
class TransformerBlock(nn.Module):
    """One GPT-2 block: pre-norm attention and feed-forward, each with a shortcut::

        x = x + dropout(attention(norm1(x)))
        x = x + dropout(feed_forward(norm2(x)))

    The shortcut (residual) connections give gradients a path around every layer, so
    deep stacks still train; the norms come *before* each sub-layer (pre-norm, GPT-2),
    leaving the residual stream itself un-normalised.

    Args:
        cfg: a :class:`~course_lib.config.GPTConfig` (uses ``emb_dim``, ``context_length``,
            ``n_heads``, ``drop_rate``, ``qkv_bias``).

    Attributes:
        norm1, norm2: :class:`LayerNorm` (emb_dim).
        att: :class:`~course_lib.attention.MultiHeadAttention` (emb_dim -> emb_dim, causal).
        ff: :class:`FeedForward` (emb_dim -> 4·emb_dim -> emb_dim).
        drop_shortcut: dropout on each sub-layer's output before it is added to ``x``.

    Shape:
        x: ``[batch, tokens, emb_dim]`` -> same shape (``tokens <= context_length``).

    Raises:
        TypeError: ``cfg`` is not a ``GPTConfig``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        _check_cfg(cfg)
        d = cfg.emb_dim
        self.norm1 = LayerNorm(d)
        self.att = MultiHeadAttention(d_in=d, d_out=d, context_length=cfg.context_length,
                                      dropout=cfg.drop_rate, num_heads=cfg.n_heads, qkv_bias=cfg.qkv_bias)
        self.norm2 = LayerNorm(d)
        self.ff = FeedForward(d)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, kv_cache=None, layer: int = 0) -> torch.Tensor:
        """``kv_cache`` and ``layer`` are passed to the attention (step 5; ``None`` here)."""
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache, layer))  # [B, T, d]: mix across tokens
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))   # [B, T, d]: transform each token on its own
        return x


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #
def _check_cfg(cfg) -> None:
    if isinstance(cfg, dict):
        raise TypeError("cfg must be a GPTConfig, got a dict; build one with GPTConfig(**cfg) "
                        "or take a preset with course_lib.get_config('gpt2-small')")
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"cfg must be a GPTConfig (e.g. course_lib.get_config('gpt2-small')), "
                        f"got {type(cfg).__name__}")


class GPTModel(nn.Module):
    """A GPT-2-style language model: token ids in, next-token logits out.

    ::

        idx [B, T] -> tok_emb + pos_emb -> dropout -> n_layers x TransformerBlock
                   -> final_norm -> out_head -> logits [B, T, vocab_size]

    ``logits[b, t]`` scores every vocabulary entry as the token that follows
    ``idx[b, :t+1]`` (the causal attention hides later tokens).

    Args:
        cfg: a :class:`~course_lib.config.GPTConfig`, e.g. ``get_config("gpt2-small")``.
        tie_weights: share one matrix between the token embedding and the output head,
            as GPT-2 does (saves ``vocab_size · emb_dim`` parameters). Default ``False``.

    Attributes:
        cfg: the configuration. ``tie_weights``: whether the head is tied.
        tok_emb: ``nn.Embedding(vocab_size, emb_dim)``.
        pos_emb: ``nn.Embedding(context_length, emb_dim)`` (learned absolute positions).
        drop_emb: dropout on the summed embeddings.
        trf_blocks: ``nn.ModuleList`` of ``n_layers`` :class:`TransformerBlock`.
        final_norm: :class:`LayerNorm` after the last block.
        out_head: ``nn.Linear(emb_dim, vocab_size, bias=False)``; its ``weight`` *is*
            ``tok_emb.weight`` when tied.

    Shape:
        idx: ``[batch, tokens]`` integer ids with ``1 <= tokens <= context_length`` ->
        logits ``[batch, tokens, vocab_size]``.

    Raises:
        TypeError: ``cfg`` is not a ``GPTConfig`` (a ``dict`` gets a hint); at call time
            ``idx`` is not a tensor of dtype ``torch.long`` or ``torch.int32`` (``uint8``,
            ``int8`` and ``int16`` cannot hold a vocabulary's ids: use ``idx.long()``).
        ValueError: (at call time) ``idx`` not 2-D, with no tokens, with more tokens than
            ``context_length``, or with ids outside ``[0, vocab_size)``.
            An ``emb_dim`` not divisible by ``n_heads`` is refused by ``GPTConfig`` itself.
    """

    def __init__(self, cfg: GPTConfig, tie_weights: bool = False):
        super().__init__()
        _check_cfg(cfg)
        if not isinstance(tie_weights, bool):
            raise TypeError(f"tie_weights must be True or False, got {tie_weights!r}")
        self.cfg = cfg
        self.tie_weights = tie_weights
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if tie_weights:
            self.out_head.weight = self.tok_emb.weight  # one tensor, two uses
        self.reset_parameters()

    # -- initialisation ------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise every weight as GPT-2 does (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The two projections per block that add into the residual stream: 2·n_layers
        # additions in all, so shrink them to keep the stream's variance roughly constant.
        residual_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        for block in self.trf_blocks:
            nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.ff.layers[2].weight, mean=0.0, std=residual_std)

    # -- forward -------------------------------------------------------------
    def _check_idx(self, idx, start=0) -> None:
        cfg = self.cfg
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids with shape [batch, tokens], got "
                            f"{type(idx).__name__}; e.g. torch.tensor([ids])")
        if idx.dtype not in _ID_DTYPES:
            small = "" if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool else \
                " (too small for a vocabulary: ids above its maximum wrap around)"
            raise TypeError(f"idx must hold integer token ids of dtype torch.long (or int32), got {idx.dtype}"
                            f"{small}; use idx.long()")
        if idx.ndim != 2:
            hint = " add a batch dimension with idx.unsqueeze(0)" if idx.ndim == 1 else ""
            raise ValueError(f"idx must have shape [batch, tokens], got {tuple(idx.shape)};{hint}")
        T = idx.shape[1]
        if T == 0:
            raise ValueError("idx has no tokens (shape [batch, 0]); give the model at least one token")
        if isinstance(start, torch.Tensor):  # one start per row: check the furthest
            if start.shape != (idx.shape[0],):
                raise ValueError(f"idx has a batch of {idx.shape[0]} but the KV cache holds {start.numel()} rows")
            start = int(start.max())
        if start and start + T > cfg.context_length:
            raise ValueError(f"the KV cache holds {start} positions, so {T} more tokens would exceed the model's "
                             f"context_length of {cfg.context_length}; reset the cache (or make a new one) and "
                             f"feed the last {cfg.context_length} tokens")
        if T > cfg.context_length:
            raise ValueError(f"idx has {T} tokens but the model's context_length is {cfg.context_length}; "
                             f"keep the last {cfg.context_length} tokens (idx[:, -{cfg.context_length}:]) "
                             "or build the model with a larger context_length")
        if idx.numel() and idx.device.type != "meta" and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"idx contains the token id {bad}, outside the vocabulary [0, {cfg.vocab_size}); "
                                 "was it made by a tokenizer with a larger vocabulary than cfg.vocab_size?")

    def embed(self, idx: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Token plus position embeddings: ``[B, T]`` ids -> ``[B, T, emb_dim]`` (no dropout).

        ``start_pos`` is the position of the first token: 0, or the number of tokens a KV
        cache already holds; a ``[B]`` tensor when the rows of the batch are at different
        positions.

        Raises:
            TypeError: an int ``start_pos`` that is not an integer.
            ValueError: an int ``start_pos`` below 0, or ``start_pos + tokens`` past
                ``context_length`` (there is no position embedding that far).
        """
        T = idx.shape[1]
        if isinstance(start_pos, torch.Tensor):  # one start per row: positions [B, T]
            pos = start_pos.view(-1, 1) + torch.arange(T, device=idx.device)
        else:
            start_pos = integer("start_pos", start_pos, minimum=0, hint=" (0, or the tokens a KV cache holds)")
            if start_pos + T > self.cfg.context_length:
                raise ValueError(f"start_pos={start_pos} plus {T} tokens runs past the model's context_length of "
                                 f"{self.cfg.context_length}: there are positions 0 to "
                                 f"{self.cfg.context_length - 1} only")
            pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # [T]: positions of these tokens
        return self.tok_emb(idx) + self.pos_emb(pos)      # [B, T, d] + [T, d] (broadcast) or [B, T, d]

    def forward(self, idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab_size]`` for ids ``idx`` of shape ``[batch, tokens]``.

        Args:
            kv_cache: ``None``, or (step 5) a :class:`course_lib.inference.KVCache` holding
                the keys and values of the tokens before ``idx``. The model reads
                ``kv_cache.pos`` (an int, or a ``[batch]`` tensor of per-row positions) as
                the position of ``idx``'s first token, hands the cache to every attention
                layer, then calls ``kv_cache.advance(tokens)``.

        Raises:
            TypeError: ``kv_cache`` is not ``None`` nor a cache (it has no ``pos``); see the
                class docstring for ``idx``.
        """
        if kv_cache is None:
            start = 0
        else:
            start = getattr(kv_cache, "pos", None)
            if start is None:
                raise TypeError(f"kv_cache must be None or a course_lib.inference.KVCache (e.g. "
                                f"KVCache.for_model(model, batch_size)), got {type(kv_cache).__name__}")
        self._check_idx(idx, start)
        if kv_cache is not None and idx.shape[0] != kv_cache.batch_size:
            raise ValueError(f"idx has a batch of {idx.shape[0]} but the KV cache was made for {kv_cache.batch_size}")
        x = self.drop_emb(self.embed(idx, start))         # [B, T, d]
        for i, block in enumerate(self.trf_blocks):
            x = block(x, kv_cache, i)                     # [B, T, d]
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        x = self.final_norm(x)                            # [B, T, d]
        return self.out_head(x)                           # [B, T, V]

    def extra_repr(self) -> str:
        return f"tie_weights={self.tie_weights}"


# --------------------------------------------------------------------------- #
# What a model weighs
# --------------------------------------------------------------------------- #
def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in ``model``, each shared tensor counted once.

    A tied :class:`GPTModel` holds its embedding matrix once, so it counts once:
    ``module.parameters()`` already skips repeats.

    Args:
        model: any ``nn.Module`` (works on the ``meta`` device: nothing is allocated).
        trainable_only: count only parameters with ``requires_grad`` (e.g. after freezing).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``trainable_only`` not ``True``/``False``.
    """
    _check_module(model)
    trainable_only = boolean("trainable_only", trainable_only)  # "no" would read as True
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _dtype_size(dtype) -> int:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                   "float": "float32", "double": "float64"}
        candidate = getattr(torch, aliases.get(name, name), None)
        if not isinstance(candidate, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype such as torch.bfloat16 or a name "
                             "such as 'float32', 'bfloat16', 'float16'")
        dtype = candidate
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be None, a torch.dtype or its name, got {type(dtype).__name__}")
    return torch.empty((), dtype=dtype, device="meta").element_size()


def model_memory_bytes(model: nn.Module, dtype: torch.dtype | str | None = None,
                       include_buffers: bool = False) -> int:
    """Bytes needed to hold ``model``'s parameters (what inference needs before activations).

    Args:
        model: any ``nn.Module``; shared (tied) tensors count once. Works on ``meta``.
        dtype: the dtype to price every parameter in (``torch.bfloat16`` or ``"bf16"`` halves
            float32's figure); ``None`` uses each tensor's own dtype.
        include_buffers: add the buffers too, each at its own dtype (e.g. the attention
            layers' boolean causal masks, one byte per entry). Default ``False``, matching
            :func:`course_lib.anatomy.memory_bytes`, which counts weights only.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``dtype`` is not a dtype, or
            ``include_buffers`` not ``True``/``False``.
        ValueError: an unknown dtype name.
    """
    _check_module(model)
    include_buffers = boolean("include_buffers", include_buffers)  # "no" would read as True
    size = None if dtype is None else _dtype_size(dtype)
    total = sum(p.numel() * (p.element_size() if size is None else size) for p in model.parameters())
    if include_buffers:  # buffers keep their own dtype (a boolean mask stays one byte per entry)
        total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total
