"""Step 1 — the anatomy of a GPT: parameters, memory and compute, from the config alone.

Everything here is arithmetic on a :class:`~course_lib.config.GPTConfig`; no model is
built. The counts describe the GPT-2 architecture that step 4 builds (and that Hugging
Face's ``GPT2LMHeadModel`` implements): learned token and position embeddings, ``n_layers``
pre-norm blocks (LayerNorm -> causal multi-head attention -> shortcut, LayerNorm ->
4x feed-forward with GELU -> shortcut), a final LayerNorm, and a bias-free output head
that is either tied to the token embedding (GPT-2) or separate.

FLOPs count matrix multiplications, two FLOPs per multiply-add, as in PaLM (Chowdhery et
al., 2022, appendix B): a forward pass costs ``2·N`` per token for the ``N = 12·L·d² + V·d``
weights that multiply every token (the blocks' linear layers and the output head; embedding
look-ups, biases and norms are negligible), plus ``4·L·T·d`` for the attention scores and
the weighted sum of values over a context of ``T`` tokens. Training (forward + backward)
costs three times the forward pass: the familiar ``C ≈ 6·N·D`` for ``D`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import boolean, finite_number, integer
from .config import GPTConfig

__all__ = [
    "parameter_counts",
    "count_parameters",
    "memory_bytes",
    "training_memory_bytes",
    "matmul_parameters",
    "flops_per_token",
    "training_flops",
    "BudgetPlan",
    "score_plan",
    "DTYPE_BYTES",
    "PUBLISHED_GPT2_PARAMETERS",
]

#: Bytes per parameter for the dtypes the course uses.
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1}

#: Parameter counts of OpenAI's released GPT-2 checkpoints (tied embeddings), as reported by
#: Hugging Face's ``GPT2LMHeadModel.num_parameters()`` for each hub model.
PUBLISHED_GPT2_PARAMETERS = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def _check_cfg(cfg: GPTConfig) -> None:
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"cfg must be a GPTConfig (e.g. get_config('gpt2-small')), got {type(cfg).__name__}")


def parameter_counts(cfg: GPTConfig, tied: bool = True) -> dict[str, int]:
    """Parameters per component of a GPT-2-style model.

    Args:
        cfg: the model configuration.
        tied: whether the output head shares the token-embedding matrix (GPT-2 does).

    Returns:
        a dict with ``token_embedding``, ``position_embedding``, ``attention``,
        ``feed_forward``, ``layer_norms``, ``output_head`` (0 when tied), ``total``,
        ``non_embedding`` (total minus both embeddings and an untied head) and
        ``per_block``.

    Raises:
        TypeError: ``cfg`` is not a ``GPTConfig``, or ``tied`` not ``True``/``False``.
    """
    _check_cfg(cfg)
    tied = boolean("tied", tied)  # "no" would read as True
    d, V, T, L = cfg.emb_dim, cfg.vocab_size, cfg.context_length, cfg.n_layers
    token = V * d
    position = T * d
    attn = 3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + d  # W_q,W_k,W_v (+bias), out_proj (+bias)
    ff = d * 4 * d + 4 * d + 4 * d * d + d                           # expand (+bias), contract (+bias)
    norms = 2 * (2 * d)                                              # two LayerNorms (scale, shift) per block
    head = 0 if tied else V * d
    blocks = L * (attn + ff + norms)
    final_norm = 2 * d
    total = token + position + blocks + final_norm + head
    return {
        "token_embedding": token,
        "position_embedding": position,
        "attention": L * attn,
        "feed_forward": L * ff,
        "layer_norms": L * norms + final_norm,
        "output_head": head,
        "per_block": attn + ff + norms,
        "non_embedding": blocks + final_norm,
        "total": total,
    }


def count_parameters(cfg: GPTConfig, tied: bool = True) -> int:
    """Total parameters of the model ``cfg`` describes (see :func:`parameter_counts`)."""
    return parameter_counts(cfg, tied)["total"]


def _bytes_per(dtype: str) -> int:
    key = str(dtype).replace("torch.", "")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def memory_bytes(cfg: GPTConfig, dtype: str = "float32", tied: bool = True) -> int:
    """Bytes needed to hold the weights alone (what inference needs before activations)."""
    return count_parameters(cfg, tied) * _bytes_per(dtype)


def training_memory_bytes(cfg: GPTConfig, dtype: str = "float32", tied: bool = True) -> int:
    """Weights + gradients + AdamW's two moments, all in ``dtype`` (activations not included).

    With mixed precision the optimizer state is usually kept in float32; this simple model
    keeps everything in one dtype so the four-copies rule of thumb is visible.
    """
    return 4 * memory_bytes(cfg, dtype, tied)


def matmul_parameters(cfg: GPTConfig) -> int:
    """Weights that multiply every token: the blocks' linear layers and the output head."""
    _check_cfg(cfg)
    d = cfg.emb_dim
    return cfg.n_layers * 12 * d * d + cfg.vocab_size * d


