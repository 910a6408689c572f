"""Checks for step 7's exercises (``course check 7``). ``ex`` is the module being checked.

The references are values and strings worked out by hand, and the library's own versions
(``course_lib.instruction.format_prompt`` and ``collate``, ``course_lib.evaluation.lcs_length``,
``course_lib.preference.sequence_logprobs`` and ``dpo_loss``), which ``tests/test_instruction.py``,
``tests/test_evaluation.py`` and ``tests/test_preference.py`` check against hand computations
and the ``rouge-score`` package. No network, no files.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn

from course_lib.evaluation import lcs_length
from course_lib.instruction import collate, format_prompt
from course_lib.preference import dpo_loss, sequence_logprobs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- #
# format_prompt_phi3
# --------------------------------------------------------------------------- #
def _show(text):
    return repr(text) if isinstance(text, str) else f"a {type(text).__name__}: {text!r}"


@pytest.mark.exercise("format_prompt_phi3")
def test_phi3_prompt_without_input(ex):
    want = "<|user|>\nAdd 2 and 3.\n<|assistant|>\n"                    # written out by hand
    for entry in ({"instruction": "Add 2 and 3.", "input": ""}, {"instruction": "Add 2 and 3."},
                  {"instruction": "Add 2 and 3.", "input": None, "output": "5"}):
        got = ex.format_prompt_phi3(entry)
        assert got == want, (
            f"for {entry!r} expected {want!r}, got {_show(got)}. Hint: '<|user|>\\n' + instruction + "
            "'\\n<|assistant|>\\n'; an empty, None or missing 'input' adds nothing.")


@pytest.mark.exercise("format_prompt_phi3")
def test_phi3_prompt_with_input(ex):
    entry = {"instruction": "Add 2 and 3.", "input": "Be brief."}
    want = "<|user|>\nAdd 2 and 3.\nBe brief.\n<|assistant|>\n"          # written out by hand
    got = ex.format_prompt_phi3(entry)
    assert got == want, (f"for {entry!r} expected {want!r}, got {_show(got)}. Hint: a non-empty input goes on its "
                         "own line, right after the instruction: instruction + '\\n' + input.")


@pytest.mark.exercise("format_prompt_phi3")
def test_phi3_prompt_is_byte_for_byte_the_librarys(ex):
    entries = [
        {"instruction": "Rewrite the sentence in the passive voice.", "input": "The cat chased the mouse."},
        {"instruction": "  Keep my spaces.  ", "input": "  and these  "},
        {"instruction": "List three colours.\nOne per line.", "input": "red\ngreen", "output": "blue"},
        {"instruction": "What is 'ß' in upper case?", "input": ""},
    ]
    for entry in entries:
        want, got = format_prompt(entry, "phi3"), ex.format_prompt_phi3(entry)
        assert got == want, (f"for {entry!r} expected {want!r}, got {_show(got)}. Hint: strip nothing and add "
                             "nothing: the model was trained on these exact bytes.")


# --------------------------------------------------------------------------- #
# collate_masked
# --------------------------------------------------------------------------- #
def _rows(t):
    return t.tolist() if isinstance(t, torch.Tensor) else t


def _collated(ex, batch, **kw):
    got = ex.collate_masked(batch, **kw)
    assert isinstance(got, tuple) and len(got) == 2, (
        f"expected a pair (inputs, targets), got {type(got).__name__}. Hint: return inputs, targets")
    inputs, targets = got
    for name, t in (("inputs", inputs), ("targets", targets)):
        assert isinstance(t, torch.Tensor) and t.dtype == torch.long, (
            f"{name} should be a torch.long tensor, got {getattr(t, 'dtype', type(t).__name__)}. "
            "Hint: torch.tensor(ids, dtype=torch.long), then torch.stack the rows.")
    return inputs, targets


@pytest.mark.exercise("collate_masked")
def test_collate_masked_hand_example(ex):
    batch = [([5, 6, 7, 8], 2), ([9, 4], 1)]
    inputs, targets = _collated(ex, batch, pad_token_id=0)
    want_inputs = [[5, 6, 7, 8], [9, 4, 0, 0]]                          # worked out by hand
    want_targets = [[-100, 7, 8, 0], [4, 0, -100, -100]]
    assert inputs.tolist() == want_inputs, (
        f"inputs: expected {want_inputs}, got {_rows(inputs)}. Hint: append one pad to every row, pad all rows to "
        "the longest + 1, and drop the last position.")
    assert targets.tolist() == want_targets, (
        f"targets: expected {want_targets}, got {_rows(targets)}. Row 0 has a 2-token prompt: its first target "
        "(token 6, a prompt token) is ignored, the rest kept, ending with ONE end-of-text (0). Row 1 keeps its "
        "first end-of-text and ignores the pads after it. Hint: targets = padded[1:], then "
        "targets[len(ids):] = -100 and targets[:prompt_length - 1] = -100.")


@pytest.mark.exercise("collate_masked")
def test_collate_masked_equals_the_librarys_collate(ex):
    rng = random.Random(7)
    for trial in range(20):
        batch = []
        for _ in range(rng.randint(1, 5)):
            ids = [rng.randrange(50256) for _ in range(rng.randint(1, 12))]
            batch.append((ids, rng.randint(0, len(ids))))               # prompt_length 0 .. the whole row
        want_inputs, want_targets = collate(batch, mask_prompt=True)
        inputs, targets = _collated(ex, batch)
        assert inputs.shape == want_inputs.shape and torch.equal(inputs, want_inputs), (
            f"batch {batch}: inputs expected {want_inputs.tolist()}, got {_rows(inputs)}. Hint: the default pad is "
            "50256 (GPT-2's end-of-text), and every row is as long as the longest row + 1, minus one.")
        assert torch.equal(targets, want_targets), (
            f"batch {batch}: targets expected {want_targets.tolist()}, got {_rows(targets)}. Hint: positions "
            "0 .. prompt_length - 2 are prompt targets (-100); position len(ids) - 1 is the end-of-text (kept); "
            "later positions are pads (-100).")


@pytest.mark.exercise("collate_masked")
def test_collate_masked_keeps_the_closing_end_of_text_by_position(ex):
    # The response itself contains the pad id (0): that token is real text and must stay a target,
    # and the end-of-text that closes the row is the one at position len(ids) - 1.
    inputs, targets = _collated(ex, [([3, 5, 0, 6], 1), ([2, 7], 1)], pad_token_id=0)
    want = [[5, 0, 6, 0], [7, 0, -100, -100]]
    assert targets.tolist() == want, (
        f"targets: expected {want}, got {_rows(targets)}. The first row's text contains the pad id 0 (a real "
        "token, kept); its closing end-of-text is at position len(ids) - 1 = 3. Hint: decide by position "
        "(targets[len(ids):] = ignore_index), not by looking for the first pad value.")


@pytest.mark.exercise("collate_masked")
def test_collate_masked_truncates_inputs_and_targets_together(ex):
    batch = [([10, 11, 12, 13, 14, 15], 3), ([20, 21], 1)]
    want_inputs, want_targets = collate(batch, pad_token_id=0, mask_prompt=True, allowed_max_length=4)
    inputs, targets = _collated(ex, batch, pad_token_id=0, allowed_max_length=4)
    assert inputs.shape == (2, 4) and targets.shape == (2, 4), (
        f"with allowed_max_length=4 expected inputs and targets of shape (2, 4), got {tuple(inputs.shape)} and "
        f"{tuple(targets.shape)}. Hint: cut both AFTER shifting, so that they stay aligned: x[:, :4], y[:, :4].")
    assert inputs.tolist() == want_inputs.tolist() and targets.tolist() == want_targets.tolist(), (
        f"expected inputs {want_inputs.tolist()} and targets {want_targets.tolist()}, got {inputs.tolist()} and "
        f"{targets.tolist()}")
    inputs, _ = _collated(ex, batch, pad_token_id=0, allowed_max_length=50)
    assert inputs.shape == (2, 6), (f"allowed_max_length=50 is longer than the batch: nothing to cut, expected "
                                    f"shape (2, 6), got {tuple(inputs.shape)}")


# --------------------------------------------------------------------------- #
# lcs_words
# --------------------------------------------------------------------------- #
def _is_subsequence(small, big) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


@pytest.mark.exercise("lcs_words")
def test_lcs_words_hand_example(ex):
    a, b = "the cat sat on the mat".split(), "the cat is on the mat".split()
    got = ex.lcs_words(a, b)
    want = ["the", "cat", "on", "the", "mat"]                           # the only longest one: by hand
    assert isinstance(got, list), f"expected a list of words, got {type(got).__name__}"
    assert got == want, (f"lcs_words({a}, {b}): expected {want}, got {got!r}. Hint: fill the table, then walk back "
                         "from the bottom-right corner; collect a word on a match, and reverse at the end.")


@pytest.mark.exercise("lcs_words")
def test_lcs_words_edge_cases(ex):
    cases = [([], ["a"], []), (["a"], [], []), ([], [], []), (["x", "y"], ["p", "q"], []),
             (["a", "b", "c"], ["a", "b", "c"], ["a", "b", "c"]), (["a", "b", "c"], ["c", "b", "a", "b", "c"],
                                                                    ["a", "b", "c"])]
    for a, b, want in cases:
        got = ex.lcs_words(a, b)
        assert got == want, f"lcs_words({a}, {b}): expected {want}, got {got!r}"


@pytest.mark.exercise("lcs_words")
def test_lcs_words_is_a_longest_common_subsequence(ex):
    rng = random.Random(3)
    for trial in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 9))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 9))]
        got = ex.lcs_words(a, b)
        assert isinstance(got, list), f"expected a list, got {type(got).__name__}"
        assert _is_subsequence(got, a) and _is_subsequence(got, b), (
            f"lcs_words({a}, {b}) returned {got}, which is not a subsequence of both (the words must appear in "
            "both lists, in this order). Hint: on a match take a[i-1] and go to (i-1, j-1).")
        assert len(got) == lcs_length(a, b), (
            f"lcs_words({a}, {b}) returned {got} ({len(got)} words), but the longest common subsequence has "
            f"{lcs_length(a, b)}. Hint: when the words differ, move to the neighbour with the LARGER table value.")


# --------------------------------------------------------------------------- #
# response_logprobs
# --------------------------------------------------------------------------- #
class _Fixed(nn.Module):
    """A "model" that returns the logits it was given (for the library's sequence_logprobs)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, ids):
        return self.logits


@pytest.mark.exercise("response_logprobs")
def test_response_logprobs_by_hand(ex):
    # V = 2, logits (0, log 3): p = (1/4, 3/4). Row 0 keeps targets 1 and 0; row 1 keeps only target 1.
    logits = torch.tensor([[[0.0, math.log(3)]] * 3] * 2)                # [2, 3, 2]
    targets = torch.tensor([[1, 0, -100], [-100, -100, 1]])
    got = ex.response_logprobs(logits, targets)
    want = [math.log(3 / 4) + math.log(1 / 4), math.log(3 / 4)]
    assert isinstance(got, torch.Tensor) and got.shape == (2,), (
        f"expected a [2] tensor (one log-probability per row), got {getattr(got, 'shape', type(got).__name__)}. "
        "Hint: sum over the tokens (dim=-1), not over the whole batch.")
    assert torch.allclose(got, torch.tensor(want), atol=1e-5), (
        f"expected {want} (log 3/4 + log 1/4, and log 3/4), got {got.tolist()}. Hint: log_softmax over the "
        "vocabulary, pick each target's value, add up the kept positions only.")


@pytest.mark.exercise("response_logprobs")
def test_response_logprobs_uniform_and_empty_rows(ex):
    V = 11
    logits = torch.zeros(3, 5, V)
    targets = torch.tensor([[1, 2, 3, -100, -100], [-100, -100, -100, -100, -100], [4, 4, 4, 4, 4]])
    got = ex.response_logprobs(logits, targets)
    want = torch.tensor([3, 0, 5]) * math.log(1 / V)
    assert torch.allclose(got, want, atol=1e-5), (
        f"equal logits over {V} tokens: each kept target has log-probability log(1/{V}); expected {want.tolist()} "
        f"(3, 0 and 5 kept targets), got {got.tolist()}. Hint: a row with every target ignored counts 0.")


@pytest.mark.exercise("response_logprobs")
def test_response_logprobs_equals_the_librarys_and_is_differentiable(ex):
    logits = torch.randn(4, 7, 13, requires_grad=True)
    targets = torch.randint(0, 13, (4, 7))
    targets[0, :3] = -100                                              # a prompt
    targets[1, 5:] = -100                                              # pads
    targets[2, :] = -100                                               # nothing left
    got = ex.response_logprobs(logits, targets)
    want = sequence_logprobs(_Fixed(logits), torch.zeros_like(targets), targets)
    assert torch.allclose(got, want, atol=1e-5), (f"expected {want.tolist()}, got {got.tolist()} "
                                                  "(random logits, some targets -100)")
    assert got.requires_grad, ("the result does not depend on the logits any more (no gradient): DPO trains through "
                               "it. Hint: no .item(), .tolist() or torch.no_grad() inside.")
    got.sum().backward()
    assert logits.grad is not None and logits.grad[0, 3:].abs().sum() > 0 and logits.grad[2].abs().sum() == 0, (
        "the gradient should reach the kept positions' logits and not the ignored ones'")


# --------------------------------------------------------------------------- #
# dpo_loss_smoothed
# --------------------------------------------------------------------------- #
def _scalar(got, what):
    assert isinstance(got, torch.Tensor) and got.dim() == 0, (
        f"{what}: expected a scalar tensor (the mean over the batch), got "
        f"{getattr(got, 'shape', type(got).__name__)}. Hint: .mean() at the end.")
    return got.item()


@pytest.mark.exercise("dpo_loss_smoothed")
def test_smoothed_dpo_by_hand(ex):
    # beta = 1, chosen log-ratio log 3, rejected 0: h = log 3 and sigmoid(h) = 3/4.
    pc, pr = torch.tensor([math.log(3) - 5.0]), torch.tensor([-7.0])
    rc, rr = torch.tensor([-5.0]), torch.tensor([-7.0])
    for e, want in ((0.0, -math.log(3 / 4)), (0.25, -0.75 * math.log(3 / 4) - 0.25 * math.log(1 / 4))):
        got = _scalar(ex.dpo_loss_smoothed(pc, pr, rc, rr, beta=1.0, label_smoothing=e), f"label_smoothing={e}")
        assert abs(got - want) < 1e-5, (
            f"beta=1, chosen log-ratio log 3, rejected log-ratio 0, label_smoothing={e}: expected {want:.5f}, got "
            f"{got:.5f}. Hint: h = beta * ((pc - rc) - (pr - rr)); -(1 - e) * logsigmoid(h) - e * logsigmoid(-h).")


@pytest.mark.exercise("dpo_loss_smoothed")
def test_smoothed_dpo_without_smoothing_is_dpo(ex):
    for beta in (0.1, 0.5, 2.0):
        logps = [torch.randn(6) * 5 - 20 for _ in range(4)]
        want = dpo_loss(*logps, beta=beta)[0].item()
        got = _scalar(ex.dpo_loss_smoothed(*logps, beta=beta), f"beta={beta}")
        assert abs(got - want) < 1e-5, (
            f"with label_smoothing=0 (the default) this is the DPO loss: expected {want:.5f} (beta {beta}), got "
            f"{got:.5f}. Hint: the mean over the batch of -logsigmoid(beta * (chosen log-ratio - rejected log-ratio)).")


@pytest.mark.exercise("dpo_loss_smoothed")
def test_smoothed_dpo_is_log_2_when_policy_is_reference(ex):
    chosen, rejected = torch.randn(5) - 10, torch.randn(5) - 10
    for e in (0.0, 0.1, 0.5):
        got = _scalar(ex.dpo_loss_smoothed(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.3,
                                           label_smoothing=e), f"label_smoothing={e}")
        assert abs(got - math.log(2)) < 1e-5, (
            f"policy = reference gives h = 0 and a loss of log 2 = {math.log(2):.5f} for any label_smoothing; with "
            f"label_smoothing={e} got {got:.5f}")


@pytest.mark.exercise("dpo_loss_smoothed")
def test_smoothed_dpo_is_finite_for_large_margins_and_smallest_where_expected(ex):
    big = torch.tensor([0.0]), torch.tensor([-5000.0]), torch.tensor([0.0]), torch.tensor([0.0])
    got = _scalar(ex.dpo_loss_smoothed(*big, beta=1.0, label_smoothing=0.1), "a margin of 5000")
    assert math.isfinite(got) and abs(got - 500.0) < 1e-3, (
        f"a margin of 5000 with label_smoothing=0.1: expected about 0.1 * 5000 = 500, got {got}. Hint: use "
        "torch.nn.functional.logsigmoid; log(sigmoid(x)) gives -inf once sigmoid(x) rounds to 0.")
    # With e > 0 the loss no longer pushes the margin to infinity: it is smallest where sigmoid(h) = 1 - e.
    e = 0.2
    h = torch.tensor([math.log((1 - e) / e)], requires_grad=True)
    loss = ex.dpo_loss_smoothed(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, label_smoothing=e)
    loss.backward()
    assert h.grad is not None and abs(h.grad.item()) < 1e-5, (
        f"with label_smoothing={e} the loss should be flat (gradient 0) at h = log((1 - e) / e); the gradient there "
        f"is {None if h.grad is None else h.grad.item()}. Hint: the rejected term is -e * logsigmoid(-h).")
