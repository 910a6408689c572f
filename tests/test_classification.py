"""Step 6: the SMS data, the split, padding, the classifier head, its loop, classify, the baseline.

References: pandas counts of the raw file, Hugging Face's ``GPT2ForSequenceClassification``
(last non-pad token), hand-computed precision/recall, and the library's own unpadded rows."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from course_lib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from course_lib.classification import (
    PAD_TOKEN_ID,
    GPTClassifier,
    SpamDataset,
    add_classifier_head,
    binary_metrics,
    calc_accuracy_loader,
    classification_loss,
    classify,
    finetune_classifier,
    load_sms_spam,
    predict_loader,
    split_dataset,
    tfidf_baseline,
    train_classifier,
    trim_padding,
)
from course_lib.config import get_config
from course_lib.model import GPTModel, count_parameters
from course_lib.tokenizers import tiktoken_gpt2

CFG = get_config("gpt-tiny").replace(context_length=32)


@pytest.fixture(scope="module")
def sms():
    return load_sms_spam()


@pytest.fixture(scope="module")
def tok():
    return tiktoken_gpt2()


def _gpt(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def _frame(texts, labels=None):
    labels = labels or ["ham" if i % 2 == 0 else "spam" for i in range(len(texts))]
    return pd.DataFrame({"label": labels, "text": texts})


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def test_all_messages_with_quotes_kept(sms):
    assert len(sms) == 5574
    assert sms["label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    # the file's lines, split by hand, are the rows (quote characters merge rows under default quoting)
    from course_lib.data import fetch
    lines = fetch("sms-spam").read_text(encoding="utf-8").splitlines()
    by_hand = [line.split("\t", 1) for line in lines]
    assert list(sms["label"]) == [label for label, _ in by_hand]
    assert list(sms["text"]) == [text for _, text in by_hand]
    assert any('"' in t for t in sms["text"])


def test_a_file_with_quotes_reads_line_by_line(tmp_path):
    path = tmp_path / "sms"
    path.write_text('ham\t"Hi" she said\nspam\tWIN "free\nham\tok"\n', encoding="utf-8")
    df = load_sms_spam(path)
    assert list(df["text"]) == ['"Hi" she said', 'WIN "free', 'ok"']


def test_a_wrong_file_is_named(tmp_path):
    path = tmp_path / "other.tsv"
    path.write_text("hello\tworld\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1.*ham"):
        load_sms_spam(path)
    with pytest.raises(FileNotFoundError, match="path"):
        load_sms_spam(tmp_path / "missing")


def test_split_dedupes_balances_and_is_disjoint(sms):
    train, val, test = split_dataset(sms)
    assert (len(train), len(val), len(test)) == (914, 130, 262)  # int(1306*.7), int(1306*.1), the rest
    both = pd.concat([train, val, test])
    assert both["label"].value_counts().to_dict() == {"ham": 653, "spam": 653}
    assert both["text"].is_unique  # no message in two splits (nor twice in one)
    assert set(both["text"]) <= set(sms["text"])
    # each row keeps its own label
    truth = dict(zip(sms.drop_duplicates("text")["text"], sms.drop_duplicates("text")["label"]))
    assert all(truth[t] == lab for t, lab in zip(both["text"], both["label"]))


def test_split_is_reproducible_and_seeded(sms):
    a = split_dataset(sms, seed=5)
    b = split_dataset(sms, seed=5)
    c = split_dataset(sms, seed=6)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)
    assert list(a[0]["text"]) != list(c[0]["text"])


def test_split_without_dedupe_leaks_copies(sms):
    train, _, test = split_dataset(sms, dedupe=False, balance=False)
    assert len(train) + len(_) + len(test) == 5574
    assert set(train["text"]) & set(test["text"])  # the leak dedupe prevents
    train, _, test = split_dataset(sms, balance=False)
    assert len(train) + len(_) + len(test) == 5574 - 403


@pytest.mark.parametrize("kwargs, error", [
    (dict(fractions=(0.5, 0.5)), ValueError), (dict(fractions=(0.7, 0.2, 0.2)), ValueError),
    (dict(fractions=(1.0, 0.0, 0.0)), ValueError), (dict(fractions="abc"), TypeError),
    (dict(seed=1.5), TypeError), (dict(balance="yes"), TypeError),
])
def test_split_bad_arguments(sms, kwargs, error):
    with pytest.raises(error, match="fractions|seed|balance"):
        split_dataset(sms, **kwargs)


def test_split_needs_a_frame():
    with pytest.raises(TypeError, match="DataFrame"):
        split_dataset([("ham", "hi")])
    with pytest.raises(ValueError, match="text"):
        split_dataset(pd.DataFrame({"label": ["ham"]}))


# --------------------------------------------------------------------------- #
# Padding
# --------------------------------------------------------------------------- #
def test_padding_truncation_and_true_lengths(tok):
    texts = ["Hello there, how are you?", "Hi", "Free entry in 2 a wkly comp to win FA Cup final tkts"]
    ds = SpamDataset(_frame(texts), tok)
    encoded = [tok.encode(t) for t in texts]
    assert ds.max_length == max(len(e) for e in encoded)
    for i, e in enumerate(encoded):
        ids, label = ds[i]
        assert ids.shape == (ds.max_length,)
        assert ids[:len(e)].tolist() == e and (ids[len(e):] == PAD_TOKEN_ID).all()
        assert ds.lengths[i] == len(e) and label.item() == i % 2
    short = SpamDataset(_frame(texts), tok, max_length=4)
    assert short.truncated == 2 and short.lengths.tolist() == [4, len(encoded[1]), 4]
    assert short[2][0].tolist() == encoded[2][:4]  # the beginning is kept


def test_default_length_never_exceeds_the_context(tok):
    long = " ".join(["word"] * 100)
    ds = SpamDataset(_frame([long, "hi"]), tok, context_length=32)
    assert ds.max_length == 32 and ds.truncated == 1
    with pytest.raises(ValueError, match="context"):
        SpamDataset(_frame(["hi"]), tok, max_length=64, context_length=32)


def test_the_pad_text_is_ordinary_text(tok):
    ds = SpamDataset(_frame(["see <|endoftext|> here", "x"]), tok)
    assert PAD_TOKEN_ID not in ds[0][0][: ds.lengths[0]].tolist()


@pytest.mark.parametrize("texts, error, match", [
    (["fine", "  "], ValueError, "row 1 is empty"),
    (["fine", None], TypeError, "row 1"),
])
def test_dataset_bad_texts(tok, texts, error, match):
    with pytest.raises(error, match=match):
        SpamDataset(_frame(texts), tok)


def test_dataset_unknown_label(tok):
    with pytest.raises(ValueError, match="label"):
        SpamDataset(_frame(["a", "b"], ["ham", "eggs"]), tok)


# --------------------------------------------------------------------------- #
# The head and pooling
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pads_change_nothing(pooling):
    clf = add_classifier_head(_gpt(), pooling=pooling, verbose=False).eval()
    row = torch.tensor([[5, 17, 300, 42, 9]])
    padded = torch.cat([row, torch.full((1, 6), PAD_TOKEN_ID)], dim=1)
    other = torch.tensor([[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])
    together = clf(torch.cat([padded, other]))
    torch.testing.assert_close(together[:1], clf(row), rtol=0, atol=1e-6)
    assert together.shape == (2, 2)


def test_last_pooling_is_hugging_faces_last_non_pad_token():
    transformers = pytest.importorskip("transformers")
    from course_lib.pretrained import hf_config_to_course, hf_to_course_state

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=301, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                     num_labels=2, pad_token_id=300)
    hf = transformers.GPT2ForSequenceClassification(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg, tied = hf_config_to_course(hf_cfg.to_dict())
    state = {k: v for k, v in hf.state_dict().items() if k != "score.weight"}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    gpt = GPTModel(cfg)
    gpt.load_state_dict(hf_to_course_state(state, cfg, tied=True))
    clf = add_classifier_head(gpt, pad_token_id=300, verbose=False).eval()
    with torch.no_grad():
        clf.gpt.out_head.weight.copy_(hf.score.weight)
        clf.gpt.out_head.bias.zero_()
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 7:] = 300
    ids[1, 3:] = 300
    with torch.no_grad():
        torch.testing.assert_close(clf(ids), hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_mean_pooling_by_hand():
    clf = add_classifier_head(_gpt(), pooling="mean", verbose=False).eval()
    ids = torch.tensor([[3, 4, 5, PAD_TOKEN_ID]])
    with torch.no_grad():
        per_token = clf.gpt(ids)[0, :3]            # [3, C]
        torch.testing.assert_close(clf(ids)[0], per_token.mean(dim=0))


def test_an_all_pad_row_is_an_error():
    clf = add_classifier_head(_gpt(), verbose=False).eval()
    with pytest.raises(ValueError, match="only pad"):
        clf(torch.full((1, 4), PAD_TOKEN_ID))


@pytest.mark.parametrize("trainable, trained", [
    ("head", {"gpt.out_head.weight", "gpt.out_head.bias"}),
    ("last-block", None),
    ("all", None),
])
def test_frozen_weights_stay_and_trainable_ones_move(trainable, trained):
    clf = add_classifier_head(_gpt(), trainable=trainable, verbose=False)
    last = f"gpt.trf_blocks.{CFG.n_layers - 1}."
    names = {n for n, _ in clf.named_parameters()}
    expected = trained or ({n for n in names if n.startswith((last, "gpt.final_norm.", "gpt.out_head."))}
                           if trainable == "last-block" else names)
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == expected
    assert count_parameters(clf, trainable_only=True) == sum(p.numel() for n, p in clf.named_parameters()
                                                             if n in expected)
    before = copy.deepcopy(clf.state_dict())
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randint(0, 1000, (4, 10)), torch.tensor([0, 1, 0, 1])
    opt.zero_grad()
    classification_loss(x, y, clf).backward()
    opt.step()
    after = clf.state_dict()
    for name in names:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in expected), name


def test_head_shape_and_reported_count(capsys):
    clf = add_classifier_head(_gpt(), num_classes=3, trainable="head", labels=("a", "b", "c"))
    assert clf.gpt.out_head.weight.shape == (3, CFG.emb_dim)
    assert f"{CFG.emb_dim * 3 + 3:,} of" in capsys.readouterr().out
    assert clf(torch.tensor([[1, 2]])).shape == (1, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=1), "num_classes"), (dict(num_classes=0), "num_classes"),
    (dict(trainable="body"), "trainable"), (dict(pooling="max"), "pooling"),
])
def test_head_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        add_classifier_head(_gpt(), verbose=False, **kwargs)


def test_head_needs_a_gpt():
    with pytest.raises(TypeError, match="GPTModel"):
        add_classifier_head(torch.nn.Linear(2, 2), verbose=False)


# --------------------------------------------------------------------------- #
# Loss, accuracy, training, checkpoints
# --------------------------------------------------------------------------- #
def _loaders(tok, n=24, seed=0, batch_size=4, collate=None):
    g = torch.Generator().manual_seed(seed)
    words = ["free", "win", "prize", "call", "now", "hi", "mum", "home", "later", "ok", "dinner", "see"]
    texts, labels = [], []
    for i in range(n):
        spam = i % 2 == 1
        pick = torch.randint(0, 6, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
        texts.append(" ".join(words[int(k) + (0 if spam else 6)] for k in pick))
        labels.append("spam" if spam else "ham")
    ds = SpamDataset(_frame(texts, labels), tok, context_length=CFG.context_length)
    train = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), collate_fn=collate)
    val = DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    return ds, train, val


def test_loss_and_accuracy_by_hand(tok):
    ds, _, val = _loaders(tok)
    clf = add_classifier_head(_gpt(), verbose=False).eval()
    with torch.no_grad():
        logits = clf(ds.ids)
    expected_acc = (logits.argmax(-1) == ds.targets).float().mean().item()
    assert calc_accuracy_loader(val, clf) == pytest.approx(expected_acc)
    assert calc_accuracy_loader(val, clf, num_batches=1) == pytest.approx(
        (logits[:4].argmax(-1) == ds.targets[:4]).float().mean().item())
    expected_loss = -torch.log_softmax(logits[:4], -1)[torch.arange(4), ds.targets[:4]].mean()
    torch.testing.assert_close(classification_loss(ds.ids[:4], ds.targets[:4], clf), expected_loss)
    targets, preds, probs = predict_loader(val, clf)
    assert torch.equal(targets, ds.targets) and torch.equal(preds, logits.argmax(-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(ds)))


def test_loss_bad_batches():
    clf = add_classifier_head(_gpt(), verbose=False)
    with pytest.raises(ValueError, match="target_batch"):
        classification_loss(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), clf)
    with pytest.raises(TypeError, match="input_batch"):
        classification_loss(torch.ones(2, 3), torch.ones(2, dtype=torch.long), clf)


def test_trim_padding_gives_the_same_batches_results(tok):
    ds, _, full = _loaders(tok)
    _, _, trimmed = _loaders(tok, collate=trim_padding)
    widths = [x.shape[1] for x, _ in trimmed]
    assert max(widths) == ds.max_length and min(widths) < ds.max_length  # some batches are narrower
    for (x, _), n in zip(trimmed, ds.lengths.split(4)):
        assert x.shape[1] == int(n.max())
    clf = add_classifier_head(_gpt(), verbose=False).eval()
    torch.testing.assert_close(predict_loader(trimmed, clf)[2], predict_loader(full, clf)[2], rtol=0, atol=1e-6)


def test_train_classifier_learns_and_records_accuracy(tok):
    _, train, val = _loaders(tok, n=32)
    torch.manual_seed(0)
    clf = add_classifier_head(_gpt(), trainable="all", verbose=False)
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    before = calc_accuracy_loader(val, clf.eval())
    history = train_classifier(clf, train, val, opt, num_epochs=6, eval_freq=8, eval_iter=None, progress=False,
                               verbose=False)
    assert len(history.metrics["val_accuracy"]) == len(history.steps) == len(history.metrics["train_accuracy"])
    assert history.metrics["val_accuracy"][-1] == pytest.approx(calc_accuracy_loader(val, clf))
    assert history.metrics["val_accuracy"][-1] == 1.0 and before < 1.0
    assert not clf.training


def test_classifier_resume_is_exact(tok, tmp_path):
    def run(path, steps, resume=False):
        _, train, val = _loaders(tok, n=32)
        torch.manual_seed(0)
        clf = add_classifier_head(_gpt(), trainable="last-block", verbose=False)
        opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-3)
        h = train_classifier(clf, train, val, opt, num_epochs=None, max_steps=steps, eval_freq=4, eval_iter=2,
                             checkpoint_path=path, resume=resume, progress=False, verbose=False)
        return clf, h

    full, h_full = run(tmp_path / "a.pt", 16)
    run(tmp_path / "b.pt", 8)
    resumed, h_res = run(tmp_path / "b.pt", 16, resume=True)
    assert h_res.train_losses == h_full.train_losses and h_res.metrics == h_full.metrics
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_classifier_checkpoint_reloads_with_identical_predictions(tok, tmp_path):
    clf = add_classifier_head(_gpt(), pooling="mean", trainable="head", verbose=False).eval()
    with torch.no_grad():
        clf.gpt.out_head.bias.fill_(0.3)
    save_checkpoint(tmp_path / "clf.pt", clf)
    back = model_from_checkpoint(tmp_path / "clf.pt")
    assert isinstance(back, GPTClassifier) and back.pooling == "mean" and back.labels == ("ham", "spam")
    assert back.trainable == "head"
    assert {n for n, p in back.named_parameters() if p.requires_grad} == {"gpt.out_head.weight", "gpt.out_head.bias"}
    texts = ["WIN a FREE prize now", "see you at home", "ok"]
    assert classify(texts, back, tok) == classify(texts, clf, tok)
    ids = torch.tensor([[1, 2, 3, PAD_TOKEN_ID]])
    assert torch.equal(back(ids), clf(ids))
    load_checkpoint(tmp_path / "clf.pt", add_classifier_head(_gpt(1), pooling="mean", verbose=False))


def test_a_forged_architecture_is_refused(tmp_path):
    clf = add_classifier_head(_gpt(), verbose=False)
    clf.architecture = lambda: {"class": "os.system", "args": {}}
    save_checkpoint(tmp_path / "x.pt", clf)
    from course_lib.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="only course_lib models"):
        model_from_checkpoint(tmp_path / "x.pt")


# --------------------------------------------------------------------------- #
# classify
# --------------------------------------------------------------------------- #
def test_classify_agrees_with_a_manual_forward_pass(tok):
    clf = add_classifier_head(_gpt(), verbose=False).train()
    texts = ["Congratulations! You won a free cruise, call 0800", "Running late, see you at 7", "k"]
    got = classify(texts, clf, tok, batch_size=2)
    assert clf.training  # mode put back
    clf.eval()
    for text, pred in zip(texts, got):
        with torch.no_grad():
            probs = torch.softmax(clf.gpt(torch.tensor([tok.encode(text)]))[0, -1], -1)
        k = int(probs.argmax())
        assert pred.label == ("ham", "spam")[k] and pred.probability == pytest.approx(float(probs[k]), abs=1e-6)
    one = classify(texts[0], clf, tok)
    assert one.label == got[0].label and one.probability == pytest.approx(got[0].probability, abs=1e-6)


def test_classify_reads_what_the_model_was_trained_on(tok, tmp_path):
    clf = add_classifier_head(_gpt(), verbose=False).eval()
    clf.max_length = 5
    long = "you have won a free holiday, call now to claim it"
    with torch.no_grad():
        expected = torch.softmax(clf(torch.tensor([tok.encode(long)[:5]]))[0], -1).max().item()
        whole = torch.softmax(clf(torch.tensor([tok.encode(long)]))[0], -1).max().item()
    assert expected != pytest.approx(whole, abs=1e-6)
    assert classify(long, clf, tok).probability == pytest.approx(expected, abs=1e-6)
    save_checkpoint(tmp_path / "c.pt", clf)
    back = model_from_checkpoint(tmp_path / "c.pt")
    assert back.max_length == 5 and classify(long, back, tok).probability == pytest.approx(expected, abs=1e-6)


def test_classify_truncates_long_texts_to_the_context(tok):
    clf = add_classifier_head(_gpt(), verbose=False).eval()
    long = "free " * 200
    ids = torch.tensor([tok.encode(long)[:CFG.context_length]])
    with torch.no_grad():
        probs = torch.softmax(clf(ids)[0], -1)
    assert classify(long, clf, tok).probability == pytest.approx(float(probs.max()), abs=1e-6)
    with pytest.raises(ValueError, match="context"):
        classify(long, clf, tok, max_length=CFG.context_length + 1)


@pytest.mark.parametrize("texts, error, match", [
    ("", ValueError, "empty"), (["ok", " "], ValueError, r"texts\[1\] is empty"), (5, TypeError, "string"),
    (["ok", 3], TypeError, r"texts\[1\]"),
])
def test_classify_bad_texts(tok, texts, error, match):
    clf = add_classifier_head(_gpt(), verbose=False)
    with pytest.raises(error, match=match):
        classify(texts, clf, tok)


# --------------------------------------------------------------------------- #
# Metrics and the baseline
# --------------------------------------------------------------------------- #
def test_binary_metrics_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 0, 1, 1, 0, 0, 0, 1]
    m = binary_metrics(torch.tensor(y), p)
    tp, fp, fn = 3, 1, 1
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(tp / (tp + fp)) and m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert binary_metrics([0, 0], [0, 0])["precision"] == 0.0
    with pytest.raises(ValueError, match="equal length"):
        binary_metrics([1], [1, 0])


def test_tfidf_baseline_on_the_split(sms):
    train, val, test = split_dataset(sms)
    result = tfidf_baseline(train, {"val": val, "test": test})
    assert result["test"]["accuracy"] > 0.9 and result["val"]["accuracy"] > 0.9
    # chosen on validation: no setting of the grid beats the chosen one there
    from course_lib.classification import TFIDF_GRID
    for params in TFIDF_GRID:
        other = tfidf_baseline(train, {"val": val}, grid=[params])
        assert other["val"]["accuracy"] <= result["val"]["accuracy"]
    assert result["params"] in [dict(p) for p in TFIDF_GRID]
    predicted = result["model"].predict(list(test["text"]))
    truth = [int(x == "spam") for x in test["label"]]
    assert result["test"]["accuracy"] == pytest.approx(sum(a == b for a, b in zip(predicted, truth)) / len(test))


# --------------------------------------------------------------------------- #
# The whole recipe
# --------------------------------------------------------------------------- #
def test_finetune_classifier_tiny_end_to_end():
    torch.manual_seed(0)
    result = finetune_classifier("tiny", base_model=_gpt(cfg=get_config("gpt-tiny")), progress=False,
                                 verbose=False, device="cpu")
    m = result.metrics
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_precision", "test_recall", "test_f1"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["trainable_parameters"] == count_parameters(result.model, trainable_only=True)
    assert m["rows"] == {"train": 160, "val": 130, "test": 262} and m["max_length"] == 64
    train, val, test = result.splits
    assert not set(train["text"]) & set(test["text"])
    test_ds = SpamDataset(test, tiktoken_gpt2(), 64)
    acc = calc_accuracy_loader(DataLoader(test_ds, batch_size=16), result.model)
    assert m["test_accuracy"] == pytest.approx(acc)
    assert math.isfinite(m["seconds"])


# --------------------------------------------------------------------------- #
# Bad input that gave a wrong result or a deep traceback (a review's findings)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("predictions", [[0.2, 0.9, 0.6], torch.tensor([0.2, 0.9, 0.6]), "011", [0, 1, float("nan")]])
def test_binary_metrics_refuses_what_is_not_class_ids(predictions):
    with pytest.raises(TypeError, match="must be class ids"):
        binary_metrics([0, 1, 1], predictions)


def test_binary_metrics_takes_integral_floats_and_booleans():
    import numpy as np

    want = binary_metrics([0, 1, 1], [0, 1, 0])
    assert binary_metrics([0.0, 1.0, 1.0], torch.tensor([0.0, 1.0, 0.0])) == want
    assert binary_metrics([0, 1, 1], np.array([0.1, 0.9, 0.4]) > 0.5) == want


def test_load_sms_spam_names_the_line_with_an_extra_tab_and_a_file_not_utf8(tmp_path):
    path = tmp_path / "sms"
    path.write_text("ham\tfine\nspam\tWIN\tnow\nham\tok\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: .*more than one tab"):
        load_sms_spam(path)
    path.write_text("spam\tWIN\tnow\nham\tok\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: .*more than one tab"):
        load_sms_spam(path)
    path.write_bytes(b"ham\tcaf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_sms_spam(path)


def test_split_dataset_refuses_one_class_no_rows_and_seeds_pandas_cannot_take():
    import numpy as np

    with pytest.raises(ValueError, match="only the label 'ham'"):
        split_dataset(_frame([f"m{i}" for i in range(20)], ["ham"] * 20))
    with pytest.raises(ValueError, match="no rows"):
        split_dataset(_frame([], []))
    for seed in (-1, 2**40):
        with pytest.raises(ValueError, match="seed must be"):
            split_dataset(_frame([f"m{i}" for i in range(20)]), seed=seed)
    frame = _frame([f"m{i}" for i in range(20)])
    assert [len(p) for p in split_dataset(frame, seed=np.int64(3))] == [len(p) for p in split_dataset(frame, seed=3)]


def test_labels_are_distinct_class_names(tok):
    with pytest.raises(ValueError, match="each class once"):
        SpamDataset(_frame(["a", "b"]), tok, labels=("ham", "spam", "ham"))
    with pytest.raises(TypeError, match="list of class names"):
        add_classifier_head(_gpt(), labels="ab", verbose=False)
    for pad in (-1, None, 1.5):
        with pytest.raises((TypeError, ValueError), match="pad_token_id"):
            add_classifier_head(_gpt(), pad_token_id=pad, verbose=False)
    with pytest.raises(TypeError, match="verbose must be True or False"):
        add_classifier_head(_gpt(), verbose="no")


def test_classification_loss_refuses_targets_that_are_no_class_ids():
    clf = add_classifier_head(_gpt(), verbose=False)
    x = torch.randint(0, 100, (2, 5))
    for targets, error, match in ((torch.tensor([-100, -100]), ValueError, "class id -100"),
                                  (torch.tensor([0, 5]), ValueError, "class id 5, outside the model's 2 classes"),
                                  (torch.tensor([0.0, 1.0]), TypeError, "integer class ids")):
        with pytest.raises(error, match=match):
            classification_loss(x, targets, clf)
    with pytest.raises(ValueError, match="no rows"):
        classification_loss(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long), clf)
    with pytest.raises(TypeError, match="add_classifier_head"):
        classification_loss(x, torch.tensor([0, 1]), _gpt())          # the GPT itself, not a classifier


def test_a_string_flag_is_not_taken_for_true(tmp_path):
    clf = add_classifier_head(_gpt(), verbose=False)
    rows = DataLoader([(torch.randint(0, 100, (5,)), torch.tensor(i % 2)) for i in range(4)], batch_size=2)
    optimizer = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-3)
    path = tmp_path / "run.pt"
    train_classifier(clf, rows, rows, optimizer, "cpu", num_epochs=1, checkpoint_path=path, progress=False,
                     verbose=False)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="resume must be True or False"):    # "no" resumed and overwrote the file
        train_classifier(clf, rows, rows, optimizer, "cpu", num_epochs=2, checkpoint_path=path, resume="no",
                         progress=False, verbose=False)
    assert path.read_bytes() == before
    with pytest.raises(TypeError, match="trim must be True or False"):
        finetune_classifier("tiny", trim="no", base_model=_gpt())
    with pytest.raises(TypeError, match="base_model must be a GPTModel"):
        finetune_classifier("tiny", base_model=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="GPTClassifier"):
        classify("hello", _gpt(), tiktoken_gpt2())


def test_tfidf_baseline_and_trim_padding_name_bad_input():
    train = _frame(["win cash now", "see you soon", "free prize", "lunch today"])
    with pytest.raises(ValueError, match=r"label\(s\) \['a'\] not in labels"):
        tfidf_baseline(_frame(["x", "y"], ["a", "ham"]))
    with pytest.raises(ValueError, match="grid must be a non-empty list"):
        tfidf_baseline(train, grid=())
    with pytest.raises(ValueError, match="grid must be a non-empty list"):
        tfidf_baseline(train, grid=[{"analyzer": "word", "C": 1.0}])
    with pytest.raises(TypeError, match="test_dfs must map names"):
        tfidf_baseline(train, [train])
    with pytest.raises(ValueError, match="'train' entry"):
        tfidf_baseline(train, {"train": train})
    with pytest.raises(ValueError, match="one class only"):
        tfidf_baseline(_frame(["a", "b"], ["ham", "ham"]))
    with pytest.raises(ValueError, match="batch is empty"):
        trim_padding([])
    with pytest.raises(ValueError, match="different lengths"):
        trim_padding([(torch.tensor([1, 2]), 0), (torch.tensor([1, 2, 3]), 1)])


def test_tfidf_baseline_is_tuned_on_a_split_named_validation_too(sms):
    train, val, test = split_dataset(sms, seed=123)
    by_val = tfidf_baseline(train, {"val": val, "test": test})
    by_validation = tfidf_baseline(train, {"validation": val, "test": test})    # notebook 06 names it so: the
    assert by_validation["params"] == by_val["params"]                           # grid was never searched
    assert by_validation["test"] == by_val["test"]
