"""Checks for step 6's exercises (``course check 6``). ``ex`` is the module being checked."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- #
# balance_classes
# --------------------------------------------------------------------------- #
def _frame(counts: dict[str, int]) -> pd.DataFrame:
    """A labelled frame whose rows are all different (``id`` and ``text`` tell them apart)."""
    labels = [name for name, n in counts.items() for _ in range(n)]
    return pd.DataFrame({"id": range(len(labels)), "label": labels,
                         "text": [f"message {i} ({name})" for i, name in enumerate(labels)]})


def _balanced(ex, df, seed=123):
    got = ex.balance_classes(df, seed)
    assert isinstance(got, pd.DataFrame), (
        f"expected a pandas DataFrame, got {type(got).__name__}. Hint: DataFrame.sample per label, then pd.concat.")
    assert {"id", "label", "text"} <= set(got.columns), (
        f"the rows must keep all their columns ({list(df.columns)}), got {list(got.columns)}")
    return got


@pytest.mark.exercise("balance_classes")
def test_balance_gives_every_class_the_size_of_the_rarest(ex):
    df = _frame({"ham": 40, "spam": 7})
    got = _balanced(ex, df)
    counts = got["label"].value_counts().to_dict()
    assert counts == {"ham": 7, "spam": 7}, (
        f"40 ham and 7 spam rows should give 7 of each, got {counts}. "
        "Hint: n = df['label'].value_counts().min(), then n rows of every label.")
    assert sorted(got.loc[got["label"] == "spam", "id"]) == list(range(40, 47)), (
        "the rarest class must keep all of its rows (drawing n of its n rows without replacement takes them all)")


@pytest.mark.exercise("balance_classes")
def test_balance_draws_real_rows_without_repeats(ex):
    df = _frame({"a": 12, "b": 30, "c": 5})
    got = _balanced(ex, df, seed=7)
    assert got["label"].value_counts().to_dict() == {"a": 5, "b": 5, "c": 5}, (
        f"three classes of 12, 30 and 5 rows should give 5 of each, got {got['label'].value_counts().to_dict()}")
    assert got["id"].is_unique, ("a row was drawn twice: draw without replacement "
                                 "(DataFrame.sample's default, replace=False)")
    original = {(r.id, r.label, r.text) for r in df.itertuples()}
    stray = [(r.id, r.label, r.text) for r in got.itertuples() if (r.id, r.label, r.text) not in original]
    assert not stray, f"these rows are not rows of df (a row's values must stay together): {stray[:3]}"


@pytest.mark.exercise("balance_classes")
def test_balance_is_random_but_reproducible(ex):
    df = _frame({"ham": 200, "spam": 20})
    first, again = _balanced(ex, df, seed=1), _balanced(ex, df, seed=1)
    other = _balanced(ex, df, seed=2)
    assert sorted(first["id"]) == sorted(again["id"]), "the same seed must draw the same rows"
    ham = sorted(first.loc[first["label"] == "ham", "id"])
    assert ham != list(range(20)), ("the ham rows kept are the first 20: draw them at random "
                                    "(DataFrame.sample(n=..., random_state=seed)) rather than taking the head")
    assert sorted(other["id"]) != sorted(first["id"]), "another seed should draw other rows; pass seed as random_state"


@pytest.mark.exercise("balance_classes")
def test_balance_leaves_its_input_alone(ex):
    df = _frame({"ham": 15, "spam": 4})
    before = df.copy()
    _balanced(ex, df)
    pd.testing.assert_frame_equal(df, before, obj="df after balance_classes(df) (it must not be modified)")


# --------------------------------------------------------------------------- #
# pad_batch
# --------------------------------------------------------------------------- #
def _padded(ex, lists, pad_id, max_length=None):
    got = ex.pad_batch(lists, pad_id) if max_length is None else ex.pad_batch(lists, pad_id, max_length)
    assert isinstance(got, tuple) and len(got) == 2, (
        f"expected a pair (ids, lengths), got {type(got).__name__}. Hint: return ids, lengths")
    ids, lengths = got
    for name, t in (("ids", ids), ("lengths", lengths)):
        assert isinstance(t, torch.Tensor) and t.dtype == torch.long, (
            f"{name} must be a torch.long tensor, got {getattr(t, 'dtype', type(t).__name__)}. "
            "Hint: torch.full(..., dtype=torch.long), torch.tensor(..., dtype=torch.long)")
    return ids, lengths


@pytest.mark.exercise("pad_batch")
def test_pad_to_the_longest_row(ex):
    ids, lengths = _padded(ex, [[5, 6, 7], [8], [9, 10]], pad_id=0)
    want = [[5, 6, 7], [8, 0, 0], [9, 10, 0]]  # by hand
    assert ids.tolist() == want, (f"expected ids {want}, got {ids.tolist()}. "
                                  "Hint: right padding: the real ids first, then pad_id up to the longest row.")
    assert lengths.tolist() == [3, 1, 2], f"expected lengths [3, 1, 2] (real ids per row), got {lengths.tolist()}"


@pytest.mark.exercise("pad_batch")
def test_pad_agrees_with_torch_pad_sequence(ex):
    lists = [torch.randint(0, 50_000, (int(n),)).tolist() for n in torch.randint(1, 30, (12,))]
    pad_id = 50256
    ids, lengths = _padded(ex, lists, pad_id)
    want = nn.utils.rnn.pad_sequence([torch.tensor(t) for t in lists], batch_first=True, padding_value=pad_id)
    assert ids.shape == want.shape, f"expected shape {tuple(want.shape)} (rows, longest row), got {tuple(ids.shape)}"
    assert torch.equal(ids, want), "the ids differ from torch.nn.utils.rnn.pad_sequence(..., batch_first=True)"
    assert lengths.tolist() == [len(t) for t in lists], "lengths must be the length of each list"


@pytest.mark.exercise("pad_batch")
def test_pad_cuts_long_rows_to_max_length(ex):
    lists = [[5, 6, 7, 8, 9], [1], [2, 3]]
    kept = [list(x) for x in lists]
    ids, lengths = _padded(ex, lists, pad_id=0, max_length=3)
    assert ids.tolist() == [[5, 6, 7], [1, 0, 0], [2, 3, 0]], (
        f"with max_length=3 expected [[5, 6, 7], [1, 0, 0], [2, 3, 0]] (a long row keeps its beginning), "
        f"got {ids.tolist()}")
    assert lengths.tolist() == [3, 1, 2], (
        f"a cut row's length is the number of ids kept: expected [3, 1, 2], got {lengths.tolist()}")
    assert lists == kept, "pad_batch changed the input lists; copy what you cut"


@pytest.mark.exercise("pad_batch")
def test_pad_to_a_max_length_longer_than_every_row(ex):
    ids, lengths = _padded(ex, [[4, 4], [7]], pad_id=9, max_length=5)
    assert ids.tolist() == [[4, 4, 9, 9, 9], [7, 9, 9, 9, 9]], (
        f"with max_length=5 every row has 5 ids (padded), got {ids.tolist()}. Hint: L = max_length when it is given")
    assert lengths.tolist() == [2, 1], f"expected lengths [2, 1], got {lengths.tolist()}"


# --------------------------------------------------------------------------- #
# freeze_all_but_last_blocks
# --------------------------------------------------------------------------- #
class _TinyGPT(nn.Module):
    """The attribute names of the course's GPTModel, on a small scale (every size different)."""

    def __init__(self, n_layers=4):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(50, 6), nn.Embedding(10, 6)
        self.trf_blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6)) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(6)
        self.out_head = nn.Linear(6, 2)

    def forward(self, ids):
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))
        for block in self.trf_blocks:
            x = x + block(x)
        return self.out_head(self.final_norm(x))[:, -1]        # [B, 2]


