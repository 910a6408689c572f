"""Step 7, preference tuning: the DPO loss by hand, response log-probabilities, pairs, collate, the loop."""

from __future__ import annotations

import copy
import math
from functools import partial

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import course_lib.preference as preference
from course_lib.checkpoint import NonFiniteError
from course_lib.config import GPTConfig
from course_lib.instruction import IGNORE_INDEX, PAD_TOKEN_ID, format_prompt
from course_lib.model import GPTModel
from course_lib.preference import (DPOHistory, PreferenceDataset, collate_preference, dpo_loss, evaluate_dpo,
                                   make_preference_pairs, plot_dpo, sequence_logprobs, train_dpo)
from course_lib.tokenizers import tiktoken_gpt2

matplotlib.use("Agg")

CFG = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0,
                qkv_bias=False)
THINGS = ["apple", "river", "music", "bread", "winter", "garden", "coffee", "paper", "silver", "forest",
          "candle", "window", "thunder", "pillow", "ladder", "marble", "violin", "harbor", "lemon", "meadow"]


def _pair(thing):
    return {"instruction": f"Is {thing} nice?", "input": "", "chosen": f"yes, {thing} is nice.",
            "rejected": f"no, {thing} is awful."}


TRAIN_PAIRS = [_pair(t) for t in THINGS[:12]]
VAL_PAIRS = [_pair(t) for t in THINGS[12:18]]


@pytest.fixture(scope="module")
def tok():
    return tiktoken_gpt2()


def _model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG)


def _loaders(tok, seed=1):
    collate_fn = partial(collate_preference, allowed_max_length=CFG.context_length)
    train = DataLoader(PreferenceDataset(TRAIN_PAIRS, tok, style="phi3"), batch_size=4, shuffle=True,
                       collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(PreferenceDataset(VAL_PAIRS, tok, style="phi3"), batch_size=6, collate_fn=collate_fn)
    return train, val


# --------------------------------------------------------------------------- #
# The loss
# --------------------------------------------------------------------------- #
def test_dpo_loss_equals_a_hand_computation():
    pc, pr, rc, rr = [-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -2.5]
    beta = 0.5
    expected = []
    for i in range(2):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))    # 0.5*(0.5+1) = 0.75 ; 0.5*(-1.0-0.5) = -0.75
        expected.append(math.log(1 + math.exp(-z)))       # -logsigmoid(z)
    loss, chosen, rejected = dpo_loss(torch.tensor(pc), torch.tensor(pr), torch.tensor(rc), torch.tensor(rr), beta)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.25, -0.5])
    assert rejected.tolist() == pytest.approx([-0.5, 0.25])
    assert not chosen.requires_grad and not rejected.requires_grad


def test_dpo_loss_is_log_2_when_policy_equals_reference():
    logps = torch.tensor([-12.0, -3.5, -40.0])
    other = torch.tensor([-7.0, -9.0, -1.0])
    loss, chosen, rejected = dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-5.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-4.0, -6.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-5.0, -3.0]), torch.tensor([-4.0, -5.0]))
    loss.backward()
    assert (chosen.grad < 0).all()      # gradient descent raises the chosen log-probabilities
    assert (rejected.grad > 0).all()    # ... and lowers the rejected ones


@pytest.mark.parametrize("shapes", [((2,), (3,), (2,), (2,)), ((2, 1), (2, 1), (2, 1), (2, 1))])
def test_dpo_loss_refuses_mismatched_or_non_1d_shapes(shapes):
    with pytest.raises(ValueError, match="logps"):
        dpo_loss(*(torch.zeros(s) for s in shapes))


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_dpo_loss_refuses_a_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*(torch.zeros(2) for _ in range(4)), beta=beta)


