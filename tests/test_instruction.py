"""Step 7: templates (byte for byte), the split, the dataset, collate's targets, generated responses."""

from __future__ import annotations

import json

import pytest
import torch

from course_lib.config import get_config
from course_lib.instruction import (
    ALPACA_PREAMBLE,
    IGNORE_INDEX,
    PAD_TOKEN_ID,
    InstructionDataset,
    collate,
    format_example,
    format_prompt,
    generate_response,
    generate_responses,
    load_instruction_data,
    split_instruction_data,
)
from course_lib.model import GPTModel
from course_lib.tokenizers import tiktoken_gpt2

ENTRY = {"instruction": "Rewrite the sentence in passive voice.", "input": "The chef cooked the meal.",
         "output": "The meal was cooked by the chef."}
NO_INPUT = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}


@pytest.fixture(scope="module")
def tok():
    return tiktoken_gpt2()


# --------------------------------------------------------------------------- #
# Templates
# --------------------------------------------------------------------------- #
def test_alpaca_bytes():
    assert ALPACA_PREAMBLE == ("Below is an instruction that describes a task. Write a response that appropriately "
                               "completes the request.")
    assert format_prompt(ENTRY) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence in passive voice."
        "\n\n### Input:\nThe chef cooked the meal."
        "\n\n### Response:\n")
    assert format_prompt(NO_INPUT) == (ALPACA_PREAMBLE + "\n\n### Instruction:\nName a primary colour."
                                       "\n\n### Response:\n")
    assert format_prompt({"instruction": "Name a primary colour."}) == format_prompt(NO_INPUT)
    assert format_example(ENTRY) == format_prompt(ENTRY) + "The meal was cooked by the chef."


def test_phi3_bytes():
    assert format_prompt(ENTRY, "phi3") == ("<|user|>\nRewrite the sentence in passive voice.\nThe chef cooked the meal."
                                            "\n<|assistant|>\n")
    assert format_prompt(NO_INPUT, style="phi3") == "<|user|>\nName a primary colour.\n<|assistant|>\n"
    assert format_example(NO_INPUT, "phi3").endswith("<|assistant|>\nRed.")


@pytest.mark.parametrize("entry, error, match", [
    ({"input": "x", "output": "y"}, ValueError, "no 'instruction'"),
    ({"instruction": "  "}, ValueError, "empty"),
    ("Name a colour", TypeError, "dict"),
    ({"instruction": 3}, TypeError, "string"),
])
def test_bad_entries(entry, error, match):
    with pytest.raises(error, match=match):
        format_prompt(entry)


def test_unknown_style_lists_both():
    with pytest.raises(ValueError, match="alpaca.*phi3"):
        format_prompt(ENTRY, "chatml")


