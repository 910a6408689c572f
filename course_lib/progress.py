"""The learner's progress record behind ``course progress`` (cross-cutting: imports nothing from the steps).

``course check N`` (and the notebooks' Ha cell, :func:`course_lib.checker.check`) records each
exercise's result with :func:`record_check`; every notebook's Ri cell records its score with
:func:`record_ri`. Both write one JSON file atomically (:func:`course_lib.files.atomic_write`):
``$COURSE_PROGRESS_FILE``, else ``<course_lib.data.default_cache_dir()>/progress.json``
(``data/progress.json`` in a checkout). The test suite points ``$COURSE_PROGRESS_FILE`` at a
temporary file (``conftest.py``), so tests and notebook runs never touch a learner's record.

The file, format version 1 (``course cohort report`` reads it; times are ISO-8601 UTC)::

    {"format": "course-progress", "version": 1, "learner": "ada", "updated": "2025-01-31T09:00:00+00:00",
     "steps": {"2": {"exercises": {"merge_pair": {"status": "passed",      # | failed | not started | not run
                                                  "attempts": 2,           # checks that found it written
                                                  "first_passed": "...",   # or null
                                                  "last_checked": "..."}},
                     "ri": {"tiny": {"metric": "held-out bytes/token", "higher_is_better": true,
                                     "best": 3.51, "runs": 4, "last": 3.4, "best_at": "...",
                                     "profile": "tiny"}}}}}

Every change is a read-change-write under a lock (:func:`course_lib.files.locked`, the hidden
file ``.progress.json.lock`` beside it), so two processes recording at once both count.

``"ri"`` holds one entry **per profile** (keyed by its name), since a score compares only with
scores of the same profile. ``"attempts"`` counts the checks in which the exercise was passed or
failed (a stub that still raises ``NotImplementedError`` is no attempt). A ``"not run"`` result
(the check was stopped) keeps the status recorded before it. ``course progress --json`` prints the
file plus ``"exercise_names"``: ``{"<N>": [names in the order of exercises/stepNN.py]}``.

A file that cannot be read as this format is never overwritten: it is moved aside to
``progress.json.damaged-<UTC time>`` with a warning, and a new record starts. A file of a newer
version is left alone (:class:`ProgressFileError`), and :func:`save_progress` never replaces a file
that is not a version-1 record (a newer one, or the learner's notes given as the path by mistake).
"""

from __future__ import annotations

import ast
import getpass
import json
import math
import numbers
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .checker import FAILED, NOT_RUN, NOT_STARTED, PASSED, CheckReport, exercise_file
from .checks import boolean, describe, finite_number, integer
from .files import atomic_write, locked, move_aside
from .paths import find_course_root

__all__ = ["FORMAT", "VERSION", "ProgressFileError", "progress_path", "default_learner", "new_progress",
           "load_progress", "save_progress", "record_check", "record_ri", "set_learner", "exercise_names",
           "progress_table", "next_action", "format_progress", "progress_json", "validate_progress",
           "parse_progress_text"]

FORMAT, VERSION = "course-progress", 1
STEPS = range(1, 10)
STATUSES = (PASSED, FAILED, NOT_STARTED, NOT_RUN)
#: The profiles a Ri score can be recorded for (``course_lib.config.PROFILES``, written out: no torch here).
PROFILE_NAMES = ("tiny", "cpu", "gpu")
#: Counts above this (attempts, runs) are damage, not a record: no one checks an exercise 10**12 times.
MAX_COUNT = 10**12


class ProgressFileError(ValueError):
    """The progress file cannot be used (a folder, unreadable, written by a newer course, or, for
    :func:`save_progress`, no progress record at all); it is left as it is."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def progress_path() -> Path:
    """``$COURSE_PROGRESS_FILE``, else ``progress.json`` in :func:`course_lib.data.default_cache_dir`."""
    env = os.environ.get("COURSE_PROGRESS_FILE", "").strip()
    if env:
        return Path(env).expanduser()
    from .data import default_cache_dir

    return default_cache_dir() / "progress.json"


def default_learner() -> str:
    """``$COURSE_LEARNER``, else the operating system's user name, else ``"learner"``."""
    name = os.environ.get("COURSE_LEARNER", "")
    if not name.strip():
        try:
            name = getpass.getuser()
        except Exception:  # no user name in this environment (a container without one)
            name = ""
    name = (name.strip().splitlines() or [""])[0].strip()[:100]
    return name or "learner"