def test_dpo_loss_refuses_a_non_tensor():
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        dpo_loss([0.0], torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_sequence_logprobs_is_the_sum_over_response_positions():
    model = _model().eval()
    inputs = torch.tensor([[5, 17, 900, 42, 7, 8], [11, 12, 13, 14, 15, 16]])
    targets = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 42, 7, 8, PAD_TOKEN_ID],
                            [IGNORE_INDEX, 13, 14, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    got = sequence_logprobs(model, inputs, targets)
    assert got.shape == (2,)
    with torch.no_grad():
        logp = F.log_softmax(model(inputs), dim=-1)
    expected = [sum(logp[b, t, targets[b, t]].item() for t in range(6) if targets[b, t] != IGNORE_INDEX)
                for b in range(2)]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert sequence_logprobs(model, inputs, torch.full_like(targets, IGNORE_INDEX)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="one shape"):
        sequence_logprobs(model, inputs, targets[:, :4])


# --------------------------------------------------------------------------- #
# Pairs, dataset, collate
# --------------------------------------------------------------------------- #
def test_make_preference_pairs_drops_equal_answers(monkeypatch, tok):
    entries = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
               {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
               {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}]
    seen = {}

    def fake(model, tokenizer, entries, *, style, max_new_tokens, progress):
        seen.update(style=style, max_new_tokens=max_new_tokens, n=len(entries))
        return ["  Hi.\n", "6", "Hello there"]

    monkeypatch.setattr(preference, "generate_responses", fake)
    pairs = make_preference_pairs(entries, object(), tok, style="phi3", max_new_tokens=7, progress=False)
    assert seen == {"style": "phi3", "max_new_tokens": 7, "n": 3}
    assert pairs == [{"instruction": "Add 2 and 3.", "input": "", "chosen": "5", "rejected": "6"},
                     {"instruction": "Translate.", "input": "Bonjour", "chosen": "Hello", "rejected": "Hello there"}]


def test_make_preference_pairs_uses_the_models_greedy_answer(tok):
    from course_lib.instruction import generate_responses

    entries = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
               {"instruction": "Name a fruit.", "input": "", "output": "A pear."}]
    model = _model()
    pairs = make_preference_pairs(entries, model, tok, style="phi3", max_new_tokens=4, progress=False)
    expected = generate_responses(model, tok, entries, style="phi3", max_new_tokens=4, progress=False)
    assert [p["rejected"] for p in pairs] == expected
    assert [p["chosen"] for p in pairs] == ["Red.", "A pear."]


def test_make_preference_pairs_refuses_bad_entries(tok):
    with pytest.raises(ValueError, match="empty"):
        make_preference_pairs([], _model(), tok)
    with pytest.raises(ValueError, match="output"):
        make_preference_pairs([{"instruction": "x"}], _model(), tok)


def test_preference_dataset_and_collate_mask_the_prompt(tok):
    ds = PreferenceDataset(TRAIN_PAIRS[:2], tok, style="phi3")
    item = ds[0]
    assert item["prompt"] == tok.encode_ordinary(format_prompt(TRAIN_PAIRS[0], "phi3"))
    assert item["chosen"] == tok.encode_ordinary("yes, apple is nice.")
    assert item["rejected"] == tok.encode_ordinary("no, apple is awful.")

    batch = collate_preference([ds[0], ds[1]])
    assert set(batch) == {"chosen_inputs", "chosen_targets", "rejected_inputs", "rejected_targets"}
    for side in ("chosen", "rejected"):
        inputs, targets = batch[f"{side}_inputs"], batch[f"{side}_targets"]
        assert inputs.shape == targets.shape
        for b in range(2):
            p, answer = len(ds[b]["prompt"]), ds[b][side]
            row = targets[b].tolist()
            assert row[:p - 1] == [IGNORE_INDEX] * (p - 1)                # the prompt counts nothing
            assert row[p - 1:p - 1 + len(answer) + 1] == answer + [PAD_TOKEN_ID]   # the answer and its end
            assert all(t == IGNORE_INDEX for t in row[p + len(answer):])    # later pads ignored
            assert inputs[b, :p].tolist() == ds[b]["prompt"]

    cut = collate_preference([ds[0]], allowed_max_length=5)
    assert cut["chosen_inputs"].shape == (1, 5) and cut["rejected_targets"].shape == (1, 5)


