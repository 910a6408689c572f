"""The base model each profile fine-tunes: pretrained once on ``tiny``/``cpu``, cached, reused."""

from __future__ import annotations

import pytest
import torch

import course_lib.base_model as base_model
from course_lib.config import GPT_CONFIGS


def test_base_model_is_pretrained_once_cached_and_reused(tmp_path, monkeypatch):
    import dataclasses

    from course_lib.checkpoint import load_checkpoint

    quick = dataclasses.replace(base_model.BASE_RECIPES["tiny"], max_chars=40_000, max_steps=8)
    monkeypatch.setitem(base_model.BASE_RECIPES, "tiny", quick)
    torch.manual_seed(11)
    before = torch.rand(3)
    torch.manual_seed(11)
    model = base_model.load_base_model("tiny", cache_dir=tmp_path, verbose=False)
    assert torch.equal(torch.rand(3), before), "pretraining changed the caller's random state"
    path = base_model.base_model_path("tiny", tmp_path)
    assert path == tmp_path / "checkpoints" / "base-tiny.pt" and path.is_file()
    history = load_checkpoint(path)["extra"]["history"]
    assert history["val_losses"][-1] < history["val_losses"][0] - 0.5  # it learned something
    assert not model.training and model.cfg == GPT_CONFIGS["gpt-tiny"]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached base model should have been reused")

    monkeypatch.setattr(base_model, "_pretrain_base", no_training)
    again = base_model.load_base_model("tiny", cache_dir=tmp_path, verbose=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # a changed recipe, or a damaged file, is pretrained again
    monkeypatch.setitem(base_model.BASE_RECIPES, "tiny", dataclasses.replace(quick, max_steps=9))
    with pytest.raises(AssertionError, match="reused"):
        base_model.load_base_model("tiny", cache_dir=tmp_path, verbose=False)
    monkeypatch.setitem(base_model.BASE_RECIPES, "tiny", quick)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(AssertionError, match="reused"):
        base_model.load_base_model("tiny", cache_dir=tmp_path, verbose=False)


def test_an_unwritable_cache_still_gives_a_base_model_and_says_why_it_is_not_cached(tmp_path, monkeypatch, capsys):
    import dataclasses

    quick = dataclasses.replace(base_model.BASE_RECIPES["tiny"], max_chars=20_000, max_steps=2)
    monkeypatch.setitem(base_model.BASE_RECIPES, "tiny", quick)
    (tmp_path / "afile").write_text("COURSE_DATA_DIR pointed at a file by mistake")
    model = base_model.load_base_model("tiny", cache_dir=tmp_path / "afile", verbose=False)
    assert not model.training and model.cfg == GPT_CONFIGS["gpt-tiny"]
    out = capsys.readouterr().out
    assert "could not cache the base model" in out and "afile is a file" in out and "COURSE_DATA_DIR" in out
