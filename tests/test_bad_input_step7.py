"""Step 7, bad input: instruction data, collate, responses, the judge's score, DPO — clear errors, never silent."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from course_lib.config import GPTConfig
from course_lib.evaluation import lcs_length, parse_score, response_loss
from course_lib.instruction import (InstructionDataset, collate, format_example, format_prompt, generate_responses,
                                    load_instruction_data)
from course_lib.model import GPTModel
from course_lib.preference import (dpo_batch_loss, dpo_loss, evaluate_dpo, make_preference_pairs, sequence_logprobs,
                                   train_dpo)

CFG = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False)
ENTRY = {"instruction": "Name a colour.", "input": "", "output": "Red."}
NULL_OUTPUT = {"instruction": "Name a colour.", "input": "", "output": None}


class _Tok:
    """A tokenizer for a 61-token model: one id per character."""

    def encode(self, text):
        return [ord(c) % 61 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG)


def _batch():
    return {"chosen_inputs": torch.tensor([[1, 2, 3]]), "chosen_targets": torch.tensor([[2, 3, -100]]),
            "rejected_inputs": torch.tensor([[1, 2, 4]]), "rejected_targets": torch.tensor([[2, 4, -100]])}


# --------------------------------------------------------------------------- #
# 1. collate
# --------------------------------------------------------------------------- #
def test_collate_refuses_float_token_ids():
    with pytest.raises(TypeError, match=r"batch\[0\]\[0\] must be an integer token id.*1\.7"):
        collate([[1.7, 2.2]])
    with pytest.raises(TypeError, match=r"batch\[0\]\[0\] must be an integer token id.*float"):
        collate([torch.tensor([1.0, 2.5])])


@pytest.mark.parametrize("pad, error, match", [
    (1.5, TypeError, "pad_token_id must be an integer"),
    (-1, ValueError, "pad_token_id must be at least 0"),
])
def test_collate_refuses_a_bad_pad_token_id(pad, error, match):
    with pytest.raises(error, match=match):
        collate([[1, 2]], pad_token_id=pad)


def test_collate_refuses_a_bool_prompt_length():
    with pytest.raises(TypeError, match=r"batch\[0\]'s prompt_length must be an integer.*True"):
        collate([([1, 2, 3], True)], mask_prompt=True)


def test_collate_refuses_a_prompt_longer_than_its_row():
    with pytest.raises(ValueError, match=r"batch\[1\]'s prompt_length 5 is longer than its row \(3 tokens\)"):
        collate([([1, 2, 3], 1), ([1, 2, 3], 5)], mask_prompt=True)
    # a prompt as long as the row (an empty response) still learns its end-of-text
    _, targets = collate([([1, 2, 3], 3)], mask_prompt=True, pad_token_id=0)
    assert targets.tolist() == [[-100, -100, 0]]


# --------------------------------------------------------------------------- #
# 2. entries
# --------------------------------------------------------------------------- #
def test_format_prompt_refuses_a_none_instruction():
    with pytest.raises(TypeError, match=r"entry\['instruction'\] must be a string, got None"):
        format_prompt({"instruction": None})


def test_a_none_output_is_refused_where_it_is_needed():
    with pytest.raises(TypeError, match=r"entry\['output'\] must be a string, got None"):
        format_example(NULL_OUTPUT)
    with pytest.raises(TypeError, match=r"entries\[1\]\['output'\] must be a string"):
        InstructionDataset([ENTRY, NULL_OUTPUT], _Tok())
    with pytest.raises(TypeError, match=r"entries\[0\]\['output'\] must be a string"):
        response_loss(_model(), [NULL_OUTPUT], _Tok())
    with pytest.raises(TypeError, match=r"entries\[0\]\['output'\] must be a string"):
        make_preference_pairs([NULL_OUTPUT], _model(), _Tok(), max_new_tokens=2, progress=False)


def test_load_instruction_data_refuses_a_null_output(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ENTRY, NULL_OUTPUT]), encoding="utf-8")
    with pytest.raises(TypeError, match=r"entry 1\['output'\] must be a string, got None"):
        load_instruction_data(path)


def test_load_instruction_data_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "Café", "output": "x"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8 text"):
        load_instruction_data(path)


# --------------------------------------------------------------------------- #
# 3. generate_responses
# --------------------------------------------------------------------------- #
def test_generate_responses_refuses_a_single_dict():
    with pytest.raises(TypeError,
                       match=r"entries must be a list of instruction dicts, got the dict.*generate_response"):
        generate_responses(_model(), _Tok(), ENTRY, max_new_tokens=2, eos_id=0, progress=False)


def test_generate_responses_checks_stats_before_generating():
    model, calls = _model(), []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(TypeError, match="stats must be a dict"):
        generate_responses(model, _Tok(), [ENTRY], max_new_tokens=2, eos_id=0, progress=False, stats=[])
    assert calls == []


# --------------------------------------------------------------------------- #
# 4, 5. evaluation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("reply, expected", [
    ("As a GPT-4 grader: 85", 85),
    ("a score between 0 and 100: 60", 60),
    ("Step 1: compare. Score: 85", 85),
])
def test_parse_score_finds_the_score(reply, expected):
    assert parse_score(reply) == expected


def test_lcs_length_names_a_none_argument():
    with pytest.raises(TypeError, match="a must be a sequence.*None"):
        lcs_length(None, [1])
    with pytest.raises(TypeError, match="b must be a sequence.*int"):
        lcs_length([1], 5)


# --------------------------------------------------------------------------- #
# 6. train_dpo
# --------------------------------------------------------------------------- #
def _train(policy, reference, optimizer, loader=None):
    loader = [_batch()] if loader is None else loader
    return train_dpo(policy, reference, loader, [_batch()], optimizer, progress=False, verbose=False)


def test_train_dpo_refuses_an_optimizer_of_the_reference():
    policy = _model()
    reference = copy.deepcopy(policy)
    with pytest.raises(ValueError, match="optimizer holds none of policy's parameters"):
        _train(policy, reference, torch.optim.AdamW(reference.parameters()))


def test_train_dpo_refuses_no_optimizer():
    policy = _model()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer.*None"):
        _train(policy, copy.deepcopy(policy), None)


def test_train_dpo_refuses_a_frozen_policy():
    policy = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="policy has no parameter that requires grad"):
        _train(policy, copy.deepcopy(policy), torch.optim.AdamW(policy.parameters()))


def test_train_dpo_refuses_a_generator_as_loader():
    policy = _model()
    with pytest.raises(TypeError, match="train_loader must be a DataLoader or a list"):
        _train(policy, copy.deepcopy(policy), torch.optim.AdamW(policy.parameters()), (b for b in [_batch()]))


# --------------------------------------------------------------------------- #
# 7. the DPO pieces
# --------------------------------------------------------------------------- #
def test_dpo_loss_refuses_empty_tensors():
    empty = torch.empty(0)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(empty, empty, empty, empty)


def test_sequence_logprobs_refuses_targets_outside_the_vocabulary():
    with pytest.raises(ValueError, match="largest target id is 60000.*vocabulary size is 61"):
        sequence_logprobs(_model(), torch.tensor([[1, 2]]), torch.tensor([[60000, -100]]))
    # ignore_index positions are not token ids: -100 is fine
    assert sequence_logprobs(_model(), torch.tensor([[1, 2]]), torch.tensor([[3, -100]])).shape == (1,)


def test_sequence_logprobs_refuses_a_none_ignore_index():
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        sequence_logprobs(_model(), torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), ignore_index=None)


def test_dpo_batch_loss_lists_the_keys_a_batch_needs():
    policy = _model()
    reference = copy.deepcopy(policy)
    with pytest.raises(TypeError, match="batch must be a dict with 'chosen_inputs'.*collate_preference"):
        dpo_batch_loss(None, policy, reference)
    partial = {"chosen_inputs": _batch()["chosen_inputs"]}
    with pytest.raises(ValueError, match="batch has no 'chosen_targets'.*'rejected_targets'"):
        dpo_batch_loss(partial, policy, reference)


def test_evaluate_dpo_refuses_a_none_reference():
    with pytest.raises(TypeError, match="reference must be a torch.nn.Module"):
        evaluate_dpo(_model(), None, [_batch()])
