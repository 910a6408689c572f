"""MFU: the peak-FLOP/s table, its lookups and fallbacks, and the formula against hand-computed values."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from course_lib import mfu as M
from course_lib.anatomy import count_parameters, flops_per_token, matmul_parameters
from course_lib.config import GPTConfig, get_config
from course_lib.model import GPTModel


# --------------------------------------------------------------------------- #
# The table
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, dtype, want", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),   # what torch.cuda.get_device_name says on an H100 SXM
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "fp16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "tf32", 156e12),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5e12),
    ("NVIDIA A10", "bf16", 125e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),              # not "L4" although it starts with it
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
    ("NVIDIA GeForce RTX 3090", "fp16", 71e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("Tesla T4", "fp16", 65e12),
    ("Tesla T4", "bf16", 8.1e12),                 # no bf16 tensor cores: the fp32 rate
])
def test_peak_flops_reads_the_datasheet_figure_for_a_device_name(name, dtype, want):
    assert M.peak_flops(name, dtype) == want


def test_every_table_entry_has_the_four_dtypes_and_sane_magnitudes():
    for name, entry in M.PEAK_FLOPS.items():
        assert set(entry) == {"bf16", "fp16", "fp32", "tf32"}, name
        assert all(v > 0 for v in entry.values()), name
        if name != "cpu":
            assert entry["bf16"] >= entry["fp32"] and entry["fp16"] >= entry["fp32"], name
    assert M.PEAK_FLOPS["H100 SXM"]["bf16"] / M.PEAK_FLOPS["A100"]["bf16"] == pytest.approx(989 / 312)


def test_dtype_names_and_torch_dtypes_are_the_same_lookup():
    h100 = "NVIDIA H100 80GB HBM3"
    assert M.peak_flops(h100, torch.bfloat16) == M.peak_flops(h100, "bfloat16") == M.peak_flops(h100, "bf16")
    assert M.peak_flops(h100, torch.float32) == M.peak_flops(h100, "fp32") == 67e12
    assert M.peak_flops(h100, torch.float16) == 989e12


def test_an_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype"):
        M.peak_flops("NVIDIA H100 80GB HBM3", "fp8")
    with pytest.raises(ValueError, match="dtype"):
        M.peak_flops("cpu", torch.int8)


def test_the_override_wins_over_the_table_and_is_checked():
    assert M.peak_flops("NVIDIA H100 80GB HBM3", "bf16", override=1.5e12) == 1.5e12
    assert M.peak_flops("Acme NeverSeen 1", "bf16", override=7.0) == 7.0  # no lookup, so no warning needed
    for bad in (0, -1.0, float("nan"), float("inf"), "1e12", True):
        with pytest.raises(ValueError, match="override"):
            M.peak_flops("cpu", override=bad)


def test_an_unknown_gpu_falls_back_to_the_documented_default_with_one_warning():
    name = "Acme Tensor Engine 9000 (test)"
    M._warned.discard(name)
    with pytest.warns(UserWarning, match="not in course_lib.mfu.PEAK_FLOPS"):
        got = M.peak_flops(name, "bf16")
    assert got == M.PEAK_FLOPS[M.FALLBACK_GPU]["bf16"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert M.peak_flops(name, "fp16") == M.PEAK_FLOPS[M.FALLBACK_GPU]["fp16"]


def test_the_cpu_estimate_is_per_core_times_the_cores_torch_uses():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert M.peak_flops("cpu", "fp32") == M.CPU_CORE_FLOPS == 2.5e9 * 2 * 8 * 2
        assert M.peak_flops(torch.device("cpu"), "bf16") == M.PEAK_FLOPS["cpu"]["bf16"]
        if (os.cpu_count() or 1) >= 2:
            torch.set_num_threads(2)
            assert M.peak_flops("cpu", "fp32") == 2 * M.CPU_CORE_FLOPS
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_asking_for_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        M.peak_flops("cuda", "bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_of_this_machine_is_looked_up_by_its_name():
    name = torch.cuda.get_device_name(0)
    key = M.lookup(name) or M.FALLBACK_GPU
    assert M.peak_flops("cuda", "bf16") == M.PEAK_FLOPS[key]["bf16"]


def test_lookup_maps_names_to_keys_and_unknown_to_none():
    assert M.lookup("NVIDIA A100-SXM4-80GB") == "A100"
    assert M.lookup("NVIDIA A10G") == "A10"  # the A10's figures (AWS's variant of it)
    assert M.lookup("NVIDIA L40") == "L40"
    assert M.lookup("NVIDIA GH200 480GB") == "H200"
    assert M.lookup("NVIDIA GeForce GTX 1080") is None
    assert M.lookup("CPU") == "cpu" and M.lookup("a100") == "A100"      # "CPU" was taken for an A100


def test_a_device_type_not_in_the_table_is_not_taken_for_a_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.peak_flops("CPU", "fp32") == M.peak_flops("cpu", "fp32")
    assert M.device_name("xpu") == "xpu"
    M._warned.discard("xpu")
    with pytest.warns(UserWarning, match="'xpu' is not in course_lib.mfu.PEAK_FLOPS"):
        assert M.peak_flops("xpu", "bf16") == M.PEAK_FLOPS[M.FALLBACK_GPU]["bf16"]


# --------------------------------------------------------------------------- #
# The formula
# --------------------------------------------------------------------------- #
def test_mfu_against_hand_values():
    assert M.mfu(1000, 6e6, 1e10) == pytest.approx(0.6)        # 1e3 * 6e6 / 1e10
    assert M.mfu(0, 6e6, 1e10) == 0.0
    # GPT-2 small at 400k tokens/s on an H100 (bf16): 854,438,400 FLOPs/token (below) -> 34.6 %
    assert M.mfu(400_000, 854_438_400, 989e12) == pytest.approx(0.34557, abs=1e-5)


def test_numpy_numbers_are_numbers():
    # a throughput from NumPy (np.int64 tokens / np.float32 seconds) is a number, not "must be a finite number"
    assert M.mfu(np.int64(1000), np.float32(6e6), np.float64(1e10)) == pytest.approx(0.6)
    assert M.peak_flops("cpu", override=np.float32(1.5e12)) == pytest.approx(1.5e12)
    with pytest.raises(ValueError, match="tokens_per_second"):
        M.mfu(np.bool_(True), 6e6, 1e10)


def test_an_empty_device_name_or_a_name_that_is_not_a_string_is_refused():
    for name in ("", "   "):      # not quietly an A100
        with pytest.raises(ValueError, match="empty"):
            M.peak_flops(name, "bf16")
    with pytest.raises(TypeError, match="device name"):
        M.lookup(None)
    with pytest.raises(TypeError, match="device"):
        M.peak_flops(3.5, "bf16")


@pytest.mark.parametrize("args, field", [
    ((-1, 6e6, 1e10), "tokens_per_second"), ((float("nan"), 6e6, 1e10), "tokens_per_second"),
    ((10, 0, 1e10), "flops_per_token"), ((10, -5, 1e10), "flops_per_token"),
    ((10, 6e6, 0), "peak"), ((10, 6e6, float("inf")), "peak"),
])
def test_mfu_refuses_bad_numbers_naming_them(args, field):
    with pytest.raises(ValueError, match=field):
        M.mfu(*args)


def test_flops_per_token_of_gpt2_small_by_hand():
    cfg = get_config("gpt2-small")
    L, d, V, T = 12, 768, 50257, 1024
    N = 12 * L * d * d + V * d                                   # 123,532,032 weights multiply every token
    assert N == 123_532_032 == matmul_parameters(cfg)
    forward = 2 * N + 4 * L * T * d                              # + attention scores and weighted values
    assert flops_per_token(cfg, training=False) == forward == 284_812_800
    assert flops_per_token(cfg, training=True) == 3 * forward == 854_438_400
    # the "6 N" rule of thumb, within the attention term (13 %) for this size
    assert flops_per_token(cfg) / (6 * N) == pytest.approx(1.1528, abs=1e-3)


def test_the_matmul_weights_counted_by_flops_per_token_are_those_of_the_built_model():
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)
    model = GPTModel(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert linear == matmul_parameters(cfg)                     # blocks' linears + the output head
    assert count_parameters(cfg, tied=False) == sum(p.numel() for p in model.parameters())