def test_preference_dataset_refuses_bad_pairs(tok):
    with pytest.raises(ValueError, match="empty"):
        PreferenceDataset([], tok)
    with pytest.raises(ValueError, match="rejected"):
        PreferenceDataset([{"instruction": "x", "chosen": "a"}], tok)
    with pytest.raises(ValueError, match="instruction"):
        PreferenceDataset([{"chosen": "a", "rejected": "b"}], tok)
    with pytest.raises(ValueError, match="style"):
        PreferenceDataset(TRAIN_PAIRS, tok, style="chatml")
    with pytest.raises(ValueError, match="non-empty"):
        collate_preference([])


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def _run(tok, eval_freq=3):
    """9 steps (3 epochs of 3 batches), with dropout on so that a disturbed random state would show."""
    torch.manual_seed(0)
    policy = GPTModel(CFG.replace(drop_rate=0.1))
    reference = copy.deepcopy(policy)
    train, val = _loaders(tok)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    history = train_dpo(policy, reference, train, val, optimizer, beta=0.5, num_epochs=3, eval_freq=eval_freq,
                        eval_iter=1, progress=False, verbose=False)
    return policy, reference, history


@pytest.fixture(scope="module")
def trained(tok):
    return _run(tok)


def test_train_dpo_grows_the_held_out_margin_and_keeps_the_reference(trained, tok):
    policy, reference, history = trained
    torch.manual_seed(0)
    before = GPTModel(CFG.replace(drop_rate=0.1)).state_dict()   # the policy's start, copied as the reference
    assert isinstance(history, DPOHistory)
    assert history.step == 9 and history.steps == [0, 3, 6, 9]
    assert history.val_losses[0] == pytest.approx(math.log(2), abs=1e-6)   # step 0: policy = reference
    assert history.val_margins[0] == pytest.approx(0.0, abs=1e-6) and history.val_accuracies[0] == 0.0
    assert history.val_margins[-1] > history.val_margins[0] + 0.5
    assert history.val_accuracies[-1] == 1.0
    assert history.val_losses[-1] < history.val_losses[0]
    assert history.seconds > 0
    for name, value in reference.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(not p.requires_grad for p in reference.parameters())
    assert not reference.training and not policy.training
    val = _loaders(tok)[1]
    assert evaluate_dpo(policy, reference, val, beta=0.5)["margin"] == pytest.approx(history.val_margins[-1])


def test_train_dpo_is_deterministic_and_evaluation_leaves_the_random_state(trained, tok):
    policy, _, history = trained
    again, _, every_step = _run(tok, eval_freq=1)      # same seed, but evaluating after every step
    assert every_step.steps == list(range(10))
    at = [every_step.steps.index(s) for s in history.steps]
    for name in ("train_losses", "val_losses", "train_margins", "val_margins", "val_accuracies"):
        assert [getattr(every_step, name)[i] for i in at] == getattr(history, name), name
    assert all(torch.equal(value, again.state_dict()[k]) for k, value in policy.state_dict().items())


def test_train_dpo_refuses_bad_input(tok):
    policy = _model()
    train, val = _loaders(tok)
    opt = torch.optim.AdamW(policy.parameters())
    with pytest.raises(ValueError, match="same model"):
        train_dpo(policy, policy, train, val, opt, progress=False, verbose=False)
    shallow = copy.copy(policy)
    with pytest.raises(ValueError, match="share weights"):
        train_dpo(policy, shallow, train, val, opt, progress=False, verbose=False)
    with pytest.raises(ValueError, match="beta"):
        train_dpo(policy, copy.deepcopy(policy), train, val, opt, beta=0, progress=False, verbose=False)
    with pytest.raises(ValueError, match="num_epochs"):
        train_dpo(policy, copy.deepcopy(policy), train, val, opt, num_epochs=0, progress=False, verbose=False)


def test_train_dpo_stops_on_a_non_finite_loss(tok):
    policy = _model()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        policy.out_head.weight[0, 0] = float("nan")
    train, val = _loaders(tok)
    with pytest.raises(NonFiniteError, match="step 1") as err:
        train_dpo(policy, reference, train, val, torch.optim.SGD(policy.parameters(), lr=0.1), progress=False,
                  verbose=False)
    assert err.value.history.step == 0 and err.value.history.steps == [0]


def test_plot_dpo(trained):
    history = trained[2]
    ax = plot_dpo(history)
    assert len(ax.lines) == 1 and ax.lines[0].get_xdata().tolist() == history.steps
    with pytest.raises(TypeError, match="DPOHistory"):
        plot_dpo({"steps": []})