def _want_trainable(model, n_blocks):  # by name: the last n blocks, the final norm, the head
    last = len(model.trf_blocks)
    prefixes = tuple(f"trf_blocks.{i}." for i in range(last - n_blocks, last)) + ("final_norm.", "out_head.")
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.exercise("freeze_all_but_last_blocks")
def test_freeze_keeps_the_last_block_norm_and_head(ex):
    model = _TinyGPT()
    got = ex.freeze_all_but_last_blocks(model)
    want = _want_trainable(model, 1)
    assert _trainable(model) == want, (
        f"expected trainable: {sorted(want)}; got {sorted(_trainable(model))}. Hint: requires_grad_(False) on "
        "model.parameters(), then requires_grad_(True) on trf_blocks[-1], final_norm and out_head.")
    count = sum(p.numel() for n, p in model.named_parameters() if n in want)  # 6*2 + 6*6+6 + 6*2 + 6*2+2 = 80
    assert isinstance(got, int) and not isinstance(got, bool), f"return an int (the count), got {type(got).__name__}"
    assert got == count == 80, f"expected {count} trainable values (sum of p.numel()), got {got}"


@pytest.mark.exercise("freeze_all_but_last_blocks")
def test_freeze_n_blocks_from_any_starting_state(ex):
    model = _TinyGPT(n_layers=5)
    for name, p in model.named_parameters():      # a mixed start: the embeddings trainable, the head frozen
        p.requires_grad_(name.startswith(("tok_emb", "trf_blocks.0.")))
    for n_blocks in (2, 0, 5):
        got = ex.freeze_all_but_last_blocks(model, n_blocks)
        want = _want_trainable(model, n_blocks)
        assert _trainable(model) == want, (
            f"n_blocks={n_blocks}: expected trainable {sorted(want)}, got {sorted(_trainable(model))}. "
            "Hint: freeze everything first, then unfreeze trf_blocks[-n_blocks:] (none for 0), final_norm, out_head.")
        assert got == sum(p.numel() for p in model.parameters() if p.requires_grad), (
            f"n_blocks={n_blocks}: the count returned ({got}) is not the number of trainable values")