def flops_per_token(cfg: GPTConfig, training: bool = True, n_ctx: int | None = None) -> int:
    """FLOPs to process one token: ``2·N + 4·L·n_ctx·d`` forward, three times that to train.

    ``N`` is :func:`matmul_parameters`; ``n_ctx`` defaults to the full context length.

    Raises:
        TypeError: ``cfg`` is not a ``GPTConfig``, ``training`` not ``True``/``False``, or
            ``n_ctx`` not an integer (``2.9`` is refused, not truncated).
        ValueError: ``n_ctx`` below 1.
    """
    _check_cfg(cfg)
    training = boolean("training", training)  # "no" would read as True
    n_ctx = cfg.context_length if n_ctx is None else integer("n_ctx", n_ctx, minimum=1)
    forward = 2 * matmul_parameters(cfg) + 4 * cfg.n_layers * n_ctx * cfg.emb_dim
    return 3 * forward if training else forward


def training_flops(cfg: GPTConfig, n_tokens: int) -> int:
    """Total FLOPs to train ``cfg`` on ``n_tokens`` tokens (≈ 6·N·D plus attention).

    Raises:
        TypeError: ``cfg`` is not a ``GPTConfig``, or ``n_tokens`` not an integer (``2.5``
            is refused, not truncated; write ``10_000_000_000`` rather than ``1e10``).
        ValueError: ``n_tokens`` negative.
    """
    n_tokens = integer("n_tokens", n_tokens, minimum=0)
    return flops_per_token(cfg, training=True) * n_tokens


@dataclass(frozen=True)
class BudgetPlan:
    """The verdict on a plan: a model and a token count against a compute budget."""

    parameters: int
    tokens: int
    flops: int
    budget_flops: float
    tokens_per_parameter: float
    budget_used: float  # fraction of the budget spent
    score: float        # 0..100: spends the budget well and feeds the model ~20 tokens per parameter

    def __str__(self) -> str:
        return (f"{self.parameters / 1e6:,.1f}M parameters x {self.tokens / 1e9:,.3f}B tokens = "
                f"{self.flops:.3e} FLOPs ({self.budget_used:.0%} of budget), "
                f"{self.tokens_per_parameter:.1f} tokens/parameter -> score {self.score:.0f}/100")


def score_plan(cfg: GPTConfig, n_tokens: int, budget_flops: float, tied: bool = True) -> BudgetPlan:
    """Score a training plan for a compute budget (the step-1 Ri challenge).

    Hoffmann et al. (2022, "Chinchilla") found the loss-optimal use of a budget trains about
    20 tokens per parameter. The score is 100 for a plan that spends 90-100% of the budget at
    20 tokens/parameter, falls with the log-distance from 20, and is 0 over budget.

    Raises:
        TypeError: ``cfg`` is not a ``GPTConfig``, ``n_tokens`` not an integer, or ``tied``
            not ``True``/``False``.
        ValueError: ``n_tokens`` negative, or ``budget_flops`` not a finite number above 0
            (NaN and inf included).
    """
    import math

    budget_flops = finite_number("budget_flops", budget_flops, positive=True, hint=" (FLOPs, e.g. 1e18)")
    n_tokens = integer("n_tokens", n_tokens, minimum=0)
    n = count_parameters(cfg, tied)
    flops = training_flops(cfg, n_tokens)
    used = flops / budget_flops
    tpp = n_tokens / n
    if used > 1.0 or n_tokens <= 0:
        score = 0.0
    else:
        ratio_penalty = min(1.0, abs(math.log10(tpp / 20.0)))  # one decade away = 0
        spend_penalty = max(0.0, 0.9 - used) / 0.9             # unspent budget is wasted
        score = 100.0 * (1 - ratio_penalty) * (1 - spend_penalty)
    return BudgetPlan(n, int(n_tokens), flops, float(budget_flops), tpp, used, score)
