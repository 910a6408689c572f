"""The ``course`` command: one entry point for learners and instructors.

    course doctor                      is this machine ready? (one OK/FAIL line per check)
    course data list [--verify]        which registered files are present
    course data fetch NAME... | --all [--mirror DIR]
                                       download or stage data (a classroom: --all, once)
    course check N [--solutions | --file F] [--timeout S]
                                       check step N's exercises
    course run N [--profile P] [--out DIR]
                                       execute notebook N headless, print time per section
    course lab [JUPYTER OPTIONS]       open the course in JupyterLab

Step code is imported inside the command that needs it, so ``course --help`` is instant.
Bad input is one ``error: ...`` line on stderr and exit status 2. Output into a closed pipe
(``course data list -l | head``) ends quietly, as for any Unix tool.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_doctor(args) -> int:
    from .doctor import main as doctor_main

    return doctor_main(include_data=not args.no_data)


def _cmd_data_list(args) -> int:
    from . import data

    mirror = Path(args.mirror) if args.mirror else data.default_mirror()
    cache = Path(args.cache) if args.cache else data.default_cache_dir()
    print(f"cache : {cache}\nmirror: {mirror or '(none; set COURSE_DATA_MIRROR)'}\n")
    rows = []
    for e in data.entries():
        big = e.size is None or e.size > 100 * 2**20
        state = data.status(e, cache_dir=cache, mirror=mirror if mirror and mirror.is_dir() else None,
                            verify=args.verify and not big)
        rows.append((e, state + (" (optional)" if e.optional and state == "missing" else ""), _size(e.size)))
    w = max(len(r[0].name) for r in rows)
    for e, state, size in rows:
        print(f"{e.name:<{w}}  {state:<20} {size:>9}  {e.description}")
        if args.long:
            print(f"{'':<{w}}  license: {e.license}\n{'':<{w}}  source : {e.urls[0]}")
    present = sum(r[1] == "cached" for r in rows)
    print(f"\n{present} of {len(rows)} files in the cache." + ("" if args.long else " (-l shows licenses and sources)"))
    return 0


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _cmd_data_fetch(args) -> int:
    from . import data

    if not args.all and not args.names:
        print("name the files to fetch, or use --all (see `course data list`)", file=sys.stderr)
        return 2
    try:
        targets = data.entries(include_optional=False) if args.all else data.entries(args.names)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.all and args.names:
        targets += [e for e in data.entries(args.names) if e not in targets]
    failed = []
    cache = Path(args.cache).expanduser() if args.cache else data.default_cache_dir()
    for e in targets:
        try:
            path = data.fetch(e, cache_dir=args.cache, mirror=args.mirror, progress=not args.quiet)
            where = "" if path == cache / e.path else f"  (the mirror's copy, used in place: {cache} cannot be written)"
            print(f"OK    {e.name:<22} {path}{where}")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except data.DataFetchError as err:
            failed.append(e.name)
            if args.verbose:
                print(f"FAIL  {e.name:<22}\n      " + str(err).replace("\n", "\n      "))
            else:
                print(f"FAIL  {e.name:<22} {err.summary}")
    print(f"\n{len(targets) - len(failed)} of {len(targets)} files staged and verified.")
    if failed and not args.verbose:
        print(f"not staged: {', '.join(failed)} (`course data fetch {failed[0]} -v` says how to stage it by hand)")
    return 1 if failed else 0


def _cmd_check(args) -> int:
    from .checker import check

    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        print(f"error: --timeout must be a finite number of seconds above 0, got {args.timeout:g}", file=sys.stderr)
        return 2
    try:
        report = check(args.step, solutions=args.solutions, file=args.file,
                       test_timeout=args.timeout if args.timeout is not None else 30)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if report.all_passed else 1


def _cmd_run(args) -> int:
    from .config import get_profile
    from .notebook_runner import find_notebook, run_notebook

    def section_done(name: str, seconds: float) -> None:
        print(f"  {name} ... {seconds:.1f} s", flush=True)

    try:
        profile = get_profile(args.profile).name if args.profile else get_profile().name
        notebook = find_notebook(args.step)
        print(f"executing {notebook.name} with the {profile} profile (each section's time as it finishes)...",
              flush=True)
        result = run_notebook(args.step, profile, out_dir=args.out, device=args.device, on_section=section_done)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.format())
    return 1 if result.error else 0


def _cmd_lab(args, extra: list[str]) -> int:
    from .paths import course_root

    try:
        root = course_root()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    passthrough = [a for a in extra if a != "--"]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in passthrough:
        # JupyterLab refuses root unless told; classroom VMs and containers often run as root
        print("running as root (a container or VM?): passing --allow-root to JupyterLab", flush=True)
        passthrough.append("--allow-root")
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={root}",
           "--LabApp.default_url=/lab/tree/notebooks", *passthrough]
    print("starting JupyterLab on the course folder (notebooks/, exercises/, ...):", " ".join(cmd[1:]), flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course", description="The LLM Sovereignty Stack: course tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check Python, packages, device, profile and data")
    p.add_argument("--no-data", action="store_true", help="skip the data files")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("data", help="list or fetch the course's data files")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("list", help="which registered files are present")
    q.add_argument("--verify", action="store_true", help="hash every file (slower)")
    q.add_argument("-l", "--long", action="store_true", help="also show each file's license and source")
    q.add_argument("--mirror", help="a mirror folder (default $COURSE_DATA_MIRROR)")
    q.add_argument("--cache", help="the cache folder (default data/ or $COURSE_DATA_DIR)")
    q.set_defaults(func=_cmd_data_list)
    q = dsub.add_parser("fetch", help="download or stage files (verified by sha256)")
    q.add_argument("names", nargs="*", help="registered names (see `course data list`)")
    q.add_argument("--all", action="store_true", help="every registered file except the optional GPT-2 large/XL weights")
    q.add_argument("--mirror", help="copy from this folder instead of downloading where it has the file")
    q.add_argument("--cache", help="stage into this folder (default data/ or $COURSE_DATA_DIR)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.add_argument("-v", "--verbose", action="store_true", help="print every source tried for a failure")
    q.set_defaults(func=_cmd_data_fetch)

    p = sub.add_parser("check", help="check your exercises for step N")
    p.add_argument("step", type=int, help="step number, 1-9")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--solutions", action="store_true", help="check the reference solutions instead")
    g.add_argument("--file", help="check this file instead of exercises/stepNN.py")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a check that runs longer than this (default 30; the exercise's other checks "
                        "are then skipped)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("run", help="execute step N's notebook headless and save an executed copy")
    p.add_argument("step", type=int, help="step number, 1-9")
    p.add_argument("--profile", help="tiny, cpu or gpu (default $COURSE_PROFILE, else cpu)")
    p.add_argument("--out", help="folder for the executed copy (default runs/<profile>/)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("lab", help="open the course in JupyterLab (other options go to `jupyter lab`, "
                                   "e.g. course lab --no-browser --port 8899)")
    p.set_defaults(func=_cmd_lab)
    return parser


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is _cmd_lab:
        return _cmd_lab(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Run the ``course`` command with ``argv`` (default ``sys.argv[1:]``); return its exit status.

    A reader that closes the pipe early (``course data list -l | head``) ends the command
    quietly with status 1, the way Python's documentation on SIGPIPE recommends.
    """
    try:
        status = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that flush cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
