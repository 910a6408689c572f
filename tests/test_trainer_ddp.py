"""Two processes on CPU (gloo), started with torchrun: DDP, and FSDP2 (killed and resumed half-way),
end with the parameters of one process on the same global batch, and only rank 0 writes.

How the batches line up: with ``shuffle=False`` the training windows are read in order, and rank ``r``
of ``W`` takes global batches ``r, r + W, r + 2W, ...`` (:class:`course_lib.shards.ShardLoader`,
``sequential=True``). So in optimizer step ``s``, two ranks with 2 micro-batches each read global
batches ``4s .. 4s + 3`` between them: exactly the 4 micro-batches one process with
``grad_accum_steps=4`` reads. DDP averages the ranks' gradients and each rank divides its loss by its
accumulation steps, so both compute the mean gradient over the same 16 windows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _corpora import verdict_shards
from course_lib.checkpoint import load_checkpoint
from course_lib.trainer import TrainerConfig, read_log, train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent

# Three runs in the same two processes: the first starts torchrun's process group inside train(), as
# `course pretrain` does, and leaves it up; the later runs use it (gloo cannot start a second group on
# torchrun's store: a train() that ended its group made the next one wait forever). The group ends when
# Python exits. A run with "kill_at" raises from the callback after that step, as a kill would.
RUNNER = """
import json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from course_lib.trainer import TrainerConfig, train

def killer(at):
    def callback(state):
        if state["step"] == at:
            raise RuntimeError("killed")
    return callback

for i, run in enumerate(json.loads(open(sys.argv[1]).read())):
    try:
        result = train(TrainerConfig.from_dict(run["cfg"]), resume=run["resume"], progress=False, verbose=True,
                       callback=killer(run["kill_at"]) if run["kill_at"] else None)
        print(f"rank-done {i} steps={result.steps} group-left-up={dist.is_initialized()}", flush=True)
    except RuntimeError as err:
        print(f"rank-{err} {i}", flush=True)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return verdict_shards(tmp_path_factory)


def _cfg(shards, out, **changes) -> TrainerConfig:
    return TrainerConfig(model={"base": "gpt-tiny", "n_layers": 2, "emb_dim": 32, "n_heads": 2, "drop_rate": 0.0},
                         tie_weights=True, data=str(shards), out_dir=str(out), batch_size=2, grad_accum_steps=2,
                         context_length=16, shuffle=False, max_steps=3, max_lr=3e-3, min_lr=3e-4, warmup_steps=1,
                         eval_every=3, eval_batches=2, log_every=1, checkpoint_every=2, seed=11, device="cpu",
                         ).replace(**changes)


def _torchrun(tmp_path, runs: list[tuple[TrainerConfig, bool, int | None]]) -> str:
    """Run ``train(cfg, resume=...)`` for each ``(cfg, resume, kill_at)``, as 2 processes under torchrun."""
    script, spec = tmp_path / "runner.py", tmp_path / "runs.json"
    script.write_text(RUNNER)
    spec.write_text(json.dumps([{"cfg": cfg.to_dict(), "resume": resume, "kill_at": kill_at}
                                for cfg, resume, kill_at in runs]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(spec)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def test_ddp_and_resumed_fsdp_on_two_processes_equal_one_process_and_only_rank_0_writes(shards, tmp_path):
    single = train(_cfg(shards, tmp_path / "single", grad_accum_steps=4, eval_batches=4), progress=False,
                   verbose=False)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    # FSDP: killed after step 2 (checkpoint at 2, log at 1, 2), then resumed from the gathered checkpoint
    fsdp_cfg = _cfg(shards, fsdp, fsdp=True)
    out = _torchrun(tmp_path, [(_cfg(shards, ddp), False, None), (fsdp_cfg, False, 2), (fsdp_cfg, True, None)])

    want = {k: v for k, v in single.model.state_dict().items()}
    for run in (ddp, fsdp):
        got = _weights(run)
        assert got.keys() == want.keys()
        diff = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert diff < 1e-6, (run.name, diff)
        # only rank 0 wrote: the three files, each step logged once, the global loss of one process
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl"]
        log = read_log(run)
        assert [r["step"] for r in log] == [1, 2, 3]
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in read_log(tmp_path / "single")],
                                                         rel=1e-6)
        # 2 val batches per rank: the 4 batches of the single run, averaged over both ranks
        assert log[-1]["val_loss"] == pytest.approx(single.val_loss, rel=1e-6)
        assert log[-1]["tokens"] == single.tokens == 3 * 2 * 2 * 2 * 16          # B x accum x world x T
        saved = json.loads((run / "config.json").read_text())
        assert saved["world_size"] == 2 and saved["global_batch_tokens"] == 2 * 2 * 2 * 16
        assert saved["fsdp"] == (run is fsdp)
    # rank 0 alone printed (per finished run: one evaluation line, one summary); both ranks finished every
    # run, all three in the group the first train() started and left up
    assert out.count("pretraining: 3/3 steps") == 2 and out.count("val loss") == 4, out[-3000:]
    assert out.count("rank-done 0 steps=3 group-left-up=True") == 2, out[-3000:]
    assert out.count("rank-killed 1") == 2 and out.count("resumed ") == 1, out[-3000:]
    assert out.count("rank-done 2 steps=3 group-left-up=True") == 2, out[-3000:]
