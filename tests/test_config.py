"""Profiles, devices, seeds and configs (course_lib.config)."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("field, value, error, says", [
    ("qkv_bias", "no", TypeError, "True or False"),       # a non-empty string is truthy: it was read as True
    ("qkv_bias", 1, TypeError, "True or False"),
    ("qkv_bias", None, TypeError, "True or False"),
    ("drop_rate", "0.1", TypeError, "number in \\[0, 1\\)"),
    ("drop_rate", None, TypeError, "number in \\[0, 1\\)"),
    ("drop_rate", True, TypeError, "number in \\[0, 1\\)"),
    ("drop_rate", float("nan"), ValueError, "in \\[0, 1\\)"),
    ("drop_rate", -0.1, ValueError, "in \\[0, 1\\)"),
    ("vocab_size", True, TypeError, "must be an int"),
    ("vocab_size", "50257", TypeError, "must be an int"),
    ("context_length", 1024.0, TypeError, "must be an int"),
    ("emb_dim", None, TypeError, "must be an int"),
    ("n_layers", -2, ValueError, "positive integer"),
    ("n_heads", 0, ValueError, "positive integer"),
])
def test_every_config_field_is_type_checked(field, value, error, says):
    with pytest.raises(error, match=says) as err:
        GPTConfig(**{field: value})
    assert f"GPTConfig.{field}" in str(err.value)
    with pytest.raises(error, match=f"GPTConfig.{field}"):
        get_config("gpt-tiny", **{field: value})


def test_config_values_from_numpy_and_json_become_plain_python():
    cfg = GPTConfig(vocab_size=np.int64(100), context_length=np.int32(8), emb_dim=16, n_heads=2, n_layers=1,
                    drop_rate=0, qkv_bias=np.bool_(True))
    assert cfg == GPTConfig(100, 8, 16, 2, 1, 0.0, True)
    assert [type(v) for v in cfg.to_dict().values()] == [int, int, int, int, int, float, bool]


def test_config_from_dict_checks_what_a_file_stored():
    cfg = get_config("gpt-cpu")
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), "ck.pt") == cfg
    bad = [({**cfg.to_dict(), "qkv_bias": "no"}, TypeError, "ck.pt: GPTConfig.qkv_bias"),
           ({**cfg.to_dict(), "drop_rate": None}, TypeError, "ck.pt: GPTConfig.drop_rate"),
           ({**cfg.to_dict(), "n_layer": 3}, ValueError, r"ck.pt: .*unknown field\(s\) \['n_layer'\]"),
           ({k: v for k, v in cfg.to_dict().items() if k != "qkv_bias"}, ValueError, r"missing field\(s\) \['qkv_bias'\]"),
           ([1, 2], TypeError, "ck.pt: a GPTConfig must be stored as a dict")]
    for data, error, says in bad:
        with pytest.raises(error, match=says):
            GPTConfig.from_dict(data, "ck.pt")


def test_replace_names_unknown_fields():
    with pytest.raises(TypeError, match="no field 'n_layer'.*n_layers"):
        get_config("gpt-tiny").replace(n_layer=3)
    with pytest.raises(TypeError, match="no field 'layers'"):
        get_config("gpt-tiny", layers=3)


def test_setup_prints_profile_device_seed(capsys, monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "tiny")
    S = setup(seed=5)
    out = capsys.readouterr().out
    assert "profile : tiny" in out and f"device  : {S.device}" in out and "seed    : 5" in out
    assert S.pick(tiny="a", cpu="b", gpu="c") == "a"


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**30])
def test_seed_everything_out_of_torchs_range_is_a_clear_error(seed):
    with pytest.raises(ValueError, match=r"seed must be between -2\*\*63 and 2\*\*64 - 1"):
        seed_everything(seed)


def test_seed_everything_takes_torchs_whole_range():
    assert seed_everything(2**64 - 1) == 2**64 - 1 and torch.initial_seed() == 2**64 - 1
    assert seed_everything(-2**63) == -2**63
    assert seed_everything(123) == 123
