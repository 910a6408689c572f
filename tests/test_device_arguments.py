"""A device argument that this machine lacks, or that is no device name, is named by the course's
own check (course_lib.config.get_device), not by torch's "Expected one of cpu, cuda, ..." or
"Torch not compiled with CUDA enabled" from deep inside a step function."""

from __future__ import annotations

import pytest
import torch

from course_lib import classification, instruction, preference, trainer, training
from course_lib.config import GPTConfig
from course_lib.model import GPTModel

CFG = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False)
BAD = ["gpu"] + (["cuda"] if not torch.cuda.is_available() else [])


def _calls():
    torch.manual_seed(0)
    gpt = GPTModel(CFG)
    clf = classification.add_classifier_head(GPTModel(CFG), pad_token_id=0, verbose=False)
    x = torch.randint(0, 61, (2, 5))
    rows = [(x, torch.tensor([0, 1]))]
    pair = preference.collate_preference([{"prompt": [1, 2], "chosen": [3, 4], "rejected": [5]}], pad_token_id=0)
    cfg = trainer.TrainerConfig(model={"base": "gpt-tiny"})
    return {
        "training.calc_loss_batch": lambda d: training.calc_loss_batch(x, x, gpt, d),
        "training.train": lambda d: training.train(gpt, [(x, x)], [(x, x)], torch.optim.AdamW(gpt.parameters()), d,
                                                   max_steps=1, progress=False, verbose=False),
        "classification.classification_loss": lambda d: classification.classification_loss(x, torch.tensor([0, 1]),
                                                                                             clf, d),
        "classification.calc_accuracy_loader": lambda d: classification.calc_accuracy_loader(rows, clf, d),
        "instruction.collate": lambda d: instruction.collate([[1, 2, 3]], device=d),
        "preference.collate_preference": lambda d: preference.collate_preference(
            [{"prompt": [1, 2], "chosen": [3], "rejected": [4]}], pad_token_id=0, device=d),
        "preference.dpo_batch_loss": lambda d: preference.dpo_batch_loss(pair, gpt, GPTModel(CFG), device=d),
        "trainer.evaluate": lambda d: trainer.evaluate(gpt, [(x, x)], 1, device=d),
        "trainer.configure_optimizer": lambda d: trainer.configure_optimizer(gpt, cfg, d),
    }


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("name", sorted(_calls()))
def test_a_device_this_machine_lacks_is_named(name, bad):
    with pytest.raises(ValueError, match=rf"'{bad}'.*(is not a device name|not available here)"):
        _calls()[name](bad)
    _calls()[name]("cpu")                                   # and the same call on the CPU works
