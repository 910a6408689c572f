"""The cohort report behind ``course cohort report DIR`` (cross-cutting: imports nothing from the steps).

Learners drop the output of ``course progress --json`` (or their ``progress.json``; the format is
in :mod:`course_lib.progress`) into one shared folder. :func:`read_cohort` reads every ``*.json``
file directly in it (not its sub-folders), keeps the course-progress version-1 records, and lists
every other file as skipped with the reason (not JSON, another format, empty, binary, a folder,
unreadable, larger than 10 MB). The same learner twice: the file with the later ``updated`` wins.
:func:`summarize` counts, per step, the learners who passed each exercise and the Ri score
distributions per profile; :func:`format_cohort` prints them, :func:`plot_cohort` draws them.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .checks import describe, non_negative_int
from .files import atomic_write
from .progress import PASSED, STEPS, parse_progress_text

__all__ = ["Cohort", "read_cohort", "summarize", "format_cohort", "plot_cohort", "MAX_FILE_BYTES"]

#: Files larger than this are skipped unread (a progress file is a few kB).
MAX_FILE_BYTES = 10 * 2**20


@dataclass
class Cohort:
    """The records kept (one per learner, by name) and the files skipped, as ``(file name, reason)``."""

    folder: Path
    learners: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # learner -> file name
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0


def _updated(record: dict) -> datetime:
    when = datetime.fromisoformat(record["updated"])
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _read_one(path: Path) -> dict | str:
    """The record in ``path``, or why it is skipped."""
    if path.is_dir():
        return "a folder, not a file"
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return f"larger than {MAX_FILE_BYTES // 2**20} MB ({size:,} bytes): not a progress file"
        raw = path.read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not raw.strip():
        return "empty"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not text (binary or not UTF-8)"
    try:
        return parse_progress_text(text)
    except ValueError as err:
        return str(err)


def read_cohort(folder: str | os.PathLike) -> Cohort:
    """Read the progress files in ``folder`` (its ``*.json`` files, not its sub-folders).

    Raises:
        ValueError: ``folder`` does not exist, is a file, or holds no ``.json`` file.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ValueError(f"the folder {folder} does not exist: give the folder where learners put the output "
                         "of `course progress --json`")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file: give the folder that holds the learners' progress .json files")
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json")
    except OSError as err:
        raise ValueError(f"cannot list the folder {folder}: {err.strerror or err}") from None
    if not paths:
        raise ValueError(f"the folder {folder} holds no .json files: each learner saves "
                         "`course progress --json > NAME.json` into it")
    cohort = Cohort(folder, files=len(paths))
    for path in paths:
        found = _read_one(path)
        if isinstance(found, str):
            cohort.skipped.append((path.name, found))
            continue
        name = found["learner"].strip()
        if name in cohort.learners:
            older, newer = (path.name, cohort.sources[name])
            if _updated(found) > _updated(cohort.learners[name]):
                older, newer = newer, older
                cohort.learners[name], cohort.sources[name] = found, path.name
            cohort.skipped.append((older, f"an older record of learner {name!r} than {newer}"))
            continue
        cohort.learners[name], cohort.sources[name] = found, path.name
    cohort.skipped.sort()
    return cohort


def _exercise_order(records: list[dict], step: int) -> list[str]:
    """Every exercise name of ``step`` the records know, in the course's order where given."""
    names: list[str] = []
    for record in records:
        for name in record.get("exercise_names", {}).get(str(step), []):
            if isinstance(name, str) and name not in names:
                names.append(name)
    recorded = {n for r in records for n in r["steps"].get(str(step), {}).get("exercises", {})}
    return names + sorted(recorded - set(names))


_SUMMARY_KEYS = ("learners", "files", "steps", "slowest", "skipped")


