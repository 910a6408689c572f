"""`course_lib.export.load_model` (step 9): every kind of model folder a learner serves or exports.

Each case is built by an independent writer (``save_checkpoint``, ``export_hf``, the trainer's
checkpoint name) from a small random model, and read back: the weights must equal the original's.
"""

from __future__ import annotations

import pytest
import torch

from course_lib.checkpoint import save_checkpoint
from course_lib.classification import add_classifier_head
from course_lib.config import GPTConfig
from course_lib.export import load_model
from course_lib.model import GPTModel
from course_lib.pretrained import export_hf

CFG = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPTModel(CFG).eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt"])
def test_reads_a_run_folder_and_its_prompt_template(tmp_path, model, name):
    save_checkpoint(tmp_path / name, model, extra={"style": "phi3"})
    for path in (tmp_path, tmp_path / name):
        loaded = load_model(path)
        assert same_weights(loaded.model, model) and not loaded.model.training
        assert (loaded.style, loaded.kind, loaded.source) == ("phi3", "checkpoint", str(tmp_path / name))


def test_a_checkpoint_without_a_template_has_style_none(tmp_path, model):
    save_checkpoint(tmp_path / "model.pt", model)
    assert load_model(tmp_path).style is None


def test_reads_a_hugging_face_folder(tmp_path, model):
    export_hf(model, tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.kind == "hf" and loaded.style is None
    x = torch.randint(0, CFG.vocab_size, (2, 8))
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=1e-5)


def test_refuses_a_classifier_and_names_the_command_that_uses_it(tmp_path, model):
    save_checkpoint(tmp_path / "model.pt", add_classifier_head(model, verbose=False))
    with pytest.raises(ValueError, match="GPTClassifier.*course classify"):
        load_model(tmp_path)


def test_refuses_missing_and_empty_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"holds no model: looked for model.pt, checkpoint.pt, config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        load_model(tmp_path, profile="tiny")
    with pytest.raises(TypeError, match="path must be"):
        load_model(3)
