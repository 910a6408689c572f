"""Every notebook follows the course's shape (COURSE_DESIGN.md §2) and is committed clean."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _cells(nb_path: Path) -> list[dict]:
    return json.loads(nb_path.read_text(encoding="utf-8"))["cells"]


def _src(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _headings(cells: list[dict]) -> list[str]:
    out = []
    for cell in cells:
        if cell["cell_type"] == "markdown":
            out += [line.lstrip("#").strip() for line in _src(cell).splitlines() if line.startswith("#")]
    return out


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no NN_name.ipynb files"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_title_and_expected_time(nb):
    first = _cells(nb)[0]
    text = _src(first)
    assert first["cell_type"] == "markdown" and text.startswith("# "), f"{nb.name}: first cell must be a '# Title'"
    for profile in ("tiny", "cpu", "gpu"):
        assert profile in text, f"{nb.name}: the title cell must give the expected time for the {profile} profile"
    assert re.search(r"you will|You will", text), f"{nb.name}: say what the learner will be able to do"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_setup_cell_shows_profile_device_seed(nb):
    code = [c for c in _cells(nb) if c["cell_type"] == "code"]
    assert code, f"{nb.name} has no code"
    assert "setup(" in _src(code[0]), f"{nb.name}: the first code cell must call course_lib.setup() " \
                                      "(prints profile, device, seed and versions)"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_shu_ha_ri_and_summary_sections(nb):
    heads = " | ".join(_headings(_cells(nb)))
    for word in ("Shu", "Ha", "Ri", "Summary"):
        assert re.search(rf"\b{word}\b", heads), f"{nb.name}: no heading names the {word} section ({heads})"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_ha_runs_the_checker_and_shu_checks_itself(nb):
    sources = [_src(c) for c in _cells(nb) if c["cell_type"] == "code"]
    step = int(nb.name[:2])
    assert any(re.search(rf"check\(\s*{step}\b", s) for s in sources), \
        f"{nb.name}: the Ha section must run check({step}) on the learner's exercises"
    assert sum("assert " in s for s in sources) >= 3, f"{nb.name}: Shu needs 'check yourself' assert cells"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(nb):
    for i, cell in enumerate(_cells(nb)):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{nb.name}: cell {i} has stored outputs; clear them before committing"
            assert cell.get("execution_count") is None, f"{nb.name}: cell {i} has an execution count"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_heatmaps_have_a_colour_scale(nb):
    """A heatmap without a colourbar shows which cells are bright, not how much they hold."""
    for i, cell in enumerate(_cells(nb)):
        src = _src(cell)
        if cell["cell_type"] == "code" and "imshow(" in src:
            assert "colorbar(" in src, f"{nb.name}: cell {i} draws a heatmap (imshow) without a colorbar"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_training_is_budgeted_in_steps_not_seconds(nb):
    """A budget in seconds trains a fast machine longer than a slow one (scores stop comparing across
    machines) and sizes progress bars for work that never runs; budget in steps or tokens instead."""
    for i, cell in enumerate(_cells(nb)):
        if cell["cell_type"] == "code":
            assert "max_seconds" not in _src(cell), \
                f"{nb.name}: cell {i} limits training by time (max_seconds); give max_steps from a token budget"