def _learner_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"learner must be a name (a str of 1 to 100 characters on one line), got {describe(name)}")
    if not name.strip() or len(name.strip()) > 100 or "\n" in name:
        raise ValueError(f"learner must be a name of 1 to 100 characters on one line, got {describe(name)}")
    return name.strip()


def new_progress(learner: str | None = None) -> dict:
    """An empty record (version 1) for ``learner`` (``None``, the default: :func:`default_learner`).

    Raises:
        TypeError: ``learner`` is neither a str nor ``None``.
        ValueError: ``learner`` is empty, longer than 100 characters or spans lines.
    """
    learner = default_learner() if learner is None else learner
    return {"format": FORMAT, "version": VERSION, "learner": _learner_name(learner),
            "updated": _now(), "steps": {}}


# --------------------------------------------------------------------------- #
# Validation (also used by the cohort report)
# --------------------------------------------------------------------------- #
def _is_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_number(value: Any) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400 in the file)
        return False


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _names_problem(names: Any) -> str | None:
    """Why ``names`` is not ``{"<step>": [exercise names]}``, or ``None``."""
    if not isinstance(names, dict):
        return f"exercise_names is not an object (a {type(names).__name__})"
    for key, row in names.items():
        if key not in {str(n) for n in STEPS}:
            return f"exercise_names has an unknown step {key!r}"
        if not isinstance(row, list) or not all(isinstance(name, str) for name in row):
            return f"exercise_names of step {key} is not a list of names: {row!r}"[:200]
    return None


def _exercise_problem(step: str, name: Any, entry: Any) -> str | None:
    where = f"step {step} exercise {name!r}"
    if not isinstance(entry, dict):
        return f"{where} is not an object"
    if entry.get("status") not in STATUSES:
        return f"{where} has status {entry.get('status')!r}"
    if not _is_count(entry.get("attempts")):
        return f"{where} has attempts {entry.get('attempts')!r}"
    if entry.get("first_passed") is not None and not _is_time(entry["first_passed"]):
        return f"{where} has first_passed {entry['first_passed']!r}"
    if not _is_time(entry.get("last_checked")):
        return f"{where} has last_checked {entry.get('last_checked')!r}"
    return None


def _ri_problem(step: str, profile: Any, entry: Any) -> str | None:
    where = f"step {step} Ri score ({profile})"
    if not isinstance(entry, dict):
        return f"{where} is not an object"
    if not isinstance(entry.get("metric"), str) or not isinstance(entry.get("higher_is_better"), bool):
        return f"{where} lacks metric or higher_is_better"
    if not (_is_number(entry.get("best")) and _is_number(entry.get("last"))):
        return f"{where} has a best or last that is not a finite number"
    if not _is_count(entry.get("runs")) or not _is_time(entry.get("best_at")):
        return f"{where} has bad runs or best_at"
    if entry.get("profile") != profile:
        return f"{where} names profile {entry.get('profile')!r}"
    return None


def validate_progress(data: Any) -> str | None:
    """Why ``data`` (parsed JSON) is not a version-1 progress record, or ``None`` when it is."""
    if not isinstance(data, dict):
        return f"not a JSON object (a {type(data).__name__})"
    if data.get("format") != FORMAT:
        return f"not a course progress file (format {data.get('format')!r}, expected {FORMAT!r})"
    if data.get("version") != VERSION:
        return f"progress format version {data.get('version')!r}; this course reads version {VERSION}"
    learner = data.get("learner")
    if not isinstance(learner, str) or not learner.strip():
        return "no learner name"
    if not _is_time(data.get("updated")):
        return f"updated is not an ISO-8601 time: {data.get('updated')!r}"
    steps = data.get("steps")
    if not isinstance(steps, dict):
        return "steps is not an object"
    for key, step in steps.items():
        if key not in {str(n) for n in STEPS}:
            return f"unknown step {key!r}"
        if not isinstance(step, dict) or not isinstance(step.get("exercises", {}), dict) \
                or not isinstance(step.get("ri", {}), dict):
            return f"step {key} is not an object with exercises and ri objects"
        for name, entry in step.get("exercises", {}).items():
            if (why := _exercise_problem(key, name, entry)) is not None:
                return why
        for profile, entry in step.get("ri", {}).items():
            if (why := _ri_problem(key, profile, entry)) is not None:
                return why
    if "exercise_names" in data:  # `course progress --json` adds it
        return _names_problem(data["exercise_names"])
    return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_progress_text(text: str) -> dict:
    """``text`` parsed as a version-1 record.

    Raises:
        ValueError: not JSON (``NaN`` and ``Infinity`` included) or not a valid record; the message says why.
    """
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    why = validate_progress(data)
    if why is not None:
        raise ValueError(why)
    return data


