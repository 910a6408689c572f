"""The hints behind ``course hint``: three for every exercise of steps 1-9, none that gives the solution away,
and the command that reveals them one at a time (state in a JSON file; tests use their own temporary one)."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import tokenize
import warnings
from pathlib import Path

import pytest

from course_lib import cli, hints
from course_lib.hints import HINTS, LEVELS, HintsFileWarning, hints_for, next_hint, revealed

ROOT = Path(__file__).resolve().parents[1]
STEPS = range(1, 10)


@pytest.fixture(autouse=True)
def _own_hints_file(tmp_path, monkeypatch):
    """Every test here reads and writes a temporary hints file, never the learner's: both the file and the
    data folder it would default to are in ``tmp_path``."""
    monkeypatch.setenv("COURSE_HINTS_FILE", str(tmp_path / "state" / "hints_seen.json"))
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "state" / "hints_seen.json"


# --------------------------------------------------------------------------------------------- #
# The exercises and the reference solutions, read with ast (nothing torch-heavy is imported)     #
# --------------------------------------------------------------------------------------------- #

def _tree(kind: str, step: int) -> tuple[str, ast.Module]:
    source = (ROOT / kind / f"step{step:02d}.py").read_text(encoding="utf-8")
    return source, ast.parse(source)


def exercise_names(step: int) -> list[str]:
    """The public functions and classes of ``exercises/stepNN.py``, in file order: the exercises."""
    _, tree = _tree("exercises", step)
    return [n.name for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def solution_lines(step: int) -> dict[str, list[str]]:
    """``{name: body lines}`` of ``solutions/stepNN.py``: docstring, comments and blank lines left out."""
    source, tree = _tree("solutions", step)
    lines = source.splitlines()
    comment_at = {tok.start[0]: tok.start[1] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                  if tok.type == tokenize.COMMENT}
    bodies = {}
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        kept = []
        for n in range(body[0].lineno, node.end_lineno + 1):
            line = lines[n - 1][:comment_at.get(n)].strip()
            if line:
                kept.append(line)
        bodies[node.name] = kept
    return bodies


# --------------------------------------------------------------------------------------------- #
# The leak check: no hint holds the solution's body, nor two consecutive non-trivial lines of it #
# --------------------------------------------------------------------------------------------- #

def _canon(text: str) -> str:
    """Code or prose with ``return``, backticks and all whitespace removed, so that a pasted line matches
    whatever its spacing or quoting in the hint."""
    return re.sub(r"\s+|`", "", re.sub(r"\breturn\b", "", text))


def _trivial(line: str) -> bool:
    """Too short to give anything away (``else:``, ``i += 1``), or a return of names only (``return out``)."""
    return len(line) <= 12 or re.fullmatch(r"return(\s+[\w.]+(\s*,\s*[\w.]+)*)?", line) is not None


def leak(hint: str, lines: list[str]) -> str | None:
    """What of the solution ``lines`` the text ``hint`` gives away, or ``None``."""
    text = _canon(hint)
    if _canon("".join(lines)) in text:
        return "the whole body"
    real = [line for line in lines if not _trivial(line)]
    for a, b in zip(real, real[1:]):
        if _canon(a) in text and _canon(b) in text:
            return f"two lines in a row: {a!r} and {b!r}"
    return None


def test_the_leak_check_catches_a_pasted_solution():
    lines = solution_lines(4)["layer_norm"]
    source = "\n".join(lines)
    assert len(lines) == 3
    assert leak(f"Here it is:\n```\n{source}\n```", lines) == "the whole body"
    assert leak("Write `" + "`; `".join(source.splitlines()) + "`.", lines) is not None  # line by line
    # two lines, re-spaced, in another order, with prose between them, the comments of the solution left out
    two = "`var = ((x-mean)**2).mean(dim=-1,keepdim=True)` after `mean = x.mean(dim=-1, keepdim=True)`."
    assert leak(two, lines) is not None and "two lines in a row" in leak(two, lines)
    # one key line is allowed; so is a fragment
    assert leak("`mean = x.mean(dim=-1, keepdim=True)` is the first line.", lines) is None
    assert leak("`torch.sqrt(var + eps)` puts eps inside the root.", lines) is None
    # a one-line solution, pasted without its `return`
    one = solution_lines(9)["lora_scale"]
    assert leak("alpha / math.sqrt(rank) if rslora else alpha / rank", one) == "the whole body"
    # the lines of a loop, each line alone allowed, both together not
    conf = solution_lines(6)["confusion_over_loader"]
    assert leak("`matrix[t, p] += 1`", conf) is None
    assert leak("`for t, p in zip(labels.tolist(), predicted.tolist()): matrix[t, p] += 1`", conf) is not None
    # trivial lines do not count as lines given away
    assert _trivial("else:") and _trivial("return out") and _trivial("return inputs, targets")
    assert not _trivial("return alpha / math.sqrt(rank) if rslora else alpha / rank")


# --------------------------------------------------------------------------------------------- #
# The hints themselves                                                                           #
# --------------------------------------------------------------------------------------------- #

def test_hints_cover_exactly_the_steps_with_exercises():
    files = sorted(int(p.stem[4:]) for p in (ROOT / "exercises").glob("step[0-9][0-9].py"))
    assert list(HINTS) == files == list(STEPS)


@pytest.mark.parametrize("step", STEPS)
def test_every_exercise_has_three_hints_and_no_hint_is_stale(step):
    names = exercise_names(step)
    assert names, f"exercises/step{step:02d}.py has no public function"
    missing, stale = sorted(set(names) - set(HINTS[step])), sorted(set(HINTS[step]) - set(names))
    assert not missing and not stale, (f"step {step}: exercises without hints {missing}, hints for no exercise "
                                       f"{stale} (course_lib/hints.py)")
    assert list(HINTS[step]) == names, "keep HINTS in the order of the exercise file (`course hint N` lists it)"
    for name, texts in HINTS[step].items():
        assert isinstance(texts, tuple) and len(texts) == LEVELS, f"{name}: {LEVELS} hints, got {len(texts)}"
        for k, text in enumerate(texts, 1):
            assert isinstance(text, str) and text.strip() == text and len(text) >= 40, (name, k, text)
            assert len(text) <= 400, f"{name} hint {k} has {len(text)} characters; 1-3 short sentences"
        assert len(set(texts)) == LEVELS, f"{name}: the three hints must differ"


@pytest.mark.parametrize("step", STEPS)
def test_no_hint_gives_the_solution_away(step):
    bodies = solution_lines(step)
    for name, texts in HINTS[step].items():
        assert name in bodies, f"solutions/step{step:02d}.py has no {name}"
        for k, text in enumerate(texts, 1):
            assert leak(text, bodies[name]) is None, f"step {step} {name} hint {k}: {leak(text, bodies[name])}"
        shown = "\n".join(texts)  # `course hint --all` shows the three together
        assert leak(shown, bodies[name]) is None, f"step {step} {name}, hints together: {leak(shown, bodies[name])}"


def test_hints_for_names_the_valid_choices():
    assert hints_for(3, "causal_mask") == HINTS[3]["causal_mask"]
    with pytest.raises(ValueError, match=r"no step 12.*1, 2, 3, 4, 5, 6, 7, 8, 9"):
        hints_for(12, "causal_mask")
    with pytest.raises(ValueError) as err:
        hints_for(3, "causal_msk")
    assert "did you mean 'causal_mask'?" in str(err.value)
    assert all(name in str(err.value) for name in HINTS[3])
    with pytest.raises(ValueError, match="did you mean 'split_heads'"):
        hints_for(3, "Split_Heads")
    with pytest.raises(ValueError) as err:
        hints_for(3, "zzz")
    assert "did you mean" not in str(err.value) and "causal_attention" in str(err.value)
    with pytest.raises(TypeError, match="step"):
        hints_for("3", "causal_mask")
    with pytest.raises(TypeError, match="exercise"):
        hints_for(3, None)


# --------------------------------------------------------------------------------------------- #
# Revealing hints, and the file that remembers them                                              #
# --------------------------------------------------------------------------------------------- #

def test_next_hint_reveals_one_more_each_time_then_stays(tmp_path):
    path = tmp_path / "seen.json"
    texts = HINTS[5]["lr_at_step"]
    got = [next_hint(5, "lr_at_step", path) for _ in range(5)]
    assert [(r.level, r.new) for r in got] == [(1, True), (2, True), (3, True), (3, False), (3, False)]
    assert [r.hints for r in got[:3]] == [texts[:1], texts[:2], texts]
    assert json.loads(path.read_text())["seen"] == {"5": {"lr_at_step": 3}}
    assert next_hint(5, "generate_until_eos", path).level == 1  # each exercise counts on its own
    assert revealed(5, path) == {"perplexity_from_loader": 0, "lr_at_step": 3, "generate_until_eos": 1}
    assert revealed(6, path) == dict.fromkeys(HINTS[6], 0)
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temporary file"


def test_a_wrong_name_records_nothing(tmp_path):
    path = tmp_path / "seen.json"
    with pytest.raises(ValueError):
        next_hint(3, "causal_msk", path)
    assert not path.exists()


def test_the_file_comes_from_the_environment(tmp_path, monkeypatch, _own_hints_file):
    next_hint(1, "bigram_counts")
    assert json.loads(_own_hints_file.read_text())["seen"] == {"1": {"bigram_counts": 1}}
    monkeypatch.delenv("COURSE_HINTS_FILE")
    assert hints.hints_file() == tmp_path / "data" / "hints_seen.json"  # the data folder's, here a temporary one
    next_hint(1, "bigram_counts")
    assert revealed(1, tmp_path / "data" / "hints_seen.json")["bigram_counts"] == 1


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"seen": {"1": {"bigram_counts": 7}}}',
                                    b'{"seen": {"1": ["bigram_counts"]}}', b'{"seen": {"1": {"bigram_counts": true}}}'])
def test_a_damaged_file_is_moved_aside_and_counting_starts_anew(tmp_path, damage):
    path = tmp_path / "seen.json"
    path.write_bytes(damage)
    with pytest.warns(HintsFileWarning, match="damaged") as caught:
        shown = next_hint(1, "bigram_counts", path)
    assert shown.level == 1 and shown.new
    aside = list(tmp_path.glob("seen.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damage, "the damaged file is kept, under another name"
    assert aside[0].name in str(caught[0].message)
    assert json.loads(path.read_text())["seen"] == {"1": {"bigram_counts": 1}}
    path.write_bytes(damage)  # damaged again, within the same second: a second name, the first one kept
    with pytest.warns(HintsFileWarning):
        assert revealed(1, path)["bigram_counts"] == 0
    assert len(list(tmp_path.glob("seen.json.damaged-*"))) == 2


def test_counts_of_renamed_exercises_are_kept(tmp_path):
    path = tmp_path / "seen.json"
    path.write_text(json.dumps({"version": 1, "seen": {"3": {"old_name": 2}, "10": {"x": 1}}}))
    next_hint(3, "causal_mask", path)
    assert json.loads(path.read_text())["seen"] == {"3": {"old_name": 2, "causal_mask": 1}, "10": {"x": 1}}


# --------------------------------------------------------------------------------------------- #
# `course hint`                                                                                  #
# --------------------------------------------------------------------------------------------- #

def run(capsys, *args) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command turns its warnings into `warning:` lines itself
        status = cli.main(["hint", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_course_hint_progression(capsys, _own_hints_file):
    texts = HINTS[7]["lcs_words"]
    for level in (1, 2, 3):
        status, out, err = run(capsys, 7, "lcs_words")
        assert status == 0 and not err
        for k in range(LEVELS):
            assert (texts[k][:30] in out) == (k < level), (level, k, out)
        assert re.findall(r"^  (\d)\. ", out, re.M) == [str(k) for k in range(1, level + 1)]
        if level < LEVELS:
            assert f"(hint {level} of 3: run again for the next)" in out
        else:
            assert "(hint 3 of 3: the last one" in out
    status, out, err = run(capsys, 7, "lcs_words")
    assert status == 0 and "no more hints" in out and all(t[:30] in out for t in texts)
    assert json.loads(_own_hints_file.read_text())["seen"] == {"7": {"lcs_words": 3}}


def test_course_hint_level_and_all_show_without_recording(capsys, _own_hints_file):
    texts = HINTS[2]["merge_pair"]
    status, out, _ = run(capsys, 2, "merge_pair", "--level", 2)
    assert status == 0 and texts[0][:30] in out and texts[1][:30] in out and texts[2][:30] not in out
    status, out, _ = run(capsys, 2, "merge_pair", "--all")
    assert status == 0 and all(t[:30] in out for t in texts)
    assert not _own_hints_file.exists()
    status, out, _ = run(capsys, 2, "merge_pair")  # the first recorded hint is still number 1
    assert "(hint 1 of 3" in out


def test_course_hint_lists_a_steps_exercises(capsys):
    run(capsys, 8, "mfu")
    run(capsys, 8, "mfu")
    status, out, _ = run(capsys, 8)
    assert status == 0
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert rows == {name: ("2 of 3" if name == "mfu" else "0 of 3") for name in HINTS[8]}


@pytest.mark.parametrize("args,says", [
    ((12,), ["no step 12", "1, 2, 3, 4, 5, 6, 7, 8, 9"]),
    ((0, "x"), ["no step 0"]),
    ((3, "causal_msk"), ["did you mean 'causal_mask'?", *HINTS[3]]),
    ((3, "causal_mask", "--level", 4), ["--level must be 1 to 3, got 4"]),
    ((3, "causal_mask", "--level", 0), ["--level must be 1 to 3, got 0"]),
    ((3, "--all"), ["need an EXERCISE"]),
])
def test_course_hint_bad_input_is_one_error_line(capsys, _own_hints_file, args, says):
    status, out, err = run(capsys, *args)
    assert status == 2 and not out
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(s in err for s in says), err
    assert not _own_hints_file.exists()


def test_course_hint_with_a_damaged_file_warns_and_goes_on(capsys, _own_hints_file):
    _own_hints_file.parent.mkdir(parents=True)
    _own_hints_file.write_text("{ half a fi")
    status, out, err = run(capsys, 4, "layer_norm")
    assert status == 0 and "(hint 1 of 3" in out
    assert err.startswith("warning: ") and "damaged" in err and err.count("\n") == 1
    assert len(list(_own_hints_file.parent.glob("hints_seen.json.damaged-*"))) == 1


def test_course_hint_on_a_file_it_cannot_write_is_an_error(capsys, _own_hints_file):
    _own_hints_file.mkdir(parents=True)  # a folder where the file should be
    status, out, err = run(capsys, 4, "layer_norm")
    assert status == 1 and err.startswith("error: ") and "COURSE_HINTS_FILE" in err and err.count("\n") == 1


def test_course_hint_as_a_learner_runs_it(_own_hints_file):
    def course(*args):
        return subprocess.run([sys.executable, "-m", "course_lib.cli", "hint", *args], cwd=ROOT, env=dict(os.environ),
                              capture_output=True, text=True, timeout=120)

    r = course("9", "fuse_qkv")
    assert r.returncode == 0 and "(hint 1 of 3: run again for the next)" in r.stdout, r.stdout + r.stderr
    assert json.loads(_own_hints_file.read_text())["seen"] == {"9": {"fuse_qkv": 1}}
    r = course("9", "fuse_qvk")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "did you mean 'fuse_qkv'?" in r.stderr