def _summary(summary) -> dict:
    """``summary`` if it has the keys :func:`summarize` gives, else a clear ``TypeError``."""
    if not isinstance(summary, dict) or not all(k in summary for k in _SUMMARY_KEYS):
        raise TypeError(f"summary must be the dict summarize(read_cohort(folder)) returns (with "
                        f"{', '.join(_SUMMARY_KEYS)}), got {describe(summary)}")
    return summary


def summarize(cohort: Cohort, slowest: int = 5) -> dict:
    """The cohort's numbers, as plain JSON-ready data (what ``--json`` prints).

    Returns:
        ``{"learners": [names], "steps": {"<N>": {"exercises": [{"name", "passed", "attempted",
        "mean_attempts"}], "ri": [{"profile", "metric", "higher_is_better", "count", "min", "median",
        "max", "scores"}]}}, "slowest": [{"step", "name", "passed", "mean_attempts"}], "skipped": [{"file",
        "reason"}]}``. ``passed`` counts learners whose last check passed it; ``attempted`` those with
        at least one attempt; ``mean_attempts`` is their mean (``None`` when nobody tried). Ri scores
        are each learner's best, grouped by profile and metric. ``slowest`` lists the ``slowest``
        exercises someone attempted with the fewest passes, ties broken by the most attempts.

    Raises:
        TypeError: ``cohort`` is not the :class:`Cohort` :func:`read_cohort` returns.
        ValueError: ``slowest`` is not an integer >= 0.
    """
    if not isinstance(cohort, Cohort):
        raise TypeError(f"cohort must be the Cohort read_cohort(folder) returns, got {describe(cohort)}")
    slowest = non_negative_int("slowest", slowest, hint=" (how many exercises to list; 0 lists none)")
    records = [cohort.learners[n] for n in sorted(cohort.learners)]
    steps: dict[str, dict] = {}
    every: list[dict] = []
    for step in STEPS:
        entries = [r["steps"].get(str(step), {}) for r in records]
        rows = []
        for name in _exercise_order(records, step):
            results = [e.get("exercises", {}).get(name) for e in entries]
            tries = [x["attempts"] for x in results if x is not None and x["attempts"] > 0]
            rows.append({"name": name, "passed": sum(x is not None and x["status"] == PASSED for x in results),
                         "attempted": len(tries), "mean_attempts": statistics.mean(tries) if tries else None})
            every.append({"step": step, **rows[-1]})
        groups: dict[tuple, list[float]] = {}
        for entry in entries:
            for profile, ri in entry.get("ri", {}).items():
                groups.setdefault((profile, ri["metric"], ri["higher_is_better"]), []).append(float(ri["best"]))
        ri_rows = [{"profile": p, "metric": m, "higher_is_better": h, "count": len(v), "min": min(v),
                    "median": statistics.median(v), "max": max(v), "scores": sorted(v)}
                   for (p, m, h), v in sorted(groups.items())]
        steps[str(step)] = {"exercises": rows, "ri": ri_rows}
    every = sorted((e for e in every if e["attempted"]),
                   key=lambda e: (e["passed"], -e["mean_attempts"], e["step"], e["name"]))
    return {"learners": sorted(cohort.learners), "files": cohort.files, "steps": steps,
            "slowest": [{k: e[k] for k in ("step", "name", "passed", "mean_attempts")} for e in every[:slowest]],
            "skipped": [{"file": f, "reason": r} for f, r in cohort.skipped]}


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:.4g}"


