"""Profiles, devices, seeds and configs (course_lib.config)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from course_lib.config import (GPT_CONFIGS, PROFILES, GPTConfig, get_config, get_device, get_profile,
                               seed_everything, setup)


def test_profile_from_environment(monkeypatch):
    for name in ("tiny", "cpu", "gpu"):
        monkeypatch.setenv("COURSE_PROFILE", name)
        assert get_profile().name == name
    monkeypatch.setenv("COURSE_PROFILE", " GPU ")
    assert get_profile().name == "gpu"


def test_unset_profile_defaults_to_cpu(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    assert get_profile().name == "cpu"


def test_unknown_profile_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "bogus")
    with pytest.raises(ValueError) as err:
        get_profile()
    for name in ("tiny", "cpu", "gpu", "bogus", "COURSE_PROFILE"):
        assert name in str(err.value)


def test_profile_pick_and_config():
    assert PROFILES["tiny"].pick(tiny=1, cpu=2, gpu=3) == 1
    assert PROFILES["gpu"].config == GPT_CONFIGS["gpt2-small"]
    for p in PROFILES.values():
        assert p.model in GPT_CONFIGS


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    assert get_device().type == expected


def test_device_override_and_errors(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("COURSE_DEVICE", "cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_device()
    with pytest.raises(ValueError, match="not a device name"):
        get_device("quantum")


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    seed_everything(7)
    a = draw()
    seed_everything(7)
    b = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    with pytest.raises(TypeError):
        seed_everything("7")


def test_gpt2_presets_match_the_paper():
    # Radford et al. 2019, Table 2: layers and d_model of the four released sizes
    sizes = {"gpt2-small": (12, 768), "gpt2-medium": (24, 1024), "gpt2-large": (36, 1280), "gpt2-xl": (48, 1600)}
    for name, (layers, width) in sizes.items():
        cfg = get_config(name)
        assert (cfg.n_layers, cfg.emb_dim, cfg.vocab_size, cfg.context_length) == (layers, width, 50257, 1024)
        assert cfg.head_dim == 64


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(emb_dim=100, n_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="drop_rate"):
        GPTConfig(drop_rate=1.5)
    with pytest.raises(ValueError, match="unknown config"):
        get_config("gpt5")
    assert get_config("gpt2-small", context_length=256).context_length == 256


def test_setup_prints_profile_device_seed(capsys, monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "tiny")
    S = setup(seed=5)
    out = capsys.readouterr().out
    assert "profile : tiny" in out and f"device  : {S.device}" in out and "seed    : 5" in out
    assert S.pick(tiny="a", cpu="b", gpu="c") == "a"
