"""``course doctor``: is this machine ready for the course? One OK/WARN/FAIL line per check.

Cross-cutting; step code (config) is imported inside the checks that need it.
Exit status is non-zero when any line says FAIL. WARN is for something that works now but
may not later: with a data mirror set (an offline classroom), a file that is neither
downloaded nor in the mirror would need the internet on first use.

Data files are hashed (sha256) where they would be read from: the cached copy, else the
mirror's copy; files over 100 MiB (GPT-2's weights) by size only. The course's ~17 MB of
text hashes in well under a second, so nothing is cached between runs.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
from dataclasses import dataclass

__all__ = ["Check", "run_doctor", "main"]

MIN_PYTHON = (3, 10)
_BIG_FILE = 100 * 2**20  # files above this are checked by size only (hashing GBs takes minutes)


@dataclass
class Check:
    ok: bool
    what: str
    detail: str
    warn: bool = False  # ok, but worth knowing (printed as WARN; does not fail the run)

    @property
    def level(self) -> str:
        return "FAIL" if not self.ok else "WARN" if self.warn else "OK"

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.what:<24} {self.detail}"


def _requirements():
    from packaging.requirements import Requirement

    try:
        raw = md.requires("course-lib") or []
    except md.PackageNotFoundError:
        return None
    out = []
    for line in raw:
        req = Requirement(line)
        extra = None
        if req.marker is not None and "extra" in str(req.marker):
            extra = str(req.marker).split("==")[-1].strip().strip("\"'")
        out.append((req, extra))
    return out


def _package_checks() -> list[Check]:
    reqs = _requirements()
    if reqs is None:
        return [Check(False, "course-lib", "not installed: run `pip install -e \".[dev]\"` in the course folder")]
    checks = []
    for req, extra in reqs:
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            if extra:
                checks.append(Check(True, req.name, f"not installed (only for the course's own tests: "
                                                    f"pip install -e \".[{extra}]\")"))
            else:
                checks.append(Check(False, req.name, f"missing; needs {req.specifier}: pip install \"{req}\""))
            continue
        if req.specifier.contains(version, prereleases=True):
            checks.append(Check(True, req.name, f"{version} (needs {req.specifier or 'any'})"))
        else:
            checks.append(Check(False, req.name, f"{version} installed but the course needs {req.specifier}: "
                                                 f"pip install \"{req}\""))
    return checks


def _data_folder_check(mirror_usable: bool) -> Check:
    """Can ``fetch`` write the data folder? A file there, or a read-only folder with no mirror
    to read from, is a FAIL; read-only with a mirror is a WARN (mirror files are read in place)."""
    import os

    from .data import default_cache_dir
    from .paths import writable_problem

    cache = default_cache_dir()
    from_env = bool(os.environ.get("COURSE_DATA_DIR", "").strip())
    problem = writable_problem(cache)
    if problem is None:
        return Check(True, "data folder", f"{cache} (writable)")
    name = f"COURSE_DATA_DIR={cache}" if from_env else f"the data folder {cache}"
    read_only = "is read-only" in problem
    if from_env:
        fix = "point COURSE_DATA_DIR at a folder you can write, or unset it"
    elif read_only:
        fix = f"make it writable (chmod u+w {cache}) or set COURSE_DATA_DIR to a folder you can write"
    else:
        fix = "move that file away, or set COURSE_DATA_DIR to a folder you can write"
    if not read_only or not mirror_usable:
        return Check(False, "data folder", f"{name} {problem}: `course data fetch` cannot save files there; {fix}")
    return Check(True, "data folder", f"{name} {problem}: files are read from the mirror in place, but nothing "
                 f"else can be downloaded or cached; {fix}", warn=True)


def _data_checks() -> list[Check]:
    from . import data

    checks = []
    mirror = data.default_mirror()
    usable = mirror if mirror is not None and mirror.is_dir() else None
    checks.append(_data_folder_check(usable is not None))
    for entry in data.entries():
        big = entry.size is None or entry.size > _BIG_FILE
        how = " (size checked)" if big else " (sha256 verified)"
        try:
            state = data.status(entry, verify=not big, mirror=usable)
        except OSError as err:
            checks.append(Check(False, f"data {entry.name}", f"cannot read: {err}"))
            continue
        if state == "cached":
            checks.append(Check(True, f"data {entry.name}", "present" + how))
        elif state == "corrupt":
            checks.append(Check(False, f"data {entry.name}", f"{data.default_cache_dir() / entry.path} is damaged: "
                                                            f"delete it and run `course data fetch {entry.name}`"))
        elif state == "in-mirror":
            checks.append(Check(True, f"data {entry.name}", f"in the mirror {mirror}{how}, copied on first use"))
        elif state == "mirror-corrupt":
            copy = usable / entry.path
            problem = data.file_problem(copy, entry, verify=not big)
            checks.append(Check(False, f"data {entry.name}", f"the mirror's copy {copy} is damaged ({problem}): "
                                f"replace it with a good copy (on a connected machine: `course data fetch "
                                f"{entry.name} --cache <mirror folder>`), or delete it to download instead"))
        elif mirror is not None and not entry.optional:
            # an offline room relies on its mirror: say now what the first use would have to download
            who = " (GPT-2's weights: only the gpu profile loads them)" if entry.group == "weights" else ""
            checks.append(Check(True, f"data {entry.name}", f"neither downloaded nor in the mirror {mirror}{who}: its "
                                f"first use needs the internet. To stage it, on a connected machine run `course data fetch "
                                f"{entry.name} --cache <mirror folder>` and copy it over", warn=True))
        else:
            extra = "optional; " if entry.optional else ""
            checks.append(Check(True, f"data {entry.name}", f"not downloaded yet ({extra}fetched on first use)"))
    return checks


def run_doctor(include_data: bool = True) -> list[Check]:
    checks: list[Check] = []
    py = sys.version_info
    checks.append(Check(py >= MIN_PYTHON, "python", f"{platform.python_version()} (needs >= "
                                                   f"{'.'.join(map(str, MIN_PYTHON))})"))
    checks += _package_checks()

    try:
        import torch

        from .config import available_devices, get_device

        device = get_device()
        checks.append(Check(True, "torch device", f"{device} (available here: {', '.join(available_devices())})"))
        x = torch.ones(2, 2, device=device)
        checks.append(Check(bool((x @ x).sum().item() == 8), "torch compute", f"a matrix product on {device} works"))
    except (ImportError, ValueError, RuntimeError) as err:
        checks.append(Check(False, "torch device", str(err)))

    try:
        from .config import get_profile

        profile = get_profile()
        checks.append(Check(True, "profile", f"{profile.name}: {profile.description} (set COURSE_PROFILE to change)"))
    except ValueError as err:
        checks.append(Check(False, "profile", str(err)))

    from .paths import find_course_root

    root = find_course_root()
    checks.append(Check(root is not None, "course folder",
                        str(root) if root else "not found: run from your clone of the course or set COURSE_ROOT"))
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        names = KernelSpecManager().find_kernel_specs()
        checks.append(Check("python3" in names, "jupyter kernel",
                            "python3 kernel available" if "python3" in names else
                            "no python3 kernel: pip install ipykernel"))
    except ImportError:
        checks.append(Check(False, "jupyter kernel", "jupyter_client missing: pip install jupyterlab"))

    if include_data:
        from .data import default_mirror

        mirror = default_mirror()
        if mirror is not None:
            checks.append(Check(mirror.is_dir(), "data mirror", str(mirror) if mirror.is_dir()
                                else f"COURSE_DATA_MIRROR={mirror} is not a folder"))
        checks += _data_checks()
    return checks


def main(include_data: bool = True) -> int:
    checks = run_doctor(include_data)
    for c in checks:
        print(c)
    failed = sum(not c.ok for c in checks)
    warned = sum(c.ok and c.warn for c in checks)
    print(f"\n{len(checks) - failed - warned} OK, {warned} WARN, {failed} FAIL")
    return 1 if failed else 0