def format_cohort(summary: dict, folder: Path | None = None) -> str:
    """The cohort table ``course cohort report`` prints.

    Raises:
        TypeError: ``summary`` is not what :func:`summarize` returns.
    """
    n = len(_summary(summary)["learners"])
    where = f" in {folder}" if folder is not None else ""
    lines = [f"Cohort: {n} learner{'s' if n != 1 else ''} ({', '.join(summary['learners'])}), from "
             f"{summary['files']} .json file{'s' if summary['files'] != 1 else ''}{where}; "
             f"{len(summary['skipped'])} skipped"]
    untouched = []
    for step, data in summary["steps"].items():
        if not data["exercises"] and not data["ri"]:
            continue
        if not data["ri"] and not any(e["passed"] or e["attempted"] for e in data["exercises"]):
            untouched.append(step)
            continue
        lines += ["", f"Step {step}"]
        width = max((len(e["name"]) for e in data["exercises"]), default=8)
        for e in data["exercises"]:
            tries = "-" if e["mean_attempts"] is None else f"{e['mean_attempts']:.1f}"
            lines.append(f"  {e['name']:<{width}}  passed {e['passed']:>3}/{n:<3}  attempts (mean of "
                         f"{e['attempted']}) {tries}")
        for r in data["ri"]:
            better = "higher" if r["higher_is_better"] else "lower"
            lines.append(f"  Ri {r['metric']} ({r['profile']}, {better} is better): n={r['count']}  "
                         f"min {_num(r['min'])}  median {_num(r['median'])}  max {_num(r['max'])}")
    if untouched:
        lines += ["", f"Nobody has started step{'s' if len(untouched) > 1 else ''} {', '.join(untouched)}."]
    if summary["slowest"]:
        lines += ["", "Slowest exercises (of those tried: fewest passes, then most attempts):"]
        lines += [f"  step {e['step']} {e['name']}: {e['passed']}/{n} passed, {e['mean_attempts']:.1f} attempts "
                  "on average" for e in summary["slowest"]]
    if summary["skipped"]:
        lines += ["", "Skipped files:"]
        lines += [f"  {s['file']}: {s['reason']}" for s in summary["skipped"]]
    return "\n".join(lines)


def plot_cohort(summary: dict, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a PNG: the share of learners who passed each exercise (bars, by step), and each step's Ri
    score distribution per profile (points and the median), one panel per step.

    Raises:
        TypeError: ``summary`` is not what :func:`summarize` returns.
        FileExistsError: ``path`` exists and ``overwrite`` is ``False``.
        OSError: as :func:`course_lib.files.atomic_write` (the old file is kept).
    """
    summary = _summary(summary)
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no window, and a notebook's backend is left alone

    n = max(1, len(summary["learners"]))
    fig = Figure(figsize=(14, 11), layout="constrained")
    grid = fig.add_gridspec(4, 3, height_ratios=[1.4, 1, 1, 1])
    bars = fig.add_subplot(grid[0, :])
    labels, shares, colors = [], [], []
    for step, data in summary["steps"].items():
        for e in data["exercises"]:
            labels.append(f"{step}.{e['name']}")
            shares.append(e["passed"] / n)
            colors.append(colormaps["tab10"]((int(step) - 1) % 10))
    bars.bar(range(len(labels)), shares, color=colors)
    bars.set_xticks(range(len(labels)), labels, rotation=75, ha="right", fontsize=7)
    bars.set_ylim(0, 1)
    bars.set_ylabel("share of learners passed")
    bars.set_title(f"Exercises passed ({len(summary['learners'])} learners), colour by step")
    for i, step in enumerate(STEPS):
        ax = fig.add_subplot(grid[1 + i // 3, i % 3])
        ri = summary["steps"][str(step)]["ri"]
        ax.set_title(f"step {step} Ri" + (f": {ri[0]['metric']}" if ri else ""), fontsize=9)
        if not ri:
            ax.text(0.5, 0.5, "no scores yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for j, r in enumerate(ri):
            ax.scatter([j] * len(r["scores"]), r["scores"], alpha=0.6, s=18)
            ax.hlines(r["median"], j - 0.3, j + 0.3, color="k")
        ax.set_xticks(range(len(ri)), [f"{r['profile']} ({'↑' if r['higher_is_better'] else '↓'})" for r in ri],
                      fontsize=8)
        ax.set_xlim(-0.7, len(ri) - 0.3)
    fig.suptitle("Cohort report")
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=90), overwrite=overwrite)