@pytest.mark.exercise("freeze_all_but_last_blocks")
def test_frozen_weights_do_not_move_in_a_training_step(ex):
    model = _TinyGPT()
    ex.freeze_all_but_last_blocks(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, labels = torch.randint(0, 50, (8, 10)), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(ids), labels).backward()
    opt.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == _want_trainable(model, 1), (
        f"after one step these weights moved: {sorted(moved)}; only the last block, final_norm and out_head should")
    assert model.tok_emb.weight.grad is None, "the embeddings got a gradient: they should be frozen"


# --------------------------------------------------------------------------- #
# confusion_over_loader
# --------------------------------------------------------------------------- #
class _FirstIdIsTheClass(nn.Module):
    """Predicts class (first id of the row) % C, by putting a large logit there; counts its calls."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.calls = num_classes, 0
        self.scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, ids):
        self.calls += 1
        return nn.functional.one_hot(ids[:, 0] % self.num_classes, self.num_classes).float() * self.scale


def _confusion(ex, loader, model, num_classes):
    got = ex.confusion_over_loader(loader, model, num_classes)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.long, (
        f"expected a torch.long tensor, got {getattr(got, 'dtype', type(got).__name__)}. "
        "Hint: torch.zeros(num_classes, num_classes, dtype=torch.long)")
    assert got.shape == (num_classes, num_classes), (
        f"expected shape ({num_classes}, {num_classes}), got {tuple(got.shape)}")
    return got


@pytest.mark.exercise("confusion_over_loader")
def test_confusion_of_a_small_batch_by_hand(ex):
    loader = [(torch.tensor([[0, 9], [1, 9], [1, 9]]), torch.tensor([0, 0, 1]))]  # predicted 0, 1, 1
    got = _confusion(ex, loader, _FirstIdIsTheClass(2), 2)
    assert got.tolist() == [[1, 1], [0, 1]], (
        f"true [0, 0, 1] predicted [0, 1, 1] give [[1, 1], [0, 1]] (rows: truth, columns: prediction), "
        f"got {got.tolist()}" + (" (transposed: put the truth in the rows)" if got.tolist() == [[1, 0], [1, 1]] else ""))


@pytest.mark.exercise("confusion_over_loader")
def test_confusion_agrees_with_scikit_learn_over_every_batch(ex):
    from sklearn.metrics import confusion_matrix

    ids, labels = torch.randint(0, 100, (23, 5)), torch.randint(0, 3, (23,))
    loader = [(ids[i:i + 5], labels[i:i + 5]) for i in range(0, 23, 5)]   # batches of 5, 5, 5, 5 and 3
    model = _FirstIdIsTheClass(3)
    got = _confusion(ex, loader, model, 3)
    want = confusion_matrix(labels.tolist(), (ids[:, 0] % 3).tolist(), labels=[0, 1, 2])
    assert got.tolist() == want.tolist(), (
        f"expected {want.tolist()} (sklearn.metrics.confusion_matrix), got {got.tolist()}"
        + (f" — {int(got.sum())} rows counted instead of 23: count every row of every batch, the short last one too"
           if int(got.sum()) != 23 else ""))
    assert model.calls == len(loader), f"the model was called {model.calls} times for {len(loader)} batches"


@pytest.mark.exercise("confusion_over_loader")
def test_confusion_keeps_classes_never_seen_and_needs_no_gradients(ex):
    loader = [(torch.tensor([[0], [3]]), torch.tensor([0, 0]))]      # class 0 only, always predicted 0
    model = _FirstIdIsTheClass(3).train()
    got = _confusion(ex, loader, model, 3)
    assert got.tolist() == [[2, 0, 0], [0, 0, 0], [0, 0, 0]], (
        f"two rows of class 0 predicted as 0, with 3 classes: expected [[2, 0, 0], [0, 0, 0], [0, 0, 0]], "
        f"got {got.tolist()}")
    assert model.training, "the model's mode changed: leave it as it was (do not call model.eval())"

    class Checks(_FirstIdIsTheClass):
        def forward(self, ids):
            assert not torch.is_grad_enabled(), "compute the predictions under torch.no_grad()"
            return super().forward(ids)

    _confusion(ex, loader, Checks(3), 3)
