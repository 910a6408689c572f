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
    course finetune classify [--profile P] [--trainable head|last-block|all] [--pooling last|mean]
                             [--epochs N] [--out DIR] [--device D] [--force] [-q]
                                       fine-tune the profile's base model into a spam classifier (step 6):
                                       DIR/model.pt and DIR/metrics.json (default DIR runs/classify-<profile>)
    course classify DIR TEXT... | -    label and probability of each text (- reads texts from stdin, one a line)

Step code is imported inside the command that needs it, so ``course --help`` is instant.
Bad input is one ``error: ...`` line on stderr and exit status 2. Output into a closed pipe
(``course data list -l | head``) ends quietly, as for any Unix tool.
"""

from __future__ import annotations

import argparse
import json
import math
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


#: The choices of ``course finetune classify`` (``course_lib.classification.TRAINABLE`` / ``POOLING``,
#: written out so that ``course --help`` imports no step code; a test keeps them equal).
_TRAINABLE = ("head", "last-block", "all")
_POOLING = ("last", "mean")


def _error(message: str, status: int = 2) -> int:
    """One ``error: ...`` line on stderr (a message of several lines is joined into one)."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return status


def _default_classifier_dir(profile: str) -> Path:
    """``runs/classify-<profile>`` in the course folder (ignored by git), else in the working folder."""
    from .paths import find_course_root

    return (find_course_root() or Path.cwd()) / "runs" / f"classify-{profile}"


