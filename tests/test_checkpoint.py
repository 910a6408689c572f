"""Checkpoints: a faithful round trip, atomic saves, safe loading, and clear refusals."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import course_lib.checkpoint as ckpt_mod
from course_lib.checkpoint import (CheckpointError, CheckpointMismatchError, load_checkpoint,
                                   model_from_checkpoint, save_checkpoint)
from course_lib.config import GPTConfig
from course_lib.model import GPTModel

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)


def _trained(cfg=CFG, steps=3, tie=False, seed=0):
    torch.manual_seed(seed)
    model = GPTModel(cfg, tie_weights=tie)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (2, 8))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _step(model, opt, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_round_trip_restores_weights_optimizer_step_and_extra(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, opt, step=3, extra={"tokens_seen": 48, "hist": [1.5, 2.5]})
    model2 = GPTModel(CFG)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, weight_decay=0.1)
    state = load_checkpoint(path, model2, opt2)
    assert state["step"] == 3 and state["extra"] == {"tokens_seen": 48, "hist": [1.5, 2.5]}
    assert state["config"] == CFG.to_dict()
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    # The optimizer's moments came back too: the next step (same dropout draws) is identical.
    torch.manual_seed(5)
    la = _step(model, opt)
    torch.manual_seed(5)
    lb = _step(model2, opt2)
    assert la == lb
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_file_is_readable_by_the_safe_loader(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, opt, step=3)
    raw = torch.load(path, weights_only=True)  # independent check: no pickled Python objects
    assert set(raw) >= {"model", "optimizer", "config", "step", "rng"}


def test_random_state_is_restored(tmp_path):
    model, _ = _trained()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path / "run.pt", model, step=0)
    want = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    load_checkpoint(path, restore_rng=True)
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    assert got == want


def test_existing_file_is_not_overwritten_unless_asked(tmp_path):
    model, _ = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, step=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(path, model, step=2)
    assert load_checkpoint(path)["step"] == 1
    save_checkpoint(path, model, step=2, overwrite=True)
    assert load_checkpoint(path)["step"] == 2


def test_crash_during_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, opt, step=3)
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):  # writes half a file, then dies
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    model2, opt2 = _trained(seed=1, steps=4)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model2, opt2, step=4, overwrite=True)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert path.read_bytes() == before
    assert load_checkpoint(path, GPTModel(CFG))["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"], "the temporary file was left behind"


def test_truncated_file_is_a_clear_error(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, opt, step=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(path, GPTModel(CFG))
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match="noise.pt"):
        load_checkpoint(path)


def test_file_with_python_objects_is_refused_by_the_safe_loader(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt_mod.FORMAT, "payload": random.Random(0)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_bare_state_dict_is_not_taken_for_a_checkpoint(tmp_path):
    model, _ = _trained()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="not a course_lib checkpoint"):
        load_checkpoint(path, model)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


def test_mismatched_config_names_every_differing_key(tmp_path):
    model, _ = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, step=1)
    other = GPTModel(CFG.replace(emb_dim=64, n_layers=3))
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(path, other)
    msg = str(err.value)
    assert "emb_dim (checkpoint 32, model 64)" in msg and "n_layers (checkpoint 2, model 3)" in msg
    assert "n_heads" not in msg and "vocab_size" not in msg
    # dropout is not part of the weights: a different drop_rate loads.
    load_checkpoint(path, GPTModel(CFG.replace(drop_rate=0.0)))


def test_optimizer_asked_for_but_not_saved(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, step=1)
    with pytest.raises(CheckpointMismatchError, match="no optimizer state"):
        load_checkpoint(path, GPTModel(CFG), opt)


@pytest.mark.parametrize("tie", [False, True])
def test_model_from_checkpoint_rebuilds_the_model(tmp_path, tie):
    model, _ = _trained(tie=tie)
    path = save_checkpoint(tmp_path / "run.pt", model, step=1)
    rebuilt = model_from_checkpoint(path)
    assert rebuilt.cfg == CFG and rebuilt.tie_weights == tie
    assert (rebuilt.out_head.weight is rebuilt.tok_emb.weight) == tie
    idx = torch.randint(0, CFG.vocab_size, (1, 10))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), rebuilt(idx))


def test_extra_must_be_plain_data(tmp_path):
    model, _ = _trained()
    with pytest.raises(TypeError, match=r"extra\['when'\]"):
        save_checkpoint(tmp_path / "run.pt", model, extra={"when": object()})
    assert not (tmp_path / "run.pt").exists()


def test_bad_arguments():
    model, _ = _trained()
    with pytest.raises(TypeError, match="model"):
        save_checkpoint("x.pt", "not a model")
    with pytest.raises(ValueError, match="step"):
        save_checkpoint("x.pt", model, step=-1)


# --------------------------------------------------------------------------- #
# Reliability: damaged bits, foreign optimizers, diverged weights, killed saves, full disks
# --------------------------------------------------------------------------- #
import errno  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402

from course_lib.checkpoint import NonFiniteError, atomic_write  # noqa: E402


def _flip_a_bit_in_the_largest_tensor(path):
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(data))
    return info.filename


def test_a_flipped_bit_in_the_tensor_data_is_caught_on_load(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, opt, step=3)
    member = _flip_a_bit_in_the_largest_tensor(path)
    torch.load(path, weights_only=True)  # torch itself reads the damaged file without complaint
    with pytest.raises(CheckpointError, match=rf"run.pt is damaged.*{member}.*CRC"):
        load_checkpoint(path, GPTModel(CFG))
    with pytest.raises(CheckpointError, match="CRC"):
        model_from_checkpoint(path)


def test_an_optimizer_state_of_another_kind_is_a_named_mismatch_and_changes_nothing(tmp_path):
    model, adamw = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, adamw, step=3)
    target = GPTModel(CFG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    sgd = torch.optim.SGD(target.parameters(), lr=0.5)
    with pytest.raises(CheckpointMismatchError, match=r"torch.optim.adamw.AdamW, not a torch.optim.sgd.SGD"):
        load_checkpoint(path, target, sgd)
    assert sgd.param_groups[0]["lr"] == 0.5  # the SGD's learning rate was not replaced by AdamW's
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    load_checkpoint(path, target)  # the weights alone still load


def test_an_older_checkpoint_without_the_optimizer_type_is_still_checked(tmp_path):
    model, adamw = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, adamw, step=3)
    payload = torch.load(path, weights_only=True)
    del payload["optimizer_type"]  # as written before the type was stored
    torch.save(payload, path)
    with pytest.raises(CheckpointMismatchError, match="another kind of optimizer"):
        load_checkpoint(path, GPTModel(CFG), torch.optim.SGD(GPTModel(CFG).parameters(), lr=0.5))
    model2 = GPTModel(CFG)
    load_checkpoint(path, model2, torch.optim.AdamW(model2.parameters()))


def test_non_finite_weights_are_never_saved_over_a_good_checkpoint(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, opt, step=3)
    before = path.read_bytes()
    with torch.no_grad():
        model.trf_blocks[0].att.W_query.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not saving .*run.pt.*trf_blocks.0.att.W_query.weight"):
        save_checkpoint(path, model, opt, step=4, overwrite=True)
    assert path.read_bytes() == before
    save_checkpoint(tmp_path / "broken.pt", model, allow_nonfinite=True)  # on purpose, for inspection


def test_a_killed_save_leaves_no_temporary_file_after_the_next_save(tmp_path):
    target = tmp_path / "run.pt"
    script = (f"import time; from course_lib.checkpoint import atomic_write\n"
              f"atomic_write({str(target)!r}, lambda fh: (fh.write(b'x' * 100_000), fh.flush(), time.sleep(60)))")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".run.pt.*.tmp")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".run.pt.*.tmp")), "the child never started writing"
    finally:
        proc.kill()  # kill -9: no cleanup code runs
        proc.wait()
    assert list(tmp_path.glob(".run.pt.*.tmp")), "the killed save should have left its temporary file"
    live = tmp_path / f".run.pt.{os.getpid()}.inprogress.tmp"  # a save still running in this process
    live.write_bytes(b"partial")
    model, _ = _trained()
    save_checkpoint(target, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "run.pt"]


def test_checkpoints_get_normal_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        model, _ = _trained()
        path = save_checkpoint(tmp_path / "run.pt", model)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_unwritable_destinations_are_clear_errors(tmp_path):
    model, _ = _trained()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"afile is a file"):
        save_checkpoint(tmp_path / "afile" / "sub" / "run.pt", model)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_checkpoint(tmp_path, model, overwrite=True)


def test_a_full_disk_is_named_and_the_old_file_is_kept(tmp_path, monkeypatch):
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model, opt, step=3)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 10_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="no space left on the device") as info:
        save_checkpoint(path, model, opt, step=4, overwrite=True)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


@pytest.mark.parametrize("change", [{"qkv_bias": "no"}, {"n_layers": None}, {"unknown_field": 1}],
                         ids=["string-bool", "none-size", "unknown-field"])
def test_a_damaged_stored_config_is_named_with_its_file(tmp_path, change):
    model, _ = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model)
    payload = torch.load(path, weights_only=True)
    payload["config"].update(change)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"run.pt.*configuration is damaged"):
        model_from_checkpoint(path)


def test_a_config_missing_a_field_does_not_silently_take_a_default(tmp_path):
    model, _ = _trained()
    path = save_checkpoint(tmp_path / "run.pt", model)
    payload = torch.load(path, weights_only=True)
    del payload["config"]["drop_rate"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="missing field"):
        model_from_checkpoint(path)


# --------------------------------------------------------------------------- #
# Bad input that overwrote a checkpoint or blamed a good file (a review's findings)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("flag", ["overwrite", "include_rng", "allow_nonfinite"])
def test_save_checkpoint_takes_no_string_for_a_flag(tmp_path, flag):
    first, _ = _trained(seed=0)
    path = save_checkpoint(tmp_path / "model.pt", first)
    before = path.read_bytes()
    other, _ = _trained(seed=1)
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):      # "no" is truthy: it replaced the file
        save_checkpoint(path, other, **{flag: "no"}, **({} if flag == "overwrite" else {"overwrite": True}))
    assert path.read_bytes() == before


def test_load_checkpoint_names_a_device_this_machine_lacks_not_a_damaged_file(tmp_path):
    model, _ = _trained()
    path = save_checkpoint(tmp_path / "model.pt", model)
    bad = ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(ValueError, match=f"'{device}'") as err:
            load_checkpoint(path, map_location=device)
        assert "corrupt" not in str(err.value) and "Delete" not in str(err.value)
        with pytest.raises(ValueError, match=f"'{device}'"):
            model_from_checkpoint(path, device=device)
    for flag in ("restore_rng", "strict"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            load_checkpoint(path, model, **{flag: "no"})
    with pytest.raises(TypeError, match="return_extra must be True or False"):
        model_from_checkpoint(path, return_extra="no")
    with pytest.raises(TypeError, match="file path"):
        load_checkpoint(None)
    with pytest.raises(ValueError, match="path is empty"):
        save_checkpoint("", model)


@pytest.mark.parametrize("change", [{"model": None}, {"config": "gpt-tiny"}, {"extra": [1]}])
def test_a_checkpoint_with_a_damaged_payload_is_named(tmp_path, change):
    model, _ = _trained()
    path = save_checkpoint(tmp_path / "model.pt", model)
    payload = torch.load(path, weights_only=True)
    payload.update(change)
    if payload["model"] is None:
        del payload["model"]
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match=f"is damaged: its {next(iter(change))}"):
        load_checkpoint(tmp_path / "damaged.pt", GPTModel(CFG))
    with pytest.raises(ValueError, match="what rng_state"):
        ckpt_mod.set_rng_state({})