def test_example_needs_an_output():
    with pytest.raises(ValueError, match="'output'"):
        format_example({"instruction": "x"})


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def test_the_data_and_its_split():
    data = load_instruction_data()
    assert len(data) == 1100 and all(set(e) == {"instruction", "input", "output"} for e in data)
    train, test, val = split_instruction_data(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    ids = [id(e) for e in train + test + val]
    assert len(set(ids)) == 1100  # every entry once
    again = split_instruction_data(data)
    assert again == (train, test, val)
    assert split_instruction_data(data, seed=1)[0] != train


def test_a_bad_data_file_names_the_entry(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ENTRY, {"input": "x", "output": "y"}]), encoding="utf-8")
    with pytest.raises(ValueError, match="entry 1"):
        load_instruction_data(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON"):
        load_instruction_data(path)


@pytest.mark.parametrize("entries, kwargs, error", [
    ([], {}, ValueError), ("abc", {}, TypeError), ([ENTRY] * 10, dict(fractions=(0.9, 0.1)), ValueError),
    ([ENTRY] * 3, {}, ValueError),  # the validation split would be empty
])
def test_split_bad_input(entries, kwargs, error):
    with pytest.raises(error):
        split_instruction_data(entries, **kwargs)


def test_dataset_remembers_where_the_response_starts(tok):
    ds = InstructionDataset([ENTRY, NO_INPUT], tok)
    for (ids, n_prompt), entry in zip(ds, [ENTRY, NO_INPUT]):
        assert tok.decode(ids) == format_example(entry)
        assert tok.decode(ids[:n_prompt]) == format_prompt(entry)
        assert tok.decode(ids[n_prompt:]) == entry["output"]


def test_dataset_bad_input(tok):
    with pytest.raises(ValueError, match="empty"):
        InstructionDataset([], tok)
    with pytest.raises(ValueError, match=r"entries\[1\].*'instruction'"):
        InstructionDataset([ENTRY, {"output": "x"}], tok)


# --------------------------------------------------------------------------- #
# collate
# --------------------------------------------------------------------------- #
def test_collate_by_hand():
    x, y = collate([[1, 2, 3], [4, 5], [6]], pad_token_id=9)
    assert x.tolist() == [[1, 2, 3], [4, 5, 9], [6, 9, 9]]
    assert y.tolist() == [[2, 3, 9], [5, 9, -100], [9, -100, -100]]  # the first pad of each row stays


def test_collate_masks_the_prompt():
    # prompt [1, 2, 3] then response [4, 5]; prompt [6] then response [7]
    x, y = collate([([1, 2, 3, 4, 5], 3), ([6, 7], 1)], pad_token_id=0, ignore_index=-1, mask_prompt=True)
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert y.tolist() == [[-1, -1, 4, 5, 0], [7, 0, -1, -1, -1]]
    # without masking the same pairs learn every next token
    _, y = collate([([1, 2, 3, 4, 5], 3), ([6, 7], 1)], pad_token_id=0, ignore_index=-1)
    assert y.tolist() == [[2, 3, 4, 5, 0], [7, 0, -1, -1, -1]]


def test_collate_truncation_keeps_inputs_and_targets_aligned():
    full_x, full_y = collate([list(range(10, 20)), [1, 2]])
    x, y = collate([list(range(10, 20)), [1, 2]], allowed_max_length=4)
    assert torch.equal(x, full_x[:, :4]) and torch.equal(y, full_y[:, :4])
    assert y[0].tolist() == [11, 12, 13, 14] and x[0].tolist() == [10, 11, 12, 13]


def test_collate_defaults_are_gpt2s():
    x, y = collate([torch.tensor([5, 6]), [7]])
    assert x.tolist() == [[5, 6], [7, PAD_TOKEN_ID]]
    assert y.tolist() == [[6, PAD_TOKEN_ID], [PAD_TOKEN_ID, IGNORE_INDEX]]
    assert x.dtype == y.dtype == torch.long


def test_collate_loss_ignores_what_it_should():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    _, y = collate([[1, 2, 3], [4]], pad_token_id=10)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    keep = y.flatten() != IGNORE_INDEX
    by_hand = -torch.log_softmax(logits.flatten(0, 1)[keep], -1)[torch.arange(int(keep.sum())), y.flatten()[keep]]
    torch.testing.assert_close(loss, by_hand.mean())


@pytest.mark.parametrize("batch, kwargs, error, match", [
    ([], {}, ValueError, "non-empty"),
    ([[1], []], {}, ValueError, r"batch\[1\]"),
    ([[1, 2]], dict(allowed_max_length=0), ValueError, "allowed_max_length"),
    ([[1, 2]], dict(allowed_max_length=-3), ValueError, "allowed_max_length"),
    ([[1, 2]], dict(mask_prompt=True), ValueError, "prompt_length"),
])
def test_collate_bad_input(batch, kwargs, error, match):
    with pytest.raises(error, match=match):
        collate(batch, **kwargs)


# --------------------------------------------------------------------------- #
# Responses
# --------------------------------------------------------------------------- #
class _Scripted(torch.nn.Module):
    """A 'model' that always predicts the next token of a fixed script after the prompt."""

    def __init__(self, prompt_len, script, vocab=50257):
        super().__init__()
        self.cfg = get_config("gpt-tiny").replace(context_length=256)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.prompt_len, self.script, self.vocab = prompt_len, script, vocab

    def forward(self, idx, kv_cache=None):
        start = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        b, t = idx.shape
        logits = torch.zeros(b, t, self.vocab)
        for j in range(t):
            k = start + j + 1 - self.prompt_len  # how many script tokens follow this position
            logits[:, j, self.script[min(max(k, 0), len(self.script) - 1)]] = 10.0
        return logits + self.w


def test_generate_response_returns_only_the_answer_and_stops(tok):
    prompt = tok.encode(format_prompt(ENTRY))
    answer = tok.encode(" The meal was cooked by the chef.")
    model = _Scripted(len(prompt), answer + [PAD_TOKEN_ID] + tok.encode(" ### Instruction: more"))
    stats = {}
    got = generate_responses(model, tok, [ENTRY], max_new_tokens=40, progress=False, stats=stats)
    assert got == ["The meal was cooked by the chef."] and stats == {"stopped": 1}
    assert generate_response(model, tok, ENTRY, max_new_tokens=40) == "The meal was cooked by the chef."
    # cut short: no end-of-text within the budget
    stats = {}
    assert generate_responses(model, tok, [ENTRY], max_new_tokens=3, progress=False, stats=stats) == \
        [tok.decode(answer[:3]).strip()]
    assert stats == {"stopped": 0}


def test_generate_response_on_a_real_model_is_greedy_and_puts_the_mode_back(tok):
    torch.manual_seed(0)
    model = GPTModel(get_config("gpt-tiny")).train()
    a = generate_response(model, tok, NO_INPUT, max_new_tokens=8)
    assert model.training
    from course_lib.inference import generate
    prompt = torch.tensor([tok.encode(format_prompt(NO_INPUT))])
    model.eval()
    new = generate(model, prompt, 8, eos_id=PAD_TOKEN_ID)[0, prompt.shape[1]:].tolist()
    new = new[:new.index(PAD_TOKEN_ID)] if PAD_TOKEN_ID in new else new
    assert a == tok.decode(new).strip()


def test_generate_response_needs_room_for_the_prompt(tok):
    model = GPTModel(get_config("gpt-tiny"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_response(model, tok, ENTRY, max_new_tokens=model.cfg.context_length)


def test_collate_reads_a_row_of_two_token_ids_as_a_row():
    """A row given as a tuple of two ids, (15496, 11), is two tokens, not (ids, prompt_length)."""
    inputs, targets = collate([(15496, 11), [1, 2, 3]])
    assert inputs.tolist() == [[15496, 11, 50256], [1, 2, 3]]
    assert targets.tolist() == [[11, 50256, -100], [2, 3, 50256]]
    inputs, targets = collate([([5, 6, 7], 2)], mask_prompt=True)   # a real pair still works
    assert targets.tolist() == [[-100, 7, 50256]]