def _json_safe(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no ``nan``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _percent(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cmd_finetune_classify(args) -> int:
    from .config import get_device, get_profile
    from .paths import writable_problem

    # Everything that can be refused is refused before a run of minutes, not after it.
    try:
        profile = get_profile(args.profile).name
        device = get_device(args.device)
    except ValueError as err:
        return _error(err)
    if args.epochs is not None and args.epochs < 1:
        return _error(f"--epochs must be a positive number of epochs, got {args.epochs}")
    out = Path(args.out).expanduser() if args.out else _default_classifier_dir(profile)
    problem = writable_problem(out)
    if problem is not None:
        return _error(f"the output folder {out} (--out) {problem}: give a folder you can write")
    model_path, metrics_path = out / "model.pt", out / "metrics.json"
    folder = next((p for p in (model_path, metrics_path) if p.is_dir()), None)
    if folder is not None:
        return _error(f"--out {out} holds a folder named {folder.name}, where the file goes; give another --out")
    earlier = [p.name for p in (model_path, metrics_path) if p.exists()]
    if earlier and not args.force:
        return _error(f"--out {out} already holds {' and '.join(earlier)} from an earlier run; pass --force to "
                      "replace them, or give another --out")

    from .checkpoint import NonFiniteError, save_checkpoint
    from .classification import finetune_classifier
    from .data import DataFetchError
    from .files import atomic_write

    print(f"fine-tuning the {profile} profile's base model into a spam classifier on {device} "
          f"(writes {model_path} and {metrics_path.name})", flush=True)
    try:
        result = finetune_classifier(profile, trainable=args.trainable, pooling=args.pooling, num_epochs=args.epochs,
                                     device=device, progress=not args.quiet, verbose=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {out}", file=sys.stderr)
        return 130
    except DataFetchError as err:
        return _error(f"{err.summary} (`course data fetch -v NAME` says how to stage a file by hand); "
                      "nothing was written", 1)
    except NonFiniteError as err:
        return _error(f"{err} Nothing was written to {out}", 1)
    history = result.history
    if history.interrupted:
        print(f"stopped by Ctrl-C after {history.step:,} steps: the classifier is only partly fine-tuned, so "
              f"nothing was written to {out}; run the command again to fine-tune it fully", file=sys.stderr)
        return 130

    # model.pt first (the large file: a full disk shows here, and atomic_write leaves no part of it), then
    # metrics.json; the metrics are also stored inside model.pt, so the model always carries its own.
    metrics = _json_safe(dict(result.metrics))
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    model_was_there = model_path.exists()
    try:
        save_checkpoint(model_path, result.model, step=history.step, overwrite=args.force, include_rng=False,
                        extra={"kind": "classifier", "metrics": metrics, "history": _json_safe(history.to_dict())})
    except FileExistsError as err:  # written by someone else while this run trained
        return _error(f"{err} (it appeared during the run; pass --force to replace it, or give another --out)", 1)
    except (NonFiniteError, OSError) as err:
        return _error(f"{err} (nothing was written to {out})", 1)
    try:
        atomic_write(metrics_path, lambda fh: fh.write(text.encode("utf-8")), overwrite=args.force)
    except OSError as err:
        if not model_was_there:  # leave the folder as it was: no model without its metrics.json
            model_path.unlink(missing_ok=True)
            return _error(f"{err} (nothing was written to {out})", 1)
        return _error(f"{err} ({model_path} was replaced; its metrics are stored inside it as well)", 1)

    m = metrics
    print(f"\nspam classifier from {m['base_model']}")
    rows = [
        ("trainable", f"{m['recipe']['trainable']}: {m['trainable_parameters']:,} of {m['total_parameters']:,} "
                      f"parameters ({100 * m['trainable_parameters'] / m['total_parameters']:.2f}%)"),
        ("pooling", m["recipe"]["pooling"]),
        ("epochs", f"{m['recipe']['num_epochs']} ({history.step:,} steps, {m['seconds']:.1f} s on {m['device']})"),
        ("accuracy", f"train {_percent(m['train_accuracy'])}, validation {_percent(m['val_accuracy'])}, "
                     f"test {_percent(m['test_accuracy'])}"),
        ("test, spam", f"precision {_percent(m['test_precision'])}, recall {_percent(m['test_recall'])}, "
                       f"F1 {_percent(m['test_f1'])}"),
        ("test rows", f"{m['rows']['test']:,} (train {m['rows']['train']:,}, validation {m['rows']['val']:,})"),
        ("model", str(model_path)),
        ("metrics", str(metrics_path)),
    ]
    for name, value in rows:
        print(f"  {name:<11} {value}")
    print(f'\ntry it: course classify {out} "WINNER!! You have won a prize, call now" "see you at lunch?"')
    return 0


def _cmd_finetune_instruct(args) -> int:
    return _error("`course finetune instruct` is not built yet: instruction fine-tuning comes with step 7 "
                  "(notebooks/07_instruction_tuning). Step 6's `course finetune classify` is ready")


def _read_texts(args) -> list[str] | str:
    """The texts to classify, ``-`` replaced by stdin's non-blank lines; or an error message."""
    if not args.texts:
        return "give at least one text to classify, or - to read texts from stdin (one a line)"
    if args.texts.count("-") > 1:
        return "- (read texts from stdin) may be given only once"
    texts = []
    for position, text in enumerate(args.texts, start=1):
        if text == "-":
            try:
                lines = [line.rstrip("\r\n") for line in sys.stdin]
            except UnicodeDecodeError as err:
                return f"stdin is not text in the expected encoding ({err.reason}); give UTF-8 text, one message a line"
            lines = [line for line in lines if line.strip()]
            if not lines:
                return "no texts on stdin: - reads one text a line (blank lines are skipped)"
            texts += lines
        elif not text.strip():
            return f"text {position} is empty; give a message with at least one non-space character"
        else:
            texts.append(text)
    return texts


def _cmd_classify(args) -> int:
    from .config import get_device

    texts = _read_texts(args)
    if isinstance(texts, str):
        return _error(texts)
    target = Path(args.dir).expanduser()
    if not target.exists():
        return _error(f"{target} does not exist; give the --out folder of `course finetune classify` "
                      "(default runs/classify-<profile>)")
    model_path = target if target.is_file() else target / "model.pt"
    if not model_path.is_file():
        return _error(f"no model.pt in {target}; fine-tune one with `course finetune classify --out {target}`")
    try:
        device = get_device(args.device)
    except ValueError as err:
        return _error(err)

    from .checkpoint import model_from_checkpoint
    from .classification import GPTClassifier, classify
    from .data import DataFetchError
    from .tokenizers import tiktoken_gpt2

    try:
        model = model_from_checkpoint(model_path, device=device)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        return _error(err)
    if not isinstance(model, GPTClassifier):
        return _error(f"{model_path} holds a {type(model).__name__}, not a classifier; give the folder of "
                      "`course finetune classify`")
    try:
        tokenizer = tiktoken_gpt2()
        predictions = classify(texts, model, tokenizer)
    except DataFetchError as err:
        return _error(err.summary, 1)
    except (ValueError, TypeError) as err:
        return _error(err)
    context = model.cfg.context_length
    width = max(len(p.label) for p in predictions)
    for i, (text, p) in enumerate(zip(texts, predictions), start=1):
        print(f"{p.label:<{width}}  {p.probability:.4f}  {' '.join(text.split())}")
        if len(tokenizer.encode_ordinary(text)) > context:
            print(f"note: text {i} is longer than the model's context; its first {context} tokens were read",
                  file=sys.stderr)
    return 0


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

    p = sub.add_parser("finetune", help="fine-tune the profile's base model (classify: step 6)")
    fsub = p.add_subparsers(dest="finetune_command", required=True)
    q = fsub.add_parser("classify", help="into a spam classifier: writes DIR/model.pt and DIR/metrics.json",
                        description="Fine-tune the profile's base model on the SMS Spam Collection (deduplicated, "
                                    "balanced split), measure it on every split and write DIR/model.pt (read it "
                                    "with `course classify DIR` or course_lib.checkpoint.model_from_checkpoint) "
                                    "and DIR/metrics.json. Nothing is written if the run fails or is stopped.")
    q.add_argument("--profile", help="tiny, cpu or gpu (default $COURSE_PROFILE, else cpu): the base model and recipe")
    q.add_argument("--trainable", choices=_TRAINABLE,
                   help="what trains: the new head, the last block (+ final norm + head), or all weights "
                        "(default: the profile's recipe)")
    q.add_argument("--pooling", choices=_POOLING,
                   help="read the last real token, or average over real tokens (default: the recipe's, last)")
    q.add_argument("--epochs", type=int, help="epochs over the training split (default: the recipe's)")
    q.add_argument("--out", metavar="DIR", help="folder for model.pt and metrics.json "
                                                "(default runs/classify-<profile>/ in the course folder)")
    q.add_argument("--device", help="cuda, mps or cpu (default $COURSE_DEVICE, else the best available)")
    q.add_argument("--force", action="store_true",
                   help="replace the model.pt and metrics.json of an earlier run in DIR (default: refuse)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar or evaluations; only the summary")
    q.set_defaults(func=_cmd_finetune_classify)
    q = fsub.add_parser("instruct", help="instruction fine-tuning (step 7; not built yet)")
    q.set_defaults(func=_cmd_finetune_instruct)

    p = sub.add_parser("classify", help="label and probability of each text, with a fine-tuned classifier")
    p.add_argument("dir", metavar="DIR", help="the --out folder of `course finetune classify` (or its model.pt)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="messages to classify; - reads them from stdin, one a line")
    p.add_argument("--device", help="cuda, mps or cpu (default $COURSE_DEVICE, else the best available)")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("lab", help="open the course in JupyterLab (other options go to `jupyter lab`, "
                                   "e.g. course lab --no-browser --port 8899)")
    p.set_defaults(func=_cmd_lab)
    return parser


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is _cmd_lab:
        return _cmd_lab(args, extra)
    if args.func is _cmd_finetune_instruct:  # whatever options come with it: it says it is not built yet
        return _cmd_finetune_instruct(args)
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
