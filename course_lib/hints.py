"""Progressive hints for the Ha exercises, behind ``course hint`` (cross-cutting: imports no step module).

Every exercise of steps 1-9 (the public functions of ``exercises/stepNN.py``) has three hints:
1 a nudge (where to look), 2 the idea (the approach in words, with shapes), 3 the key line (the
crux, never the whole function). ``tests/test_hints.py`` holds them to that: three per exercise,
no stale names, and no hint holding the reference solution's body or two of its lines.

* :data:`HINTS` — step -> exercise -> its three hints, in the order of the exercise files.
* :func:`hints_for` — the three hints of one exercise (a clear error for a wrong name).
* :func:`next_hint` — reveal one more hint and remember it in :func:`hints_file`.
* :func:`revealed` — how many hints of each exercise of a step have been revealed.
* :func:`format_hints` — hints as ``course hint`` prints them.

>>> hints_for(3, "causal_mask")[0][:31]
'Notebook 03, "Shu 4 — The causa'
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple

from .checks import describe, integer
from .files import atomic_write, move_aside

__all__ = ["HINTS", "LEVELS", "HintsFileWarning", "HintsFileError", "Revealed", "hints_file", "hints_for",
           "next_hint", "revealed", "format_hints"]

#: Hints per exercise: a nudge, the idea, the key line.
LEVELS = 3
#: The format version of the file of revealed hints; a file of a newer one is left alone.
VERSION = 1
#: The narrowest ``width`` :func:`format_hints` wraps to.
MIN_WIDTH = 20


class HintsFileWarning(UserWarning):
    """The file of revealed hints was damaged: it was moved aside and counting started anew."""


class HintsFileError(OSError):
    """The file of revealed hints was written by a newer course (a newer ``"version"``); it is left as it is.

    An ``OSError``, like the file's other problems (a folder in its place), so that ``course hint`` says so
    in one line."""


class Revealed(NamedTuple):
    """What :func:`next_hint` revealed.

    Attributes:
        level: hints revealed now, 1 to :data:`LEVELS`.
        hints: the first ``level`` hints.
        new: ``False`` when every hint had been revealed before (nothing more to show).
    """

    level: int
    hints: tuple[str, ...]
    new: bool


def hints_file() -> Path:
    """Where revealed hints are remembered: ``$COURSE_HINTS_FILE``, else ``hints_seen.json`` in
    :func:`course_lib.data.default_cache_dir`."""
    env = os.environ.get("COURSE_HINTS_FILE", "").strip()
    if env:
        return Path(env).expanduser()
    from .data import default_cache_dir

    return default_cache_dir() / "hints_seen.json"


def _valid_step(step) -> int:
    step = integer("step", step)
    if step not in HINTS:
        raise ValueError(f"there is no step {step}; the steps with exercises are {', '.join(map(str, HINTS))}")
    return step


def _unknown_exercise(step: int, exercise: str) -> str:
    names = list(HINTS[step])
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(exercise.lower(), list(by_lower), n=1, cutoff=0.6)
    guess = f"; did you mean {by_lower[close[0]]!r}?" if close else ""
    return f"step {step} has no exercise {exercise!r}{guess} Its exercises are: {', '.join(names)}"


def hints_for(step: int, exercise: str) -> tuple[str, str, str]:
    """The three hints of one exercise: a nudge, the idea, the key line.

    Args:
        step: 1 to 9.
        exercise: the function's name in ``exercises/stepNN.py``, e.g. ``"causal_mask"``.

    Raises:
        ValueError: no such step, or no such exercise in it (the message lists the valid names
            and the closest one).
        TypeError: ``step`` is not an integer or ``exercise`` not a string.
    """
    step = _valid_step(step)
    if not isinstance(exercise, str):
        raise TypeError(f"exercise must be the name of a function in exercises/step{step:02d}.py, a str; "
                        f"got {type(exercise).__name__}")
    if exercise not in HINTS[step]:
        raise ValueError(_unknown_exercise(step, exercise))
    return HINTS[step][exercise]


def _path(path) -> Path:
    """``path`` (default :func:`hints_file`) as a :class:`~pathlib.Path`, ``~`` expanded as ``atomic_write`` does."""
    if path is None:
        return hints_file()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be the file of revealed hints (a str or Path) or None, got {describe(path)}")
    return Path(path).expanduser()


def _validated(data) -> dict[str, dict[str, int]]:
    """``data["seen"]`` of a hints file, or a ``ValueError`` saying what is wrong with it."""
    if not isinstance(data, dict) or not isinstance(data.get("seen"), dict):
        raise ValueError('expected a JSON object with a "seen" object')
    for step, row in data["seen"].items():
        if not isinstance(row, dict):
            raise ValueError(f"step {step!r} holds {type(row).__name__}, not an object")
        for name, level in row.items():
            if type(level) is not int or not 0 <= level <= LEVELS:
                raise ValueError(f"{name!r} of step {step} holds {level!r}, not a count from 0 to {LEVELS}")
    return data["seen"]


def _load(path: Path) -> dict[str, dict[str, int]]:
    """The revealed counts in ``path`` (``{}`` if it does not exist; a damaged file is moved aside, with a
    :class:`HintsFileWarning`)."""
    if path.is_dir():
        raise IsADirectoryError(f"the file of hints you have seen, {path}, is a folder; give a file path, e.g. "
                                f"{path / 'hints_seen.json'}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except NotADirectoryError:
        above = next((p for p in path.parents if p.is_file()), path.parent)
        raise NotADirectoryError(f"the file of hints you have seen, {path}, cannot be used: {above} is a file, not a "
                                 "folder; choose a path in a folder") from None
    try:
        data = json.loads(raw.decode("utf-8"))
        version = data.get("version") if isinstance(data, dict) else None
        if type(version) is int and version > VERSION:
            raise HintsFileError(f"the file of hints you have seen, {path}, has format version {version}, written by "
                                 "a newer course; it is left as it is: update the course (git pull)")
        return _validated(data)
    except ValueError as err:  # not UTF-8, not JSON, or not our shape
        aside = move_aside(path)
        warnings.warn(f"the file of hints you have seen, {path}, was damaged ({err}); it was moved to "
                      f"{aside.name} and counting starts anew", HintsFileWarning, stacklevel=3)
        return {}


def _save(path: Path, seen: dict[str, dict[str, int]]) -> None:
    text = json.dumps({"version": VERSION, "seen": seen}, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), overwrite=True)


def revealed(step: int, path: str | os.PathLike | None = None) -> dict[str, int]:
    """How many hints of each exercise of ``step`` have been revealed, ``{exercise: 0..3}`` in the
    order of the exercise file.

    Args:
        step: 1 to 9.
        path: the file of revealed hints. Default: :func:`hints_file`.

    Raises:
        ValueError: no such step. TypeError: ``path`` is not a path.
        OSError: the file exists but cannot be read: IsADirectoryError (``path`` is a folder),
            NotADirectoryError (a folder above it is a file), :class:`HintsFileError` (written by a newer
            course); the message says which, and the file is left as it is.
    """
    step = _valid_step(step)
    row = _load(_path(path)).get(str(step), {})
    return {name: row.get(name, 0) for name in HINTS[step]}


def next_hint(step: int, exercise: str, path: str | os.PathLike | None = None) -> Revealed:
    """Reveal one more hint of an exercise (up to :data:`LEVELS`) and remember it.

    The first call reveals hint 1, the next hints 1-2, then 1-3; later calls reveal nothing new.
    The counts live in a small JSON file written atomically; a damaged one is moved aside to
    ``<name>.damaged-<timestamp>`` (with a :class:`HintsFileWarning`) and counting starts anew.

    Args:
        step: 1 to 9.
        exercise: the function's name in ``exercises/stepNN.py``.
        path: the file of revealed hints (``~`` is expanded). Default: :func:`hints_file`
            (``$COURSE_HINTS_FILE``, else ``hints_seen.json`` in the data folder).

    Returns:
        :class:`Revealed`: the level now reached, the hints up to it, and whether it is new.

    Raises:
        ValueError, TypeError: as :func:`hints_for`; TypeError: ``path`` is not a path.
        OSError: the file cannot be read or written (as :func:`revealed`: a file of a newer course is a
            :class:`HintsFileError` and is never rewritten).
    """
    texts = hints_for(step, exercise)
    path = _path(path)
    seen = _load(path)
    before = seen.get(str(step), {}).get(exercise, 0)
    level = min(before + 1, LEVELS)
    if level > before:
        seen.setdefault(str(step), {})[exercise] = level
        _save(path, seen)
    return Revealed(level, texts[:level], level > before)


def format_hints(step: int, exercise: str, level: int, width: int | None = None) -> str:
    """Hints 1 to ``level`` of an exercise under a title line, wrapped to ``width`` columns
    (default: the terminal's, at most 100).

    Raises:
        ValueError, TypeError: as :func:`hints_for`; ``level`` is not an integer >= 1, ``width`` not an
            integer >= 20 (or ``None``).
    """
    texts = hints_for(step, exercise)[:integer("level", level, minimum=1)]
    width = integer("width", width, minimum=MIN_WIDTH, allow_none=True,
                    hint=" (columns to wrap to; None: the terminal's width)")
    width = width or min(100, shutil.get_terminal_size((100, 24)).columns)
    lines = [f"step {step}, {exercise}:"]
    for k, text in enumerate(texts, 1):
        lines.append(textwrap.fill(text, width=width, initial_indent=f"  {k}. ", subsequent_indent="     "))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- #
# The hints. Level 1 nudges (where to look), level 2 gives the idea, level 3 the key line.       #
# Every public function of exercises/stepNN.py has an entry here, in the file's order.           #
# --------------------------------------------------------------------------------------------- #

HINTS: dict[int, dict[str, tuple[str, str, str]]] = {
    1: {
        "count_parameters": (
            'Notebook 01, "Shu 3 — The anatomy of GPT-2: parameters, memory, FLOPs", counted GPT-2 small piece by '
            "piece: the two embeddings, one block (times n_layers), the final LayerNorm, the head.",
            "A `Linear(i, o)` holds `i*o` weights plus `o` biases. Per block: four `emb_dim x emb_dim` attention "
            "matrices (only the three QKV biases depend on `qkv_bias`; the output projection always has one), the "
            "feed-forward pair `emb_dim -> 4*emb_dim -> emb_dim` with both biases, and two LayerNorms of "
            "`2*emb_dim`. A tied head adds nothing.",
            "The total is `embeddings + n_layers * block + 2 * emb_dim + head`: the final LayerNorm's `2 * emb_dim` "
            "is added once, outside the `n_layers` product, and `head` is `vocab_size * emb_dim` only when not "
            "`tied`.",
        ),
        "bigram_counts": (
            'Notebook 01, "Shu 2 — A language model is a distribution over the next token", counted character '
            "pairs of The Verdict with a `Counter`; do the same for any tokens.",
            "Walk over neighbouring pairs (token i, token i+1): n tokens have n-1 of them. Count each pair and return "
            "a plain dict that holds only the pairs that occur.",
            "`zip(tokens, tokens[1:])` yields exactly the neighbouring pairs; `collections.Counter` counts them, and "
            "`dict(...)` turns the counter into a plain dict.",
        ),
        "next_token_probs": (
            'One row of the bigram table turned into a distribution, as in notebook 01, "Shu 2 — A language model '
            'is a distribution over the next token".',
            "Keep only the pairs whose first token is `prev`, add up their counts, and divide each count by that "
            "total. When nothing starts with `prev` the total is 0 and 0/0 is no distribution: raise `ValueError` "
            "before dividing.",
            "`{nxt: c for (first, nxt), c in counts.items() if first == prev}` is the row of `prev`; divide each of "
            "its counts by the row's sum.",
        ),
        "sample_with_temperature": (
            'Notebook 01, "Sampling: generation is repeated prediction": temperature reshapes the distribution '
            "before the draw. Handle the special cases (T < 0, T == 0) first.",
            "T == 0 cannot be divided by: return the argmax. Otherwise turn `log(p) / T` back into probabilities "
            "with a softmax (that is `p^(1/T)` renormalised, without underflow), draw one index with "
            "`torch.multinomial(..., 1, generator=generator)` and return it as `int(...)`.",
            "`torch.softmax(torch.log(probs) / temperature, dim=-1)` is the reshaped distribution; pass "
            "`generator=generator` on, so that a seeded generator repeats its draws.",
        ),
    },
    2: {
        "decode_words": (
            'Notebook 02, "Shu 2 — A vocabulary, and the special tokens", wrote this decoder for the word-level '
            "tokenizer; the docstring's example shows the exact spacing wanted.",
            "Look up every id and join the tokens with single spaces. Then fix the spacing with two regular "
            "expressions: drop the whitespace before `, . : ; ? ! )`, and the whitespace after `(`. No ids give "
            '`""`.',
            'The second rule is `re.sub(r"\\(\\s+", "(", ...)`: an escaped bracket, then the whitespace after it, '
            "replaced by the bracket alone.",
        ),
        "count_pairs": (
            'Notebook 02, "Shu 4 — Byte-pair encoding, trained live": BPE counts every pair of neighbours, '
            "overlapping ones included (`aaa` holds two `(a, a)`).",
            "Go over each id and the one after it, and keep a dict from pair to count, adding 1 each time a pair is "
            "seen. Fewer than two ids have no pairs, so `{}` comes out without a special case.",
            "`zip(ids, ids[1:])` yields the neighbouring pairs, overlaps included; `counts.get(pair, 0) + 1` (or a "
            "`collections.Counter`) counts them.",
        ),
        "merge_pair": (
            'Notebook 02, "Shu 4 — Byte-pair encoding, trained live", wrote `merge` for the live trainer; look at '
            "what it does with `aaa`.",
            "Walk with an index `i` in a `while` loop (a `for` loop cannot skip): where `ids[i], ids[i + 1]` is the "
            "pair, emit `new_id` and move on by 2, else emit `ids[i]` and move on by 1. Build a new list; never "
            "modify `ids`.",
            "Test `i + 1 < len(ids)` before reading `ids[i + 1]` (the last id has no partner), and jump with "
            "`i += 2` after a match so that matches never overlap.",
        ),
        "window_starts": (
            'Notebook 02, "Shu 6 — Sliding windows: from one long sequence to training examples", drew these '
            "windows: a window needs `max_length` inputs plus one more token for its last target.",
            "Starts go `0, stride, 2 * stride, ...`; a start `s` fits when `s + max_length + 1 <= num_tokens`, that "
            "is `s < num_tokens - max_length`. Python's `range` with a start, a stop and a step gives such a list "
            "(empty when there are too few tokens).",
            "The range stops (exclusively) at `num_tokens - max_length`: a window starting there would need the "
            "target `ids[num_tokens]`, which does not exist.",
        ),
        "sliding_windows": (
            'Build on `window_starts` (the exercise above) and notebook 02, "Shu 6 — Sliding windows: from one long '
            'sequence to training examples". Check the error case first: fewer than `max_length + 1` ids fit no '
            "window.",
            "For each start `s` the inputs are `max_length` ids from `s`, and the targets the same slice moved one "
            "token right. Turn `ids` into a `torch.long` tensor once, slice it per window, and `torch.stack` the "
            "slices into `[num_windows, max_length]`.",
            "The targets are `ids[s + 1 : s + max_length + 1]`: one later at both ends, so that `targets[w, t]` is "
            "the token after `inputs[w, t]`.",
        ),
        "one_hot_embed": (
            'Notebook 02, "Shu 7 — Embeddings: from ids to vectors", showed that an embedding lookup is a one-hot '
            "matrix times the weight.",
            "`F.one_hot` makes a `[..., vocab_size]` tensor of 0s and 1s; the vocabulary size is `weight.shape[0]` "
            "(pass it as `num_classes`, or an id missing from the batch shrinks the matrix). Convert it to the "
            "weight's dtype and multiply: `[..., V] @ [V, emb_dim] -> [..., emb_dim]`.",
            "`F.one_hot(ids.long(), num_classes=weight.shape[0]).to(weight.dtype)` is the one-hot matrix; a plain "
            "matrix product with `weight` keeps the gradients flowing to the rows used.",
        ),
    },
    3: {
        "attention_weights_for_query": (
            'Notebook 03, "Shu 3 — Queries, keys and values": one query scored against every key, scaled, then '
            'softmax-ed ("Shu 2 — Attention is a weighted average" says why the weights sum to 1).',
            "`keys` is `[T, d]` and `query` `[d]`, so `keys @ query` is `[T]`: one dot product per key. Divide by "
            "`sqrt(d)` with `d = query.shape[-1]`, then take the softmax over those T scores.",
            "`torch.softmax(scores / math.sqrt(d), dim=-1)`: forgetting the `sqrt(d)` is the usual mistake (the "
            "random check uses d = 16, where it matters).",
        ),
        "causal_mask": (
            'Notebook 03, "Shu 4 — The causal mask": `True` marks the future, the keys a query may not look at.',
            "Row i is the query, column j the key; `mask[i, j]` is `True` exactly when `j > i`: everything strictly "
            "above the diagonal. Return `dtype=torch.bool`, shape `[num_tokens, num_tokens]`.",
            "`torch.triu(..., diagonal=1)` keeps what lies strictly above the diagonal; apply it to a square tensor "
            "of ones made with `dtype=torch.bool`.",
        ),
        "causal_softmax": (
            'Notebook 03, "Shu 4 — The causal mask": the mask is applied before the softmax, so that each row '
            "renormalises over the keys it may see.",
            "Build the `[T, T]` mask for `T = scores.shape[-1]` (your `causal_mask`, on `scores.device`); it "
            "broadcasts over any leading dimensions. Put `-inf` in the masked places (exp(-inf) is exactly 0) and "
            "take the softmax over the last dimension. Zeroing weights after the softmax leaves rows that no longer "
            "sum to 1.",
            '`scores.masked_fill(mask, float("-inf"))`, then `torch.softmax(..., dim=-1)` over the keys.',
        ),
        "split_heads": (
            'Notebook 03, "Shu 6 — Multi-head attention": each head owns a contiguous slice of `D = d // num_heads` '
            "columns.",
            "Raise `ValueError` first when `d % num_heads` is not 0. Then split the last dimension into "
            "`[num_heads, D]` (giving `[B, T, H, D]`) and swap the token and head axes to get `[B, H, T, D]`. "
            "Viewing straight to `[B, H, T, D]` mixes tokens into heads.",
            "`.view(B, T, num_heads, D)` and then `.transpose(1, 2)`: the heads move in front of the tokens.",
        ),
        "merge_heads": (
            'It is `split_heads` run backwards (notebook 03, "Shu 6 — Multi-head attention"): undo the transpose '
            "first, then the view.",
            "From `[B, H, T, D]` swap heads and tokens back to `[B, T, H, D]`, then flatten the last two axes into "
            "`H * D`. After a transpose the memory is no longer in row order and `.view` refuses: use `.reshape`, or "
            "`.contiguous()` before `.view`.",
            "Transpose dims 1 and 2 first and only then reshape to `(B, T, H * D)`: reshaping first interleaves the "
            "tokens of different heads.",
        ),
        "causal_attention": (
            'Put your pieces together (notebook 03, "Shu 4 — The causal mask" and "Shu 6 — Multi-head attention"): '
            "scaled scores, the causal softmax, a weighted sum of the values.",
            "For `q, k` of shape `[..., T, D]` the scores are `q` times `k` transposed in its last two dimensions, "
            "`[..., T, T]`, divided by `sqrt(D)` with `D = q.shape[-1]`. Your `causal_softmax` turns them into "
            "weights, and weights `@ v` is `[..., T, D]`.",
            "`k.transpose(-2, -1)`, not `k.T` (which reverses every dimension of a 4-D tensor), turns the keys "
            "`[..., T, D]` into `[..., D, T]` for the product with `q`.",
        ),
    },
    4: {
        "layer_norm": (
            'Notebook 04, "Shu 2 — Layer normalisation": the statistics are taken over the last dimension, '
            "separately for every vector (every token).",
            "Take the mean and the biased variance (divide by n, not n - 1: `unbiased=False`, or the mean of the "
            "squared deviations) over `dim=-1` with `keepdim=True`, so that they broadcast back as `[..., 1]`. "
            "Normalise, then scale by `weight` and shift by `bias`.",
            "`(x - mean) / torch.sqrt(var + eps)`: `eps` goes inside the square root, added to the variance, not "
            "to the standard deviation.",
        ),
        "block_parameter_count": (
            'Notebook 04, "Shu 8 — Parameters and memory of GPT-2 small", and step 1\'s `count_parameters`: this is '
            "one block of that count, with a free hidden size.",
            "`nn.Linear(i, o)` holds `i*o + o` numbers (`i*o` without a bias). Add two LayerNorms (`2*emb_dim` "
            "each), four `emb_dim x emb_dim` attention matrices with the three optional QKV biases and the output "
            "projection's bias, and the feed-forward pair `emb_dim -> hidden -> emb_dim` with both biases.",
            "Settle the hidden size before counting: `4 * emb_dim if hidden_dim is None else hidden_dim`. The "
            "output projection's bias is there even when `qkv_bias` is False.",
        ),
        "transformer_block_forward": (
            'Notebook 04, "Shu 5 — Shortcut connections" and "Shu 6 — The transformer block": GPT-2 normalises '
            "each sub-layer's input (pre-norm) and adds the sub-layer's output back to the un-normalised stream.",
            "Two shortcuts in sequence: the second starts from the result of the first. Apply dropout to each "
            "sub-layer's output before adding it; with `dropout=None`, use the identity (`lambda t: t`).",
            "`x = x + drop(attention(norm1(x)))`: the shortcut adds `x`, not `norm1(x)`. The feed-forward shortcut "
            "repeats the pattern on the new `x`.",
        ),
        "generate_greedy": (
            'Notebook 04, "Shu 9 — Generating text from an untrained model": a loop that asks the model for one '
            "next token, `max_new_tokens` times.",
            "Each round: crop `idx` to its last `context_size` tokens, run the model under `torch.no_grad()`, keep "
            "only the last position's logits (`[batch, vocab]`), take the argmax and append it along dim 1. Rebind "
            "`idx = torch.cat(...)` rather than changing the prompt tensor in place.",
            "`logits[:, -1, :].argmax(dim=-1, keepdim=True)` is the `[batch, 1]` next id; `keepdim=True` makes it "
            "ready to concatenate along the token dimension.",
        ),
    },
    5: {
        "perplexity_from_loader": (
            'Notebook 05, "Shu 2 — Cross-entropy and perplexity, by hand and with torch": perplexity is `exp` of the '
            "mean cross-entropy per token. Here the mean is over tokens, not over batches.",
            "Keep two running totals over the loader: the summed cross-entropy of every target token, and the number "
            "of target tokens (`targets.numel()`). Flatten the logits to `[B*T, V]` and the targets to `[B*T]`. No "
            'tokens at the end: return `float("nan")`; otherwise `math.exp` of the loss total over the token count.',
            "`F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=\"sum\")` is one batch's summed "
            "loss (add its `.item()`); averaging per batch instead over-weights a short last batch.",
        ),
        "lr_at_step": (
            "Three phases, checked in order: warmup (`step < warmup_steps`), the cosine decay, then `min_lr` from "
            "`total_steps` on. Work the docstring's three examples on paper first.",
            "Warmup is linear and uses `step + 1`, so step 0 already gets `max_lr / warmup_steps`. The decay "
            "measures `progress` from 0 at `warmup_steps` towards 1 at `total_steps`; half a cosine wave, "
            "`0.5 * (1 + cos(pi * progress))`, falls from 1 to 0 and scales `max_lr - min_lr` on top of `min_lr`.",
            "`progress = (step - warmup_steps) / (total_steps - warmup_steps)`, fed to `math.cos(math.pi * "
            "progress)`; return `min_lr` for `step >= total_steps` before computing it, or the cosine climbs back.",
        ),
        "generate_until_eos": (
            "It is step 4's greedy loop (`generate_greedy`) with an early exit; notebook 05's \"Your own "
            '`generate`" (in "Shu 6 — Temperature, top-k and top-p") wrote a similar loop.',
            "Loop at most `max_new_tokens` times: crop to the last `context_size` tokens, run the model under "
            "`torch.no_grad()`, take the argmax of the last position, append it with `torch.cat`. Check for "
            "`eos_id` after appending, so that the end-of-text token stays in the output.",
            "`if next_id.item() == eos_id: break`, right after the `torch.cat`: testing before appending would drop "
            "the end-of-text token.",
        ),
    },
    6: {
        "balance_classes": (
            'Notebook 06, "Shu 3 — Class imbalance, and why we balance": undersampling keeps `n` rows of every '
            "class, `n` being the rarest class's count.",
            "Count the rows per label (`value_counts`) and take the smallest count `n`. Group the rows by label, "
            "draw `n` rows from each group with the seed, and `pd.concat` the draws into a new DataFrame "
            "(no `inplace=True` anywhere, so `df` stays as it was).",
            '`rows.sample(n=n, random_state=seed) for _, rows in df.groupby("label")` gives one draw per class; '
            "concatenate them.",
        ),
        "pad_batch": (
            'Notebook 06, "Shu 6 — Padding and truncation": right padding puts the real ids first and `pad_id` '
            "after them; truncation keeps the first `L` ids.",
            "Settle the width `L` first (`max_length` if given, else the longest list). Start from an `[n, L]` "
            "tensor filled with `pad_id` (`torch.full(..., dtype=torch.long)`), copy each row's first `L` ids into "
            "its start, and record how many you copied in `lengths`. Slices copy, so the input lists stay as they "
            "were.",
            "`ids[row, :len(kept)] = torch.tensor(kept, dtype=torch.long)` with `kept = tokens[:L]` writes one row; "
            "its length is `len(kept)`, not `len(tokens)`.",
        ),
        "freeze_all_but_last_blocks": (
            'Notebook 06, "Shu 7 — The classification head, and which weights train": freezing is '
            "`requires_grad = False`, and the top of the model is what adapts to a new task.",
            "Two passes: first freeze every parameter of the model (it may arrive half-frozen), then unfreeze the "
            "parameters of the last `n_blocks` entries of `model.trf_blocks`, of `model.final_norm` and of "
            "`model.out_head`. Then add up `p.numel()` of the parameters that require gradients.",
            "Careful with 0: `model.trf_blocks[-0:]` is every block, so take no blocks when `n_blocks` is 0 (or "
            "slice from `len(model.trf_blocks) - n_blocks`).",
        ),
        "confusion_over_loader": (
            'Notebook 06, "Shu 12 — Curves, accuracy after, and the confusion matrix": rows are the true class, '
            "columns the predicted one.",
            "Start from `torch.zeros(num_classes, num_classes, dtype=torch.long)`, so that unseen classes keep their "
            "zero rows and columns. Under `torch.no_grad()`, for every batch take the argmax of the logits over the "
            "classes and add 1 at `[true, predicted]` for each row. Call neither `model.eval()` nor `model.train()`.",
            "`model(ids).argmax(dim=-1)` gives the `[batch]` predictions; count each (truth, prediction) pair from "
            "`zip(labels.tolist(), predicted.tolist())` into its cell.",
        ),
    },
    7: {
        "format_prompt_phi3": (
            'Notebook 07, "Shu 2 — The data, and the prompt template", wrote the Alpaca template; Phi-3\'s has the '
            "same shape with other markers. Compare your output with the docstring's examples with `repr`, which "
            "shows every `\\n`.",
            "Three pieces: `\"<|user|>\\n\"` plus the instruction; a newline and the input, only when the input is "
            "not empty; then `\"\\n<|assistant|>\\n\"`. Strip nothing.",
            '`entry.get("input")` is falsy for all three empty cases at once (missing, `None`, `""`), where '
            '`entry["input"]` raises `KeyError` when the key is missing.',
        ),
        "collate_masked": (
            'Notebook 07, "Shu 3 — Padding, the -100 ignore index, and one end-of-text" builds the unmasked '
            'version, and "Shu 4 — Masking the prompt, or not" says which targets to hide. Work the docstring\'s '
            "example by hand first.",
            "The width is the longest `ids` plus 1. Per row: pad to the width with `pad_token_id`; inputs are the "
            "padded row without its last id, targets without its first (clone before editing). In the targets, "
            "positions from `len(ids)` on become `ignore_index`, and so do positions 0 to `prompt_length - 2`. "
            "Stack the rows, and cut both to `allowed_max_length` at the very end.",
            "`y[:max(prompt_length - 1, 0)] = ignore_index` hides the prompt's targets: `targets[t]` is token "
            "`t + 1`, so position `prompt_length - 1`, which predicts the first response token, stays.",
        ),
        "lcs_words": (
            'Notebook 07, "7.2 Exact match and ROUGE-L", filled the LCS table to get its length; keep the table and '
            "walk back through it.",
            "The table has `(len(a) + 1) x (len(b) + 1)` zeros; a cell is the diagonal cell + 1 when the two words "
            "match, else the larger of the cell above and the cell to the left. Then start at the bottom-right "
            "corner and step back while both indices are above 0, collecting matched words; reverse them at the "
            "end.",
            "On a mismatch move towards the larger neighbour: `i -= 1` when `table[i - 1][j] >= table[i][j - 1]`, "
            "else `j -= 1`. On a match take `a[i - 1]` and move diagonally.",
        ),
        "response_logprobs": (
            'Notebook 07, "Shu 8 — Preference tuning with DPO": a response\'s log-probability is the sum of its '
            "tokens' log-probabilities, with the prompt and the padding left out.",
            "`F.log_softmax(logits, dim=-1)` is `[B, T, V]`. Pick each position's target entry with `gather` on the "
            "last dimension (targets `unsqueeze(-1)` to `[B, T, 1]`, then `squeeze(-1)`), after replacing "
            "`ignore_index` by a valid id such as 0; zero the ignored positions and sum over `dim=-1` to get `[B]`.",
            "`targets.masked_fill(targets == ignore_index, 0)` makes every index valid for `gather`; afterwards "
            "multiply by the boolean mask of kept targets so the ignored positions add 0.",
        ),
        "dpo_loss_smoothed": (
            'Notebook 07, "Shu 8 — Preference tuning with DPO", wrote the loss for `e = 0`; smoothing adds a second '
            "term, as if the pair were the other way round.",
            "All four inputs are `[B]`. `h` is `beta` times the chosen log-ratio (policy minus reference) minus the "
            "rejected log-ratio. Per pair, the loss weighs `-logsigmoid(h)` by `1 - e` and `-logsigmoid(-h)` by "
            "`e`; return the mean, a 0-dim tensor.",
            "`F.logsigmoid(-h)` is the rejected-way-round term: not `1 - F.logsigmoid(h)`, and not "
            "`torch.log(torch.sigmoid(-h))`, which gives `-inf` for large margins.",
        ),
    },
    8: {
        "wsd_lr_at": (
            'Notebook 08, "Shu 2 — Warmup and cosine decay, written by you", plotted the library\'s WSD beside the '
            "cosine. Write the four phases as cases and check them against the docstring's 11 values.",
            "Let the decay start at `total_steps - decay_steps`. Check in this order: warmup (`step < "
            "warmup_steps`), after the end (`step >= total_steps`: `min_lr`), stable (before the decay start: "
            "`max_lr`), else the decay. This warmup uses `step` (not `step + 1`) and starts at `warmup_start_lr`.",
            "`t = (step - decay_start) / decay_steps` is 0 at the first decay step (still `max_lr` there); checking "
            "`step >= total_steps` before the decay keeps `decay_steps = 0` from dividing by zero.",
        ),
        "clip_grad_norm": (
            'Notebook 08, "Shu 3 — Gradient clipping, by hand", wrote the 2-norm version: generalise the norm, keep '
            "the rest.",
            "Collect the `.grad` tensors that are not `None` (none: return `torch.tensor(0.0)`). The global p-norm of "
            "all of them equals the p-norm of the per-tensor p-norms, for `inf` too (a max of maxes). Scale by "
            "`max_norm / (norm + 1e-6)` only when that is below 1, in place with `g.mul_`, and return the norm from "
            "before.",
            "`torch.linalg.vector_norm(g, norm_type)` of each gradient, stacked, then `vector_norm` of that stack "
            "with the same `norm_type`: the global norm for every p, `inf` included.",
        ),
        "mfu": (
            'Notebook 08, "Shu 8 — FLOPs per token, tokens per second, and MFU": MFU is the FLOP/s achieved over '
            "the peak FLOP/s, and the FLOP/s achieved are tokens/s times FLOPs per token.",
            "Count `N = 12 * L * d * d + vocab_size * d` (the blocks and the head; the embeddings multiply "
            "nothing). Forward FLOPs per token are `2 * N` plus attention's `4 * L * T * d`; a training step costs "
            "three forwards (the backward is about two).",
            "`3 * (2 * N + 4 * L * T * d)` FLOPs per token: the factor 3 multiplies the attention term as well.",
        ),
        "rank_window_starts": (
            'Notebook 08, "Shu 7 — Token shards and memory mapping" and "Shu 9 — Data parallelism: the same step on '
            'many processes": the ranks share the windows, and all must run the same number of batches.',
            "First list every window start, `0, context_length, 2 * context_length, ...` while `s + context_length "
            "+ 1 <= num_tokens` (step 2's `window_starts` with the stride equal to the length). Each rank keeps "
            "`n // world_size` windows: rank `r` takes windows `r, r + world_size, ...`, and the last "
            "`n % world_size` go to nobody.",
            "Stride-slice, then cut to the common count: `starts[rank::world_size][:len(starts) // world_size]`. "
            "Without the cut, the low ranks get one window more.",
        ),
        "decay_param_names": (
            'Notebook 08, "Shu 6 — Weight decay: which tensors, and why": only the weight matrices of the '
            "`nn.Linear` layers get decay.",
            "`model.named_modules()` yields `(name, module)` for every submodule; keep the `nn.Linear` ones and "
            "build `name + \".weight\"`. A tied head's weight is the very same tensor object as "
            "`model.tok_emb.weight`: compare with `is` and leave it out.",
            "The test is `isinstance(module, nn.Linear) and module.weight is not model.tok_emb.weight`; read "
            "`tok_emb` with `getattr` so that a model without one still works.",
        ),
    },
    9: {
        "lora_scale": (
            'Notebook 09, "Shu 3 — `LoRALinear`, written by you", compared the three scaling conventions across '
            "ranks.",
            "Two cases on `rslora`: divide `alpha` by the rank, or by its square root. Return a Python float "
            "(`math.sqrt`, not a tensor).",
            "`alpha / math.sqrt(rank)` when `rslora` is true, the plain division by `rank` otherwise; never `alpha` "
            "alone.",
        ),
        "lora_forward": (
            'Notebook 09, "Shu 3 — `LoRALinear`, written by you": the adapted layer is the frozen layer\'s output '
            "plus a scaled low-rank correction.",
            "`F.linear(x, weight, bias)` computes `x W^T + b` (and handles `bias=None`). For the adapter go "
            "`[..., in]` times `A^T` (`[in, r]`) to `[..., r]`, then times `B^T` (`[r, out]`) to `[..., out]`; "
            "multiply by `scale` and add.",
            "`(x @ A.T)` is the small `[..., r]` product; multiplying it by `B.T` next means the `[out, in]` matrix "
            "`B @ A` is never formed.",
        ),
        "lora_parameter_count": (
            'Notebook 09, "Shu 4 — Injecting adapters into the model, and counting what trains": an adapter on '
            "`in -> out` adds `r * (in + out)` trainable numbers.",
            "Make a table of `(in, out)` per target name: the four attention projections are `d -> d`, "
            "`ff.layers.0` is `d -> 4d`, `ff.layers.2` is `4d -> d`. The block layers repeat `n_layers` times; "
            "`out_head` (`d -> vocab_size`) exists once.",
            "For `out_head` add `rank * (d + vocab_size)` once; for any other target add "
            "`n_layers * rank * (in + out)`.",
        ),
        "merge_weight": (
            'Notebook 09, "Shu 7 — Merging and unmerging": the adapter\'s update folded into the weight.',
            "`B @ A` is `[out, r] @ [r, in] = [out, in]`, the shape of `weight`. Scale it and add it out of place, "
            "so that a new tensor comes back and `weight` stays as it was.",
            "Write `weight + ...`, never `weight += ...` or `weight.add_(...)`: those change the base weight that "
            "unmerging needs.",
        ),
        "fuse_qkv": (
            'Notebook 09, "Shu 9 — Saving in PEFT\'s format: `transformers` + `peft` read it": GPT-2\'s `c_attn` '
            "is q, k and v in one `d -> 3d` layer, so one adapter must reproduce all three updates.",
            "`A_c` is the three A's stacked along dim 0, `[r_q + r_k + r_v, d]`. `B_c` starts as zeros "
            "`[3d, r_q + r_k + r_v]` with `A_q`'s dtype and device; each `B_*` goes in its own block of rows "
            "(`0:d`, `d:2d`, `2d:3d`) and its own block of columns, the column offset growing by that B's rank.",
            "With a running column offset `col`: `B_c[j * d:(j + 1) * d, col:col + r] = B`, then `col += r`. The "
            "ranks may differ, so the offset is not `j * r`.",
        ),
    },
}