# --------------------------------------------------------------------------- #
# Reading and writing
# --------------------------------------------------------------------------- #
def _move_aside(path: Path, why: str) -> Path:
    try:
        aside = move_aside(path)
    except OSError as err:
        raise ProgressFileError(f"the progress file {path} is damaged ({why}) and could not be moved aside "
                                f"({err.strerror or err}); move or delete it yourself") from None
    print(f"warning: the progress file {path} was damaged ({why}); it was moved to {aside.name} and a new "
          "record starts", file=sys.stderr)
    return aside


def load_progress(path: str | os.PathLike | None = None) -> dict:
    """The record in ``path`` (default :func:`progress_path`); a new one if there is none.

    A damaged file (not JSON, not a version-1 record) is moved aside to
    ``<name>.damaged-<UTC time>`` with a warning on stderr, and a new record is returned.

    Raises:
        ProgressFileError: ``path`` is a folder, cannot be read, or was written by a newer course
            (version > 1); nothing is moved.
    """
    path = progress_path() if path is None else Path(path).expanduser()
    if path.is_dir():
        raise ProgressFileError(f"the progress file {path} is a folder; remove it or set COURSE_PROGRESS_FILE "
                                "to a file path")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return new_progress()
    except OSError as err:
        raise ProgressFileError(f"cannot read the progress file {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _move_aside(path, "not UTF-8 text")
        return new_progress()
    try:
        return parse_progress_text(text)
    except ValueError as err:
        try:
            version = json.loads(text).get("version")
        except (ValueError, AttributeError):
            version = None
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            raise ProgressFileError(f"the progress file {path} has format version {version}, written by a newer "
                                    "course; update the course (git pull) to record progress") from None
        _move_aside(path, str(err))
        return new_progress()


def _check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless it is missing, empty, or a version-1 record (a newer course's
    record, or a file that is no record at all, is the learner's and is kept)."""
    if not path.exists() or path.is_dir():  # nothing to lose; atomic_write names a folder in the way
        return
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ProgressFileError(f"cannot read {path} ({err.strerror or err}) to make sure it is a progress record; "
                                "it was kept, not replaced: save the progress to another path") from None
    if not raw.strip():
        return
    try:
        parse_progress_text(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError included
        why = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else str(err)
        raise ProgressFileError(f"{path} is not a course progress record of version {VERSION} ({why}); the file "
                                "is kept, not replaced: save the progress to another path, or move that file "
                                "away first") from None


def save_progress(progress: dict, path: str | os.PathLike | None = None) -> Path:
    """Set ``progress["updated"]`` to now and write it to ``path`` (default :func:`progress_path`) atomically.

    Only a missing or empty file, or a version-1 progress record, is replaced.

    Raises:
        TypeError: ``progress`` is not a dict.
        ValueError: ``progress`` is not a valid version-1 record (nothing is written, ``progress`` is unchanged).
        ProgressFileError: ``path`` holds something else than a version-1 record (a newer course's record, a
            file of another kind, an unreadable file); it is kept as it was.
        OSError, IsADirectoryError, PermissionError: as :func:`course_lib.files.atomic_write`; the old file is kept.
    """
    if not isinstance(progress, dict):
        raise TypeError(f"progress must be a progress record (the dict load_progress or new_progress returns), "
                        f"got {describe(progress)}")
    path = progress_path() if path is None else Path(path).expanduser()
    now = _now()
    why = validate_progress({**progress, "updated": now})
    if why is not None:
        raise ValueError(f"progress is not a valid record: {why}")
    _check_replaceable(path)
    progress["updated"] = now
    data = (json.dumps(progress, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data), overwrite=True)


def _update(change, path) -> dict | None:
    """Load, ``change(progress)``, save, holding the file's lock (:func:`course_lib.files.locked`: a notebook
    and ``course check`` recording at the same moment both count); a file problem is a warning on stderr
    (returns ``None``), never an error, so a notebook cell or ``course check`` carries on."""
    path = progress_path() if path is None else Path(path).expanduser()
    try:
        with locked(path):
            progress = load_progress(path)
            change(progress)
            save_progress(progress, path)
        return progress
    except (ProgressFileError, OSError) as err:
        print(f"warning: progress not recorded: {err}", file=sys.stderr)
        return None


def _step_entry(progress: dict, step: int) -> dict:
    entry = progress["steps"].setdefault(str(step), {})
    entry.setdefault("exercises", {})
    entry.setdefault("ri", {})
    return entry


def _step(step: Any) -> int:
    step = integer("step", step, minimum=1)
    if step > 9:
        raise ValueError(f"step must be between 1 and 9, got {step}")
    return step


def record_check(report, path: str | os.PathLike | None = None) -> dict | None:
    """Record a :class:`course_lib.checker.CheckReport`'s results (what ``course check N`` does).

    Each exercise's status becomes the report's (a ``not run`` result keeps the status recorded
    before it); ``attempts`` grows by one when it was passed or failed; ``first_passed`` is set
    at the first pass and kept after later failures. A report that could not run (``report.error``)
    records nothing.

    Returns:
        The record as written, or ``None`` when nothing was written (a warning says why on stderr).

    Raises:
        TypeError: ``report`` is not a ``CheckReport``.
    """
    if not isinstance(report, CheckReport):
        raise TypeError(f"report must be the CheckReport that check() returns, got {describe(report)}")
    step = _step(report.step)
    if report.error or not report.exercises:
        return None
    now = _now()

    def change(progress):
        exercises = _step_entry(progress, step)["exercises"]
        for res in report.exercises:
            old = exercises.get(res.name)
            entry = old or {"status": res.status, "attempts": 0, "first_passed": None, "last_checked": now}
            if res.status != NOT_RUN or old is None:
                entry["status"] = res.status
            if res.status in (PASSED, FAILED):
                entry["attempts"] += 1
            if res.status == PASSED and entry["first_passed"] is None:
                entry["first_passed"] = now
            entry["last_checked"] = now
            exercises[res.name] = entry

    return _update(change, path)


def _score(value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        try:  # a 0-d tensor or array
            value = value.item()
        except (AttributeError, ValueError, RuntimeError):
            raise TypeError(f"score must be a number, got {describe(value)}") from None
    try:
        return finite_number("score", value, strict=True)
    except ValueError as err:
        raise ValueError(f"{err}: a run that diverged has no score to record") from None


def _fmt(x: float) -> str:
    """``12,345`` for a whole number, else 4 significant digits."""
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:.4g}"


def record_ri(step: int, score: float, *, metric: str, higher_is_better: bool, profile: str | None = None,
              path: str | os.PathLike | None = None) -> bool:
    """Record a Ri challenge score for ``step`` and print one line saying whether it is a new best.

    The best is kept per profile. A score under another ``metric`` (or direction) than the one
    recorded for that profile starts that profile's record anew, and the line says so.

    Args:
        step: 1-9.
        score: a finite number (a Python or NumPy number, or a one-element tensor).
        metric: what the score measures, e.g. ``"held-out loss"``.
        higher_is_better: the direction of ``score``.
        profile: the profile the score was made in: ``"tiny"``, ``"cpu"`` or ``"gpu"`` (any case).
            Default ``$COURSE_PROFILE``, else ``"cpu"``.
        path: the progress file. Default :func:`progress_path`.

    Returns:
        ``True`` when ``score`` is the profile's first or best score so far.

    Raises:
        ValueError: ``step`` is not 1-9, ``score`` is ``nan``/``inf``, ``metric`` is empty, ``profile`` (or
            ``$COURSE_PROFILE``) is not tiny, cpu or gpu.
        TypeError: ``score`` is not a number, ``higher_is_better`` not a ``bool``, ``profile`` not a str.
    """
    step, score = _step(step), _score(score)
    if not isinstance(metric, str) or not metric.strip():
        raise ValueError(f"metric must name what the score measures (e.g. 'held-out loss'), got {describe(metric)}")
    higher_is_better = boolean("higher_is_better", higher_is_better)
    source = "profile"
    if profile is None:
        profile, source = os.environ.get("COURSE_PROFILE", "").strip() or "cpu", "COURSE_PROFILE"
    if not isinstance(profile, str):
        raise TypeError(f"profile must be the profile's name (tiny, cpu, gpu) or None, got {describe(profile)}")
    if profile.strip().lower() not in PROFILE_NAMES:
        raise ValueError(f"{source} must be the profile's name ({', '.join(PROFILE_NAMES)}), got {describe(profile)}; "
                         "pass profile=S.profile.name as the notebooks do")
    profile, metric, now = profile.strip().lower(), metric.strip(), _now()
    said: list[str] = []

    def change(progress):
        ri = _step_entry(progress, step)["ri"]
        old = ri.get(profile)
        if old is not None and (old["metric"], old["higher_is_better"]) != (metric, higher_is_better):
            said.append(f"; it replaces the record of another metric ({old['metric']}, best {_fmt(old['best'])})")
            old = None
        if old is None:
            ri[profile] = {"metric": metric, "higher_is_better": higher_is_better, "best": score, "runs": 1,
                           "last": score, "best_at": now, "profile": profile}
            said.insert(0, "first score recorded")
            return
        better = score > old["best"] if higher_is_better else score < old["best"]
        said.insert(0, f"a new best (was {_fmt(old['best'])})" if better else
                    f"your best is still {_fmt(old['best'])}")
        old.update(runs=old["runs"] + 1, last=score)
        if better:
            old.update(best=score, best_at=now)

    written = _update(change, path)
    direction = "higher" if higher_is_better else "lower"
    saved = "" if written is not None else " (not saved: see the warning)"
    if not said:  # the file could not be read: nothing to compare with
        said, saved = ["not recorded (see the warning)"], ""
    print(f"Ri step {step} ({profile} profile): {_fmt(score)} {metric} ({direction} is better) — "
          f"{''.join(said)}{saved}")
    return said[0] == "first score recorded" or said[0].startswith("a new best")


def set_learner(name: str, path: str | os.PathLike | None = None) -> dict:
    """Set the learner's name in the record (``course progress --learner NAME``) and return the record.

    Raises:
        ValueError: ``name`` is empty, longer than 100 characters or spans lines.
        ProgressFileError, OSError: the file cannot be read or written.
    """
    name = _learner_name(name)
    path = progress_path() if path is None else Path(path).expanduser()
    with locked(path):
        progress = load_progress(path)
        progress["learner"] = name
        save_progress(progress, path)
    return progress


# --------------------------------------------------------------------------- #
# The table
# --------------------------------------------------------------------------- #
def _public_names(path: Path) -> list[str] | None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith("_")]


def exercise_names(step: int, root: str | os.PathLike | None = None) -> list[str]:
    """Step ``step``'s exercises: the public functions and classes of ``exercises/stepNN.py``, in order.

    Read with ``ast`` (the learner's file is never imported). When ``solutions/stepNN.py`` can be
    read too, only names it also defines count (a helper the learner added is no exercise); if the
    learner's file does not parse, the solution's names are used. ``[]`` when neither can be read
    (no course folder).
    """
    step = _step(step)
    root = find_course_root() if root is None else Path(root)
    if root is None:
        return []
    mine = _public_names(exercise_file(step, root=root))
    reference = _public_names(exercise_file(step, solutions=True, root=root))
    if mine is None:
        return reference or []
    return [n for n in mine if reference is None or n in reference]


def _record(progress: Any) -> dict:
    """``progress`` if it is a valid version-1 record, else a clear error."""
    if not isinstance(progress, dict):
        raise TypeError(f"progress must be a progress record (the dict load_progress returns), got "
                        f"{describe(progress)}")
    why = validate_progress(progress)
    if why is not None:
        raise ValueError(f"progress is not a valid record: {why}; read it with load_progress()")
    return progress


def _names(names: Any) -> dict[int, list[str]] | None:
    """``names`` checked: ``None`` or a mapping of a step (1-9) to its exercise names."""
    if names is None:
        return None
    if not isinstance(names, Mapping):
        raise TypeError(f"names must map a step (1-9) to its exercise names, e.g. {{1: ['bigram_counts']}}, or be "
                        f"None; got {describe(names)}")
    checked = {}
    for step, row in names.items():
        if not isinstance(step, numbers.Integral) or isinstance(step, bool):
            raise TypeError(f"names must map step numbers (int, 1-9) to exercise names, got the key {describe(step)}")
        step = _step(step)
        if isinstance(row, str) or not isinstance(row, (list, tuple)) or not all(isinstance(n, str) for n in row):
            raise TypeError(f"names[{step}] must be a list of exercise names (str), got {describe(row)}")
        checked[step] = list(row)
    return checked


def _rows(rows: Any) -> list[dict]:
    keys = {"step", "passed", "failed", "not_started", "todo", "ri", "complete"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and keys <= r.keys() for r in rows):
        raise TypeError(f"rows must be the list progress_table() returns, got {describe(rows)}")
    return rows


def progress_table(progress: dict, names: dict[int, list[str]] | None = None) -> list[dict]:
    """One row per step 1-9: ``{"step", "passed", "failed", "not_started", "todo", "ri", "complete"}``.

    ``passed`` / ``failed`` / ``not_started`` are lists of exercise names (never checked, ``not
    started`` and ``not run`` all count as not started; ``todo``: those not passed, in the file's
    order); ``names`` maps a step to its exercises
    (default :func:`exercise_names`; a step with no known names uses the recorded ones). ``ri`` is
    the list of best scores, one per profile: ``{"profile", "best", "metric", "higher_is_better",
    "runs"}``. A step is complete when every exercise passed and a Ri score is recorded.

    Raises:
        TypeError: ``progress`` is not a dict; ``names`` is not a mapping of a step to a list of names.
        ValueError: ``progress`` is not a valid version-1 record; a step of ``names`` is not 1-9.
    """
    progress, names = _record(progress), _names(names)
    rows = []
    for step in STEPS:
        entry = progress.get("steps", {}).get(str(step), {})
        recorded = entry.get("exercises", {})
        step_names = list(names[step]) if names is not None and step in names else exercise_names(step)
        if not step_names:
            step_names = list(recorded)
        row = {"step": step, "passed": [], "failed": [], "not_started": []}
        for name in step_names:
            status = recorded.get(name, {}).get("status", NOT_STARTED)
            row[{PASSED: "passed", FAILED: "failed"}.get(status, "not_started")].append(name)
        row["todo"] = [n for n in step_names if n not in row["passed"]]
        row["ri"] = [{"profile": p, "best": r["best"], "metric": r["metric"], "higher_is_better":
                      r["higher_is_better"], "runs": r["runs"]} for p, r in sorted(entry.get("ri", {}).items())]
        row["complete"] = not row["failed"] and not row["not_started"] and bool(row["ri"])
        rows.append(row)
    return rows


def next_action(rows: list[dict]) -> str:
    """What to do next: the first step not complete's first exercise not passed, else its Ri challenge.

    Raises:
        TypeError: ``rows`` is not what :func:`progress_table` returns.
    """
    for row in _rows(rows):
        if row["complete"]:
            continue
        step = row["step"]
        if row["todo"]:
            first = row["todo"][0]
            return (f"step {step}: make {first} pass (exercises/step{step:02d}.py, then `course check {step}`; "
                    f"stuck? `course hint {step} {first}`)")
        return f"step {step}: run the Ri challenge at the end of notebook {step:02d} to record a score"
    return "all done: every exercise passed and every Ri challenge scored"


def format_progress(progress: dict, rows: list[dict], path: str | os.PathLike | None = None) -> str:
    """The text ``course progress`` prints: a line per step and the next thing to do.

    Raises:
        TypeError: ``progress`` is not a dict, ``rows`` not what :func:`progress_table` returns, ``path``
            neither a path nor ``None``.
        ValueError: ``progress`` is not a valid version-1 record.
    """
    progress, rows = _record(progress), _rows(rows)
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be the progress file's path (a str or Path) or None, got {describe(path)}")
        path = Path(path).expanduser()
    if path is not None and not path.exists():
        head = f"Progress of {progress['learner']}: nothing recorded yet in {path}"
    else:
        where = f" ({path})" if path else ""
        head = f"Progress of {progress['learner']}{where}, updated {progress['updated']}"
    lines = [head, "",
             f"{'step':<5} {'passed':>7} {'failed':>7} {'not started':>12}   best Ri score (profile)"]
    for row in rows:
        total = len(row["passed"]) + len(row["failed"]) + len(row["not_started"])
        ri = "; ".join(f"{_fmt(r['best'])} {r['metric']} ({r['profile']})" for r in row["ri"]) or "-"
        mark = "✔" if row["complete"] else " "
        lines.append(f"{mark} {row['step']:<3} {len(row['passed']):>3}/{total:<3} {len(row['failed']):>7} "
                     f"{len(row['not_started']):>12}   {ri}")
    lines += ["", "next: " + next_action(rows)]
    return "\n".join(lines)


def progress_json(progress: dict, names: dict[int, list[str]] | None = None) -> dict:
    """What ``course progress --json`` prints: the record plus ``"exercise_names"`` per step (``{"1": [...]}``).

    Raises:
        TypeError, ValueError: as :func:`progress_table`.
    """
    progress, names = _record(progress), _names(names)
    names = {step: exercise_names(step) for step in STEPS} if names is None else names
    return {**progress, "exercise_names": {str(step): list(names.get(step, [])) for step in STEPS}}
