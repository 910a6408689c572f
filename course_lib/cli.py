"""The ``course`` command: one entry point for learners and instructors.

    course doctor                      is this machine ready? (one OK/FAIL line per check)
    course data list [--verify]        which registered files are present
    course data fetch NAME... | --all [--mirror DIR]
                                       download or stage data (a classroom: --all, once)
    course data shards NAME|PATH --out DIR [--val-fraction F] [--shard-tokens N] [--workers N] [--force] [-q]
                                       tokenize a corpus into uint16 token shards for pretraining (step 8):
                                       DIR/train_*.bin, DIR/val_*.bin and DIR/meta.json
    course check N [--solutions | --file F] [--timeout S]
                                       check step N's exercises (your own are recorded for `course progress`)
    course hint N [EXERCISE] [--level K | --all]
                                       the next hint for an exercise of step N (a nudge, then the idea, then
                                       the key line); without EXERCISE, how many hints each one has shown
    course progress [--json] [--learner NAME]
                                       your exercises and best Ri scores, step by step, and what to do next
    course cohort report DIR [--plot FILE.png [--force]] [--json]
                                       instructors: the learners' `course progress --json` files in DIR,
                                       as a table per step (and a plot)
    course run N [--profile P] [--out DIR]
                                       execute notebook N headless, print time per section
    course lab [JUPYTER OPTIONS]       open the course in JupyterLab
    course site build [--out DIR]      the course as a static website (Jupyter Book 2): the README, the nine
                                       notebooks executed in the tiny profile, the instructor guide and the
                                       API reference (default DIR build/site)
    course site serve [--dir DIR] [--port 8000] [--host 127.0.0.1]
                                       serve the built website locally
    course finetune classify [--profile P] [--trainable head|last-block|all] [--pooling last|mean]
                             [--lora RANK [--alpha A] [--targets LIST]]
                             [--epochs N] [--out DIR] [--device D] [--force] [-q]
                                       fine-tune the profile's base model into a spam classifier (step 6):
                                       DIR/model.pt and DIR/metrics.json (default DIR runs/classify-<profile>);
                                       with --lora, LoRA adapters and the head train (step 9) and DIR/adapter/
                                       holds the adapters in PEFT's format
    course classify DIR TEXT... | -    label and probability of each text (- reads texts from stdin, one a line)
    course finetune instruct [--profile P] [--style alpaca|phi3] [--mask-prompt] [--epochs N] [--out DIR]
                             [--lora RANK [--alpha A] [--targets LIST]] [--device D] [--force] [-q]
                                       instruction-tune the profile's base model (step 7): DIR/model.pt,
                                       DIR/responses.json and DIR/metrics.json (default DIR runs/instruct-<profile>);
                                       with --lora only LoRA adapters train (step 9), written to DIR/adapter/
    course generate DIR "INSTRUCTION" [--input TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S]
                                       the tuned model's response, in the template it was tuned with
    course evaluate DIR [--judge-url URL --judge-model NAME [--judge-key KEY]]
                                       exact match and ROUGE-L of DIR/responses.json; with a judge (any
                                       OpenAI-compatible server), its mean 0-100 score, added to DIR/metrics.json
    course pretrain [--profile P] [--data NAME|DIR] [--out DIR] [--resume] [--compile] [--dtype bf16|fp16|fp32]
                    [--max-steps N] [--grad-accum-steps N] [--device D] [-q]
                                       pretrain a GPT with the production trainer (step 8): DIR/checkpoint.pt,
                                       DIR/log.jsonl (loss, lr, tokens/s, MFU) and DIR/config.json (default DIR
                                       runs/pretrain-<profile>); --resume continues a stopped run. Launched by
                                       `torchrun --nproc-per-node N -m course_lib.cli pretrain ...` it trains on
                                       N processes (DDP), and only rank 0 prints and writes
    course adapters merge BASE ADAPTER --out DIR [--force]   (or --profile P ADAPTER in place of BASE)
                                       merge a PEFT-format LoRA adapter into its base model (step 9): DIR in
                                       Hugging Face's GPT-2 layout (transformers, vLLM, TGI)
    course export MODEL_DIR --format hf|gguf --out PATH [--dtype f32|f16] [--force]   (or --profile P)
                                       a model for other runtimes: a Hugging Face folder, or one GGUF file
                                       with GPT-2's tokenizer (llama.cpp, Ollama)
    course serve [MODEL_DIR | --profile P] [--adapter NAME=PATH ...] [--host 127.0.0.1] [--port 8000]
                 [--api-key KEY] [--max-batch N]
                                       serve the model behind an OpenAI-compatible API (step 9): /v1/models,
                                       /v1/completions, /v1/chat/completions (streamed too); a request's model
                                       picks the base or an adapter
    course chat [MODEL_DIR | --profile P] [--adapter NAME=PATH] [--model NAME] | --base-url URL [--api-key KEY]
                                       chat in the terminal, streamed, with history (here, or with any
                                       OpenAI-compatible server)

Step code is imported inside the command that needs it, so ``course --help`` is instant.
Bad input is one ``error: ...`` line on stderr and exit status 2. Output into a closed pipe
(``course data list -l | head``) ends quietly, as for any Unix tool.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_doctor(args) -> int:
    from .doctor import main as doctor_main

    return doctor_main(include_data=not args.no_data)


def _cmd_data_list(args) -> int:
    from . import data

    mirror = Path(args.mirror).expanduser() if args.mirror else data.default_mirror()
    cache = Path(args.cache).expanduser() if args.cache else data.default_cache_dir()
    if args.mirror and not mirror.is_dir():
        return _error(f"--mirror {mirror} is not a folder; give the classroom's data folder (e.g. ../shared/data)")
    if cache.exists() and not cache.is_dir():
        return _error(f"--cache {cache} is a file; give the data folder (default {data.default_cache_dir()})")
    print(f"cache : {cache}\nmirror: {mirror or '(none; set COURSE_DATA_MIRROR)'}"
          f"{'' if mirror is None or mirror.is_dir() else ' (not a folder: unused)'}\n")
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
        return _error("name the files to fetch, or use --all (see `course data list`)")
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


def _cmd_hint(args) -> int:
    import warnings

    from . import hints

    step, name, levels = args.step, args.exercise, hints.LEVELS
    if step not in hints.HINTS:
        return _error(f"there is no step {step}; the steps with exercises are {', '.join(map(str, hints.HINTS))}")
    if name is None and (args.level is not None or args.all):
        return _error(f"--level and --all need an EXERCISE, e.g. course hint {step} {next(iter(hints.HINTS[step]))} "
                      "--all")
    if args.level is not None and not 1 <= args.level <= levels:
        return _error(f"--level must be 1 to {levels}, got {args.level}")
    try:
        if name is not None:
            hints.hints_for(step, name)
    except ValueError as err:
        return _error(err)
    if args.level is not None or args.all:  # shown, not recorded
        print(hints.format_hints(step, name, args.level or levels))
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hints.HintsFileWarning)
        try:
            shown = hints.next_hint(step, name) if name is not None else hints.revealed(step)
        except OSError as err:
            shown = err
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if isinstance(shown, OSError):
        return _error(f"cannot keep track of the hints you have seen: {shown} (set COURSE_HINTS_FILE to a file you "
                      "can write)", 1)
    if name is None:
        width = max(map(len, shown))
        print(f"step {step}: hints seen per exercise (`course hint {step} NAME` shows the next one)")
        for exercise, count in shown.items():
            print(f"  {exercise:<{width}}  {count} of {levels}")
        return 0
    print(hints.format_hints(step, name, shown.level))
    if not shown.new:
        print(f"\nno more hints: all {levels} for {name} are shown above. Still stuck? Re-read the notebook section "
              f"of hint 1, or, as a last resort, compare with solutions/step{step:02d}.py")
    elif shown.level < levels:
        print(f"\n(hint {shown.level} of {levels}: run again for the next)")
    else:
        print(f"\n(hint {levels} of {levels}: the last one; `course check {step}` says what still fails)")
    return 0


def _cmd_progress(args) -> int:
    from . import progress as pr

    path = pr.progress_path()
    try:
        record = pr.set_learner(args.learner, path) if args.learner is not None else pr.load_progress(path)
    except (ValueError, OSError) as err:  # ProgressFileError is a ValueError
        return _error(err)
    names = {step: pr.exercise_names(step) for step in pr.STEPS}
    if args.json:
        print(json.dumps(pr.progress_json(record, names), indent=1, ensure_ascii=False))
    else:
        print(pr.format_progress(record, pr.progress_table(record, names), path))
    return 0


def _cmd_cohort_report(args) -> int:
    from .cohort import format_cohort, plot_cohort, read_cohort, summarize

    plot = Path(args.plot).expanduser() if args.plot else None
    if plot is not None and plot.suffix.lower() != ".png":
        return _error(f"--plot writes a PNG image: give a file name ending in .png, got {args.plot!r}")
    if plot is not None and plot.is_dir():
        return _error(f"--plot {plot} is a folder; give a file name, e.g. {plot / 'cohort.png'}")
    if plot is not None and plot.exists() and not args.force:
        return _error(f"--plot {plot} already exists; pass --force to replace it, or give another file name")
    try:
        cohort = read_cohort(args.dir)
    except ValueError as err:
        return _error(err)
    summary = summarize(cohort)
    if not cohort.learners:
        reasons = "; ".join(f"{f}: {r}" for f, r in cohort.skipped)
        return _error(f"none of the {cohort.files} .json files in {cohort.folder} is a course progress file "
                      f"({reasons})")
    print(json.dumps(summary, indent=1, ensure_ascii=False) if args.json else format_cohort(summary, cohort.folder))
    if plot is not None:
        try:
            plot_cohort(summary, plot, overwrite=args.force)
        except OSError as err:  # FileExistsError (appeared meanwhile), a full disk, a folder in the way
            return _error(err, 1)
        print(f"plot: {plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _cmd_run(args) -> int:
    from .config import get_profile
    from .notebook_runner import find_notebook, run_notebook

    def section_done(name: str, seconds: float) -> None:
        print(f"  {name} ... {seconds:.1f} s", flush=True)

    try:
        profile = get_profile(args.profile).name if args.profile else get_profile().name
        if args.device is not None:
            from .config import get_device

            try:
                get_device(args.device)     # before a kernel starts: a wrong name is one line, not a failed cell
            except ValueError as err:
                raise ValueError(f"--device: {err}") from None
        notebook = find_notebook(args.step)
        print(f"executing {notebook.name} with the {profile} profile (each section's time as it finishes)...",
              flush=True)
        result = run_notebook(args.step, profile, out_dir=args.out, device=args.device, on_section=section_done)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.format())
    return 1 if result.error else 0


#: ``course export --format`` / ``--dtype`` (``course_lib.export.GGUF_DTYPES``, written out so that
#: ``course --help`` imports no step code), checked by hand so that a wrong one is one ``error:`` line.
_EXPORT_FORMATS = ("hf", "gguf")
_EXPORT_DTYPES = ("f32", "f16")
#: What ``export_hf`` writes into a folder (with GPT-2's vocabulary, the tokenizer files too).
_HF_EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json")


def _model_source(paths: list[str], profile: str | None, names: tuple[str, ...]) -> tuple[str | None, list[str]] | str:
    """The paths given for ``names`` (the model's first) as (model path, or ``None`` with ``--profile``; the
    rest), or an error message."""
    model, rest = names[0], names[1:]
    if profile is None and len(paths) == len(names):
        return paths[0], paths[1:]
    if profile is not None and len(paths) == len(rest):
        return None, paths
    if profile is not None:
        return (f"--profile {profile} takes the place of {model} (the profile's base model): give "
                f"{' '.join(rest) + ' only' if rest else 'no path'}, not {len(paths)} path(s)")
    return f"give {' '.join(names)} (or --profile P in place of {model}), not {len(paths)} path(s)"


def _load_for_cli(path: str | None, profile: str | None):
    """``load_model`` with its errors as a message: the model, or a string."""
    from .data import DataFetchError
    from .export import load_model

    try:
        return load_model(path, profile=profile, device="cpu")
    except DataFetchError as err:
        return err.summary
    except (ValueError, TypeError, OSError) as err:  # CheckpointError is a ValueError
        return str(err)


def _hf_out_problem(out: Path, force: bool) -> str | None:
    """Why a Hugging Face folder must not be written at ``out``, or ``None``."""
    from .paths import writable_problem

    problem = writable_problem(out)
    if problem is not None:
        return f"the output folder {out} (--out) {problem}: give a folder you can write"
    if out.is_dir() and any(out.iterdir()) and not force:
        return (f"--out {out} already exists and is not empty; pass --force to replace the model files in it, "
                "or give a new folder")
    folder = next((out / f for f in _HF_EXPORT_FILES if (out / f).is_dir()), None)
    if folder is not None:
        return f"--out {out} holds a folder named {folder.name}, where a file goes; give another --out"
    return None


def _write_hf(model, out: Path, force: bool, chat_template: str | None = None) -> int | None:
    """``export_hf`` with its errors as ``error:`` lines; ``None`` when written."""
    from .data import DataFetchError
    from .pretrained import export_hf

    try:
        export_hf(model, out, overwrite=force, chat_template=chat_template)
    except DataFetchError as err:
        return _error(f"GPT-2's tokenizer files could not be fetched: {err.summary}", 1)
    except (ValueError, OSError) as err:
        return _error(err, 1)
    return None


def _hf_chat_template(folder: Path) -> str | None:
    """A Hugging Face folder's chat template: ``tokenizer_config.json``'s ``chat_template``, else the
    ``chat_template.jinja`` file newer ``transformers`` write beside it; ``None`` without one."""
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        template = None
    if not (isinstance(template, str) and template.strip()):
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, ValueError):
            return None
    return template if template.strip() else None


def _cmd_adapters_merge(args) -> int:
    source = _model_source(args.paths, args.profile, ("BASE", "ADAPTER"))
    if isinstance(source, str):
        return _error(source)
    base, (adapter,) = source
    adapter = Path(adapter).expanduser()
    if not adapter.is_dir():
        what = "is a file" if adapter.exists() else "does not exist"
        return _error(f"the adapter folder {adapter} {what}; give the folder holding {' and '.join(_ADAPTER_FILES)} "
                      "(e.g. the adapter/ of `course finetune ... --lora`)")
    out = Path(args.out).expanduser()
    problem = _hf_out_problem(out, args.force)
    if problem is not None:
        return _error(problem)
    loaded = _load_for_cli(base, args.profile)
    if isinstance(loaded, str):
        return _error(loaded)

    from .lora import adapter_chat_template, load_adapter, unload_lora

    try:
        layers = load_adapter(loaded.model, adapter)
        template = adapter_chat_template(adapter)   # an instruction adapter's (course finetune instruct --lora)
    except (ValueError, TypeError, OSError) as err:
        return _error(err)
    unload_lora(loaded.model, merge=True)  # a tied head is merged into its own copy (the embedding stays)
    failed = _write_hf(loaded.model, out, args.force, chat_template=template)
    if failed is not None:
        return failed
    print(f"merged {adapter} ({len(layers)} layers) into {loaded.source}: wrote {out} (Hugging Face GPT-2 layout"
          f"{', with the adapter' + chr(39) + 's chat template' if template else ''}; transformers, vLLM and TGI read "
          "it, `course export` turns it into GGUF)")
    return 0


def _cmd_export(args) -> int:
    if args.format not in _EXPORT_FORMATS:
        return _error(f"--format must be hf (a Hugging Face folder, for transformers, vLLM, TGI) or gguf (one file, "
                      f"for llama.cpp and Ollama), got {args.format!r}")
    if args.dtype not in _EXPORT_DTYPES:
        return _error(f"--dtype must be f32 or f16, got {args.dtype!r}")
    source = _model_source([args.model] if args.model else [], args.profile, ("MODEL_DIR",))
    if isinstance(source, str):
        return _error(source)
    out = Path(args.out).expanduser()
    if args.format == "hf":
        problem = _hf_out_problem(out, args.force)
    else:
        from .paths import writable_problem

        problem = writable_problem(out.parent)
        if out.is_dir():
            problem = f"--out {out} is a folder; give the GGUF file to write, e.g. {out / 'model.gguf'}"
        elif problem is not None:
            problem = f"cannot write --out {out}: the folder {out.parent} {problem}"
        elif out.exists() and not args.force:
            problem = f"--out {out} already exists; pass --force to replace it, or give another file name"
    if problem is not None:
        return _error(problem)
    loaded = _load_for_cli(source[0], args.profile)
    if isinstance(loaded, str):
        return _error(loaded)
    model = loaded.model
    template = None    # an instruction-tuned model's prompt template, for runtimes that format chats themselves
    if loaded.style is not None and model.cfg.vocab_size >= 50257:
        from .serve import chat_template

        template = chat_template(loaded.style)
    elif loaded.kind == "hf":                   # a Hugging Face folder keeps its own (course adapters merge writes it)
        template = _hf_chat_template(Path(loaded.source))
    if args.format == "hf":
        if args.dtype == "f16":
            model.half()
        failed = _write_hf(model, out, args.force, template if model.cfg.vocab_size == 50257 else None)
        if failed is not None:
            return failed
    else:
        from .data import DataFetchError
        from .export import export_gguf

        src = Path(loaded.source)   # general.name: the run folder, the HF folder, or "course_lib profile tiny"
        name = {"checkpoint": src.parent.name, "hf": src.name}.get(loaded.kind, f"course_lib {loaded.source}")
        try:
            export_gguf(model, out, dtype=args.dtype, overwrite=args.force, name=name, chat_template=template)
        except DataFetchError as err:
            return _error(f"GPT-2's tokenizer files could not be fetched: {err.summary}", 1)
        except ValueError as err:
            return _error(err)
        except OSError as err:
            return _error(err, 1)
    what = "a Hugging Face folder" if args.format == "hf" else "a GGUF file"
    chat = "" if template is None else f", with the {loaded.style or 'folder' + chr(39) + 's'} chat template"
    print(f"wrote {out}: {what} ({args.dtype}) of {loaded.source}{chat}")
    return 0


def _adapter_options(values: list[str] | None) -> dict[str, str] | str:
    """``--adapter NAME=PATH ...`` as ``{name: path}``, or an error message."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            return (f"--adapter wants NAME=PATH (the name clients send as model, then the adapter's folder), "
                    f"got {value!r}")
        if name in adapters:
            return f"--adapter {name} is given twice; give each adapter its own name"
        if not Path(path).expanduser().is_dir():
            return (f"--adapter {name}={path}: no such folder; give the adapter/ folder that `course finetune ... "
                    "--lora` wrote (adapter_config.json + adapter_model.safetensors)")
        adapters[name] = str(Path(path).expanduser())
    return adapters


def _serving_engine(args):
    """``(engine, style, note)`` for ``course serve`` / ``course chat`` from MODEL_DIR or --profile, or an exit
    status; ``note`` (or ``None``) says that the model records no template, printed once the command starts."""
    if args.model_dir is not None and args.profile is not None:
        return _error("give MODEL_DIR or --profile, not both (--profile serves that profile's base model)")
    if args.max_batch < 1:
        return _error(f"--max-batch must be a positive number of requests decoded together, got {args.max_batch}")
    adapters = _adapter_options(args.adapter)
    if isinstance(adapters, str):
        return _error(adapters)
    from .config import get_device, get_profile
    from .data import DataFetchError

    try:
        device = get_device(args.device)
        profile = None if args.model_dir is not None else get_profile(args.profile).name
    except ValueError as err:
        return _error(err)
    from .engine import Engine
    from .export import load_model

    try:
        loaded = load_model(args.model_dir, profile=profile, device=device)
    except DataFetchError as err:
        return _error(f"{err.summary} (`course data fetch -v NAME` says how to stage a file by hand)", 1)
    except (ValueError, TypeError, OSError) as err:
        return _error(err)
    if getattr(args, "name", None):
        name = args.name  # course serve --name
    elif profile is not None:
        name = f"{profile}-base"
    else:
        target = Path(args.model_dir).expanduser().resolve()
        name = (target.parent if target.is_file() else target).name or "model"
    if name in adapters:
        return _error(f"--adapter {name} has the base model's name; give the adapter another name")
    try:
        engine = Engine(loaded.model, name=name, adapters=adapters, max_batch=args.max_batch, device=device)
    except (ValueError, TypeError, OSError) as err:
        return _error(f"--adapter: {err}" if adapters else err)
    style, note = args.style or loaded.style, None
    if style is None:
        note = (f"note: {loaded.source} records no prompt template (a base model?); chats are written in alpaca's "
                "(--style chooses)")
    return engine, style or "alpaca", note


def _cmd_serve(args) -> int:
    if not 0 <= args.port <= 65535:
        return _error(f"--port must be a port number from 1 to 65535 (0: any free port), got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        return _error("--api-key is empty; give the key clients must send, or leave the option out")
    if not args.host.strip():
        return _error("--host is empty; give 127.0.0.1 (this machine only) or 0.0.0.0 (the network, with --api-key)")
    loaded = _serving_engine(args)
    if isinstance(loaded, int):
        return loaded
    engine, style, note = loaded
    from .serve import serve

    if note:
        print(note, file=sys.stderr)
    try:
        serve(engine, args.host, args.port, api_key=args.api_key, style=style)
    except ValueError as err:  # --host is not an address of this machine
        return _error(err)
    except OSError as err:  # the port is taken
        return _error(err, 1)
    return 0


def _cmd_chat(args) -> int:
    from .serve import chat

    if args.max_tokens < 1:
        return _error(f"--max-tokens must be a positive number of tokens, got {args.max_tokens}")
    if not (math.isfinite(args.temperature) and 0 <= args.temperature <= 2):
        return _error(f"--temperature must be from 0 (greedy) to 2, got {args.temperature:g}")
    if not (math.isfinite(args.frequency_penalty) and -2 <= args.frequency_penalty <= 2):
        return _error(f"--frequency-penalty must be from -2 to 2 (0: none; 0.5-1 against loops), "
                      f"got {args.frequency_penalty:g}")
    if args.base_url is not None:
        local = [o for o, v in (("MODEL_DIR", args.model_dir), ("--profile", args.profile),
                                ("--adapter", args.adapter)) if v]
        if local:
            return _error(f"--base-url chats with a server's model; {' and '.join(local)} load one here: "
                          "give one or the other")
        if not args.base_url.startswith(("http://", "https://")):
            return _error(f"--base-url must start with http:// or https://, e.g. http://127.0.0.1:8000/v1; "
                          f"got {args.base_url!r}")
        if _bad_url(args.base_url):
            return _error(f"--base-url {args.base_url!r} is not a valid address: {_bad_url(args.base_url)}; "
                          "e.g. http://127.0.0.1:8000/v1")
        import openai

        from .serve import client_replier

        try:
            reply = client_replier(args.base_url, api_key=args.api_key, model=args.model,
                                   max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                   frequency_penalty=args.frequency_penalty)
        except (ConnectionError, ValueError, openai.APIError) as err:
            return _error(err, 1)
        print(f"chatting with {reply.model} at {args.base_url} (/reset forgets the history; /exit or Ctrl-D ends)",
              file=sys.stderr)
        try:
            return chat(reply, system=args.system, name=reply.model)
        except openai.APIConnectionError:
            print(flush=True)  # end the answer's line
            return _error(f"lost the connection to {args.base_url}: is the server still running?", 1)
        except openai.APIError as err:
            return _error(err, 1)
        except KeyboardInterrupt:
            return 0
    if args.api_key is not None:
        return _error("--api-key goes with --base-url (the key of that server)")
    loaded = _serving_engine(args)
    if isinstance(loaded, int):
        return loaded
    engine, style, note = loaded
    from .engine import SamplingParams
    from .serve import engine_replier

    try:
        if args.model is not None and args.model not in engine.models():
            return _error(f"--model {args.model!r} is not loaded; choose one of {engine.models()}")
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                frequency_penalty=args.frequency_penalty)
        reply = engine_replier(engine, model=args.model, style=style, params=params)
        if note:
            print(note, file=sys.stderr)
        print(f"chatting with {args.model or engine.name} (/reset forgets the history; /exit or Ctrl-D ends)",
              file=sys.stderr)
        return chat(reply, system=args.system, name=args.model or engine.name)
    except KeyboardInterrupt:
        return 0
    finally:
        engine.shutdown()


def _add_serving_arguments(p) -> None:
    """MODEL_DIR, --profile, --adapter, --style, --max-batch, --device: what ``course serve`` / ``course chat`` load."""
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                   help="the --out folder of `course finetune instruct` or `course pretrain`, a checkpoint file, "
                        "or a Hugging Face GPT-2 folder (default: the profile's base model)")
    p.add_argument("--profile", help="without MODEL_DIR: serve this profile's base model (tiny, cpu or gpu; "
                                     "default $COURSE_PROFILE, else cpu)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="also serve the PEFT LoRA adapter in folder PATH as model NAME (repeat for more)")
    p.add_argument("--style", choices=_STYLES, help="the prompt template chats are written in (default: the one "
                                                    "the model was tuned with, else alpaca)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests decoded together (default 16)")
    p.add_argument("--device", help="cuda, mps or cpu (default $COURSE_DEVICE, else the best available)")


def _cmd_site_build(args) -> int:
    from .site import build_site

    try:
        build_site(args.out, log=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as err:
        return _error(err)
    except RuntimeError as err:  # a notebook or MyST failed: the message holds MyST's last lines
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_site_serve(args) -> int:
    import errno

    from .site import default_out, make_server

    if not args.host.strip():      # "" would be every interface: the whole network
        return _error("--host is empty; give 127.0.0.1 (this machine only, the default) or 0.0.0.0 (the network)")
    try:
        server = make_server(args.dir or default_out(), host=args.host, port=args.port)
    except (ValueError, TypeError, FileNotFoundError) as err:
        return _error(err)
    except OSError as err:  # the port is taken, or the host is not an address of this machine
        if err.errno == errno.EADDRNOTAVAIL or isinstance(err, socket.gaierror):
            return _error(f"--host {args.host} is not an address of this machine; give 127.0.0.1 or 0.0.0.0")
        return _error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}; give another --port", 1)
    host, port = server.server_address[:2]
    print(f"serving {args.dir or default_out()} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


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


class _LoRARefused(Exception):
    """``add_lora`` refused ``--targets`` (raised inside the fine-tuning, before any training step)."""


def _lora_options(args, task: str, profile: str) -> tuple[int, float, tuple[str, ...], dict] | str | None:
    """``--lora``/``--alpha``/``--targets`` as ``(rank, alpha, targets, rank_pattern)``; ``None`` without
    ``--lora``; or the message of an error. ``--alpha`` defaults to ``2 * rank``; ``--targets`` (and the
    rank of some of them) to the profile's ``course_lib.lora.LORA_RECIPES[task]``."""
    if args.lora is None:
        if args.alpha is not None or args.targets is not None:
            return "--alpha and --targets set up LoRA adapters: give --lora RANK as well (e.g. --lora 8)"
        return None
    if args.lora < 1:
        return f"--lora must be a positive rank (typical: 4, 8 or 16), got {args.lora}"
    alpha = 2.0 * args.lora if args.alpha is None else args.alpha
    if not math.isfinite(alpha) or alpha <= 0:
        return f"--alpha must be a positive number (default: 2 x the rank), got {args.alpha}"
    if args.targets is None:
        from .lora import LORA_RECIPES

        recipe = LORA_RECIPES[task][profile]
        return args.lora, alpha, recipe.targets, dict(recipe.rank_pattern)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets:
        return ("--targets must list layer names or groups separated by commas, e.g. "
                "--targets W_query,W_value or --targets attention,ff")
    return args.lora, alpha, targets, {}


def _lora_run(lora, task: str, profile: str, args) -> tuple[float | None, int | None]:
    """The learning rate and epochs of a fine-tuning run: ``--lr``/``--epochs``; else, with ``--lora``, the
    profile's ``LORA_RECIPES[task]``; else ``None`` (the full fine-tune's recipe)."""
    if lora is None:
        return args.lr, args.epochs
    from .lora import LORA_RECIPES

    recipe = LORA_RECIPES[task][profile]
    return (recipe.lr if args.lr is None else args.lr), (recipe.num_epochs if args.epochs is None else args.epochs)


#: The two files of a PEFT adapter folder (``course_lib.lora.CONFIG_FILE`` / ``WEIGHTS_FILE``).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _lora_prepare(lora: tuple[int, float, tuple[str, ...], dict], summary: dict):
    """The ``prepare_model`` hook of the fine-tuning: ``add_lora`` with the options; its summary in ``summary``."""
    from .lora import add_lora

    def prepare(model):
        try:
            summary["lora"] = add_lora(model, rank=lora[0], alpha=lora[1], targets=list(lora[2]),
                                       rank_pattern=lora[3] or None)
        except (ValueError, TypeError) as err:
            raise _LoRARefused(str(err)) from None

    return prepare


def _lora_metrics(lora: tuple[int, float, tuple[str, ...], dict], summary, note: str) -> dict:
    """What ``metrics.json`` records of a LoRA run under ``"lora"``."""
    return {"rank": lora[0], "alpha": lora[1], "targets": list(lora[2]), "rank_pattern": lora[3],
            "layers": list(summary.layers),
            "trainable_parameters": summary.trainable, "total_parameters": summary.total, "adapter": "adapter",
            "note": note}


def _drop_new_adapter(adapter_dir: Path, was_there: bool) -> None:
    """Remove the adapter folder a failed run wrote, unless an earlier run's was there."""
    if was_there:
        return
    for name in (*_ADAPTER_FILES, "chat_template.jinja"):
        (adapter_dir / name).unlink(missing_ok=True)
    try:
        adapter_dir.rmdir()
    except OSError:
        pass


def _save_adapter_then_merge(model, adapter_dir: Path, force: bool, profile: str, out: Path, drop,
                             chat_template: str | None = None) -> int | None:
    """Write ``model``'s adapters to ``adapter_dir`` (PEFT's folder, with ``chat_template`` for an
    instruction adapter) while it still has them, then merge them into its weights (so model.pt is a
    plain model). Returns an exit status on failure, else None; ``drop()`` removes an adapter folder
    this run created."""
    from .lora import save_adapter, unload_lora

    try:
        save_adapter(model, adapter_dir, overwrite=force, chat_template=chat_template,
                     base_model_name_or_path=None if profile == "gpu" else f"course_lib {profile} base model")
    except FileExistsError as err:  # written by someone else while this run trained
        return _error(f"{err} (it appeared during the run; pass --force to replace it, or give another --out)", 1)
    except (OSError, ValueError) as err:
        drop()
        return _error(f"{err} (nothing was written to {out})", 1)
    unload_lora(model, merge=True)
    return None


def _bad_url(url: str) -> str | None:
    """What is wrong with an http(s) URL's host or port (``http://[::1``, ``http://:80``), or ``None``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port                              # raises for a port that is not a number in range
    except ValueError as err:
        return str(err)
    return None if parts.hostname else "it names no host"


def _error(message: str, status: int = 2) -> int:
    """One ``error: ...`` line on stderr (a message of several lines is joined into one)."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return status


def _default_run_dir(kind: str, profile: str) -> Path:
    """``runs/<kind>-<profile>`` in the course folder (ignored by git), else in the working folder."""
    from .paths import find_course_root

    return (find_course_root() or Path.cwd()) / "runs" / f"{kind}-{profile}"


def _out_problem(out: Path, targets: tuple[Path, ...], force: bool) -> str | None:
    """Why a fine-tuning run must not start with ``--out out`` (checked before a run of minutes), or ``None``."""
    from .paths import writable_problem

    problem = writable_problem(out)
    if problem is not None:
        return f"the output folder {out} (--out) {problem}: give a folder you can write"
    folder = next((p for p in targets if p.is_dir()), None)
    if folder is not None:
        return f"--out {out} holds a folder named {folder.name}, where the file goes; give another --out"
    earlier = [p.name for p in targets if p.exists()]
    if earlier and not force:
        names = " and ".join(earlier) if len(earlier) <= 2 else ", ".join(earlier[:-1]) + " and " + earlier[-1]
        return (f"--out {out} already holds {names} from an earlier run; pass --force to replace "
                f"{'it' if len(earlier) == 1 else 'them'}, or give another --out")
    return None


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

    # Everything that can be refused is refused before a run of minutes, not after it.
    try:
        profile = get_profile(args.profile).name
        device = get_device(args.device)
    except ValueError as err:
        return _error(err)
    if args.epochs is not None and args.epochs < 1:
        return _error(f"--epochs must be a positive number of epochs, got {args.epochs}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        return _error(f"--lr must be a positive learning rate (e.g. 3e-4), got {args.lr}")
    lora = _lora_options(args, "classify", profile)
    if isinstance(lora, str):
        return _error(lora)
    if lora is not None:
        if args.trainable is not None:
            return _error("--trainable and --lora exclude each other: with --lora the adapters and the new head "
                          "train; drop one of them")
        if any(t in ("head", "out_head") or t.endswith(".out_head") for t in lora[2]):
            return _error("--targets: the classifier's head trains in full already (and a LoRA on it has no place "
                          "in PEFT's GPT-2 format); leave 'head' out of --targets")
    out = Path(args.out).expanduser() if args.out else _default_run_dir("classify", profile)
    model_path, metrics_path, adapter_dir = out / "model.pt", out / "metrics.json", out / "adapter"
    adapter_files = tuple(adapter_dir / name for name in _ADAPTER_FILES)
    if lora is not None and adapter_dir.exists() and not adapter_dir.is_dir():
        return _error(f"--out {out} holds a file named adapter, where the adapter folder goes; give another --out")
    refused = _out_problem(out, (model_path, metrics_path, *(adapter_files if lora else ())), args.force)
    if refused is not None:
        return _error(refused)

    from .checkpoint import NonFiniteError, save_checkpoint
    from .classification import finetune_classifier
    from .data import DataFetchError
    from .files import atomic_write

    summary: dict = {}
    prepare = _lora_prepare(lora, summary) if lora is not None else None
    what = f"LoRA adapters (rank {lora[0]}) and a spam classifier head" if lora else "a spam classifier"
    print(f"fine-tuning the {profile} profile's base model into {what} on {device} "
          f"(writes {model_path}{', adapter/' if lora else ''} and {metrics_path.name})", flush=True)
    try:
        lr, epochs = _lora_run(lora, "classify", profile, args)
        result = finetune_classifier(profile, trainable=args.trainable, pooling=args.pooling, num_epochs=epochs, lr=lr,
                                     device=device, progress=not args.quiet, verbose=not args.quiet,
                                     **({"prepare_model": prepare} if lora else {}))
    except _LoRARefused as err:
        return _error(f"--targets: {err}")
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

    metrics = _json_safe(dict(result.metrics))
    adapter_was_there = any(f.exists() for f in adapter_files)

    def drop_adapter() -> None:  # a failed write leaves no adapter/ that was not there before
        if lora is not None:
            _drop_new_adapter(adapter_dir, adapter_was_there)

    if lora is not None:
        # The adapters (PEFT's folder) first, while the model still has them; then they are merged into
        # the base weights, so model.pt is a plain classifier that `course classify` and
        # model_from_checkpoint read. The head trains in full and lives in model.pt only.
        metrics["recipe"]["trainable"] = "lora"
        metrics["lora"] = _lora_metrics(
            lora, summary["lora"],
            "adapter/ holds the LoRA adapters in Hugging Face PEFT's format (GPT-2 module names); the "
            "classification head trained in full and is stored only in model.pt, which holds the "
            "classifier with the adapters merged into its weights")
        failed = _save_adapter_then_merge(result.model, adapter_dir, args.force, profile, out, drop_adapter)
        if failed is not None:
            return failed

    # model.pt next (the large file: a full disk shows here, and atomic_write leaves no part of it), then
    # metrics.json; the metrics are also stored inside model.pt, so the model always carries its own.
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    model_was_there = model_path.exists()
    try:
        save_checkpoint(model_path, result.model, step=history.step, overwrite=args.force, include_rng=False,
                        extra={"kind": "classifier", "metrics": metrics, "history": _json_safe(history.to_dict())})
    except FileExistsError as err:  # written by someone else while this run trained
        drop_adapter()
        return _error(f"{err} (it appeared during the run; pass --force to replace it, or give another --out)", 1)
    except (NonFiniteError, OSError) as err:
        drop_adapter()
        return _error(f"{err} (nothing was written to {out})", 1)
    try:
        atomic_write(metrics_path, lambda fh: fh.write(text.encode("utf-8")), overwrite=args.force)
    except OSError as err:
        if not model_was_there:  # leave the folder as it was: no model without its metrics.json
            model_path.unlink(missing_ok=True)
            drop_adapter()
            return _error(f"{err} (nothing was written to {out})", 1)
        return _error(f"{err} ({model_path} was replaced; its metrics are stored inside it as well)", 1)

    m = metrics
    print(f"\nspam classifier from {m['base_model']}")
    trained_what = (f"LoRA r={lora[0]}, alpha={lora[1]:g} on {len(m['lora']['layers'])} layers + head"
                    if lora else m['recipe']['trainable'])
    rows = [
        ("trainable", f"{trained_what}: {m['trainable_parameters']:,} of {m['total_parameters']:,} "
                      f"parameters ({100 * m['trainable_parameters'] / m['total_parameters']:.2f}%)"),
        ("pooling", m["recipe"]["pooling"]),
        ("epochs", f"{m['recipe']['num_epochs']} ({history.step:,} steps, {m['seconds']:.1f} s on {m['device']})"),
        ("accuracy", f"train {_percent(m['train_accuracy'])}, validation {_percent(m['val_accuracy'])}, "
                     f"test {_percent(m['test_accuracy'])}"),
        ("test, spam", f"precision {_percent(m['test_precision'])}, recall {_percent(m['test_recall'])}, "
                       f"F1 {_percent(m['test_f1'])}"),
        ("test rows", f"{m['rows']['test']:,} (train {m['rows']['train']:,}, validation {m['rows']['val']:,})"),
        ("model", str(model_path) + (" (adapters merged in)" if lora else "")),
        *([("adapter", f"{adapter_dir} (PEFT format; the head is in model.pt)")] if lora else []),
        ("metrics", str(metrics_path)),
    ]
    for name, value in rows:
        print(f"  {name:<11} {value}")
    print(f'\ntry it: course classify {out} "WINNER!! You have won a prize, call now" "see you at lunch?"')
    return 0


#: The templates of ``course finetune instruct --style`` (``course_lib.instruction.STYLES``; a test keeps them equal).
_STYLES = ("alpaca", "phi3")
#: An example for the "try it" lines and ``--help``.
_JUDGE_EXAMPLE = "--judge-url http://localhost:11434/v1 --judge-model llama3.1:8b"


def _fraction(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _loss(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _write_files(out: Path, writes: list[tuple[Path, object]]) -> str | None:
    """Write ``(path, write)`` pairs in order (each ``write()`` is atomic for its own file); ``None`` when all went.

    When one fails (or Ctrl-C comes), the files of this run that were new are removed again, so a
    folder without an earlier run is left as it was; the message then says what happened to a file
    ``--force`` had already replaced.
    """
    was_there = {path: path.exists() for path, _ in writes}
    done: list[Path] = []
    try:
        for path, write in writes:
            write()
            done.append(path)
    except BaseException as err:
        for path in done:
            if not was_there[path]:
                path.unlink(missing_ok=True)
        replaced = [p.name for p in done if was_there[p]]
        kept = ("nothing was written to " + str(out) if not replaced else
                f"{' and '.join(replaced)} {'was' if len(replaced) == 1 else 'were'} already replaced; the other "
                "files are the earlier run's: run the command again with --force")
        if isinstance(err, KeyboardInterrupt):
            return f"interrupted while writing: {kept}"
        if isinstance(err, Exception):
            return f"{err} ({kept})"
        raise
    return None


def _cmd_finetune_instruct(args) -> int:
    from .config import get_device, get_profile

    # Everything that can be refused is refused before a run of minutes, not after it.
    try:
        profile = get_profile(args.profile).name
        device = get_device(args.device)
    except ValueError as err:
        return _error(err)
    if args.epochs is not None and args.epochs < 1:
        return _error(f"--epochs must be a positive number of epochs, got {args.epochs}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        return _error(f"--lr must be a positive learning rate (e.g. 3e-4), got {args.lr}")
    lora = _lora_options(args, "instruct", profile)
    if isinstance(lora, str):
        return _error(lora)
    out = Path(args.out).expanduser() if args.out else _default_run_dir("instruct", profile)
    model_path, responses_path, metrics_path = out / "model.pt", out / "responses.json", out / "metrics.json"
    adapter_dir = out / "adapter"
    adapter_files = tuple(adapter_dir / name for name in _ADAPTER_FILES)
    if lora is not None and adapter_dir.exists() and not adapter_dir.is_dir():
        return _error(f"--out {out} holds a file named adapter, where the adapter folder goes; give another --out")
    refused = _out_problem(out, (model_path, responses_path, metrics_path, *(adapter_files if lora else ())),
                           args.force)
    if refused is not None:
        return _error(refused)

    from .checkpoint import NonFiniteError, save_checkpoint
    from .data import DataFetchError
    from .files import atomic_write
    from .instruction import finetune_instructions

    summary: dict = {}
    prepare = _lora_prepare(lora, summary) if lora is not None else None
    what = f"LoRA adapters (rank {lora[0]}) on " if lora else ""
    print(f"instruction-tuning {what}the {profile} profile's base model on {device} "
          f"(writes {model_path}, {'adapter/, ' if lora else ''}{responses_path.name} and {metrics_path.name})",
          flush=True)
    try:
        lr, epochs = _lora_run(lora, "instruct", profile, args)
        result = finetune_instructions(profile, style=args.style, mask_prompt=True if args.mask_prompt else None,
                                       num_epochs=epochs, lr=lr, device=device, progress=not args.quiet,
                                       verbose=not args.quiet, **({"prepare_model": prepare} if lora else {}))
    except _LoRARefused as err:
        return _error(f"--targets: {err}")
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
        print(f"stopped by Ctrl-C after {history.step:,} steps: the model is only partly tuned, so nothing was "
              f"written to {out}; run the command again to tune it fully", file=sys.stderr)
        return 130

    recipe = dict(result.metrics.get("recipe") or {})
    style = recipe.get("style") or args.style or "alpaca"
    # `course generate` and `course evaluate` must read the model with the template it learned:
    # the style is in metrics.json and in the checkpoint (which `course generate FILE` reads alone).
    metrics = _json_safe({**result.metrics, "style": style})
    adapter_was_there = any(f.exists() for f in adapter_files)
    if lora is not None:
        # The adapters (PEFT's folder) first, while the model still has them; then they are merged into the
        # base weights, so model.pt is a plain GPT that `course generate` and model_from_checkpoint read.
        metrics["lora"] = _lora_metrics(
            lora, summary["lora"],
            "adapter/ holds the LoRA adapters in Hugging Face PEFT's format (GPT-2 module names); model.pt "
            "holds the model with the adapters merged into its weights")
        from .serve import chat_template

        failed = _save_adapter_then_merge(result.model, adapter_dir, args.force, profile, out,
                                          lambda: _drop_new_adapter(adapter_dir, adapter_was_there),
                                          chat_template=chat_template(style))
        if failed is not None:
            return failed
    metrics_text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    responses_text = json.dumps(_json_safe(list(result.responses)), indent=2, ensure_ascii=False,
                                allow_nan=False) + "\n"
    extra = {"kind": "instruct", "style": style, "mask_prompt": bool(recipe.get("mask_prompt", False)),
             "max_new_tokens": recipe.get("max_new_tokens"), "metrics": metrics,
             "history": _json_safe(history.to_dict())}

    def text_writer(path: Path, text: str):
        return lambda: atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), overwrite=args.force)

    # model.pt first (the large file: a full disk shows there, before anything else is written), metrics.json
    # last: `course evaluate` reads responses.json and metrics.json together.
    failed = _write_files(out, [
        (model_path, lambda: save_checkpoint(model_path, result.model, step=history.step, overwrite=args.force,
                                             include_rng=False, extra=extra)),
        (responses_path, text_writer(responses_path, responses_text)),
        (metrics_path, text_writer(metrics_path, metrics_text)),
    ])
    if failed is not None:
        if lora is not None:
            _drop_new_adapter(adapter_dir, adapter_was_there)
        if failed.startswith("interrupted"):
            print(failed, file=sys.stderr)
            return 130
        if "already exists" in failed:  # written by someone else while this run trained
            failed += "; it appeared during the run: pass --force to replace it, or give another --out"
        return _error(failed, 1)

    m = metrics
    examples = m.get("examples") or {}
    reduction = m.get("loss_reduction")
    print(f"\ninstruction-tuned {m.get('base_model', 'the base model')}")
    rows = [
        ("template", f"{style}, prompt " + ("masked (only the response is learned)" if extra["mask_prompt"]
                                            else "learned too")),
        ("epochs", f"{recipe.get('num_epochs', '?')} ({history.step:,} steps, {m['seconds']:.1f} s on {m['device']})"),
        ("resp. loss", f"{_loss(m.get('base_response_loss'))} -> {_loss(m.get('response_loss'))}"
                       + ("" if reduction is None else f" ({100 * reduction:.1f}% lower)")
                       + f" on the {examples.get('test', '?')} test examples, prompt ignored"),
        ("exact match", f"{_percent(m.get('base_exact_match'))} -> {_percent(m.get('exact_match'))} "
                        f"(base -> tuned, {m.get('responses', len(result.responses))} responses)"),
        ("ROUGE-L", f"{_fraction(m.get('base_rouge_l'))} -> {_fraction(m.get('rouge_l'))}"),
        ("stopped", f"{_percent(m.get('stopped_at_end_of_text'))} of the responses ended with end-of-text "
                    f"(base {_percent(m.get('base_stopped_at_end_of_text'))}); "
                    f"{_percent(m.get('with_template_markers'))} hold a template header"),
        *([("LoRA", f"r={lora[0]}, alpha={lora[1]:g} on {len(m['lora']['layers'])} layers: "
                     f"{m['lora']['trainable_parameters']:,} of {m['lora']['total_parameters']:,} parameters "
                     f"trained ({100 * m['lora']['trainable_parameters'] / m['lora']['total_parameters']:.2f}%)")]
          if lora else []),
        ("model", str(model_path) + (" (adapters merged in)" if lora else "")),
        *([("adapter", f"{adapter_dir} (PEFT format)")] if lora else []),
        ("responses", str(responses_path)),
        ("metrics", str(metrics_path)),
    ]
    for name, value in rows:
        print(f"  {name:<11} {value}")
    print(f'\ntry it: course generate {out} "Name the capital of France."'
          f"\n        course evaluate {out} {_JUDGE_EXAMPLE}   (a judge of your own)")
    return 0


def _check_sampling_options(args) -> str | None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        return f"--max-new-tokens must be a positive number of tokens, got {args.max_new_tokens}"
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        return f"--temperature must be 0 (greedy) or a positive number, got {args.temperature:g}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be a positive number of tokens, got {args.top_k}"
    return None


def _cmd_generate(args) -> int:
    from .config import get_device

    instruction = args.instruction
    if not instruction.strip():
        return _error('the instruction is empty; give one in quotes, e.g. course generate DIR "Name three fruits."')
    problem = _check_sampling_options(args)
    if problem is not None:
        return _error(problem)
    unused = [o for o, v in (("--top-k", args.top_k), ("--seed", args.seed)) if v is not None]
    if unused and args.temperature == 0:
        print(f"note: {' and '.join(unused)} only change sampling; with --temperature 0 (the default) the answer "
              "is the likeliest one. Add e.g. --temperature 0.8", file=sys.stderr)
    target = Path(args.dir).expanduser()
    if not target.exists():
        return _error(f"{target} does not exist; give the --out folder of `course finetune instruct` "
                      "(default runs/instruct-<profile>)")
    model_path = target if target.is_file() else target / "model.pt"
    if model_path.is_dir():
        return _error(f"{model_path} is a folder, not a checkpoint; give the folder that holds the model.pt file")
    if not model_path.is_file():
        return _error(f"no model.pt in {target}; instruction-tune one with `course finetune instruct --out {target}`")
    try:
        device = get_device(args.device)
    except ValueError as err:
        return _error(err)

    import torch

    from .checkpoint import model_from_checkpoint
    from .data import DataFetchError
    from .instruction import generate_responses
    from .model import GPTModel
    from .tokenizers import tiktoken_gpt2

    try:   # one read of the file: GPT-2 medium's checkpoint is 1.4 GB
        model, extra = model_from_checkpoint(model_path, device=device, return_extra=True)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        return _error(err)
    if not isinstance(model, GPTModel):
        hint = ("use `course classify` for it" if type(model).__name__ == "GPTClassifier"
                else "give the folder of `course finetune instruct`")
        return _error(f"{model_path} holds a {type(model).__name__}, not a language model that answers "
                      f"instructions; {hint}")
    style = args.style or extra.get("style") or "alpaca"
    context = model.cfg.context_length
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # the length the recipe generated its test responses with
        stored = extra.get("max_new_tokens")
        max_new_tokens = stored if isinstance(stored, int) and 0 < stored < context else min(256, context // 2)
    if max_new_tokens >= context:
        return _error(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context "
                      f"({context} tokens); give at most {context - 1}")
    if not (args.style or extra.get("style")):
        print(f"note: {model_path} records no prompt template (it was not written by `course finetune instruct`); "
              "using alpaca (--style chooses)", file=sys.stderr)
    entry = {"instruction": instruction, "input": args.input or ""}
    if args.seed is not None:
        torch.manual_seed(args.seed)
    stats: dict = {}
    try:
        tokenizer = tiktoken_gpt2()
        response = generate_responses(model, tokenizer, [entry], style=style, max_new_tokens=max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k, progress=False,
                                      stats=stats)[0]
    except DataFetchError as err:
        return _error(err.summary, 1)
    except (ValueError, TypeError) as err:
        return _error(err)
    print(response)
    if not stats.get("stopped"):
        print(f"note: the response was cut at --max-new-tokens {max_new_tokens} before the model ended it",
              file=sys.stderr)
    elif not response:
        print("note: the model answered with nothing (end-of-text, or only spaces, came first)", file=sys.stderr)
    return 0


def _read_run_json(path: Path, what: str) -> object | str:
    """The JSON in ``path``, or an error message naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return f"{path} is not readable {what} ({reason}); run `course finetune instruct --force` again"


def _check_responses(data, path: Path) -> str | None:
    if not isinstance(data, list) or not data:
        return (f"{path} must hold a non-empty list of responses (as `course finetune instruct` writes it), "
                f"got {type(data).__name__ if not isinstance(data, list) else 'an empty list'}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            return (f"{path}: response {i} is a {type(entry).__name__}, not an object with instruction, output "
                    "and model_response")
        for key in ("instruction", "output", "model_response"):
            if not isinstance(entry.get(key), str):
                return f"{path}: response {i} has no {key!r} string; rewrite it with `course finetune instruct --force`"
    return None


def _cmd_evaluate(args) -> int:
    given = [name for name, value in (("--judge-url", args.judge_url), ("--judge-model", args.judge_model),
                                      ("--judge-key", args.judge_key)) if value is not None]
    if given and (args.judge_url is None or args.judge_model is None):
        missing = "--judge-model" if args.judge_url is not None else "--judge-url"
        return _error(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} {missing} as well: a judge "
                      "is a server address and a model "
                      f"name on it, e.g. {_JUDGE_EXAMPLE}")
    if args.judge_url is not None:
        url = args.judge_url.strip()
        if not url.startswith(("http://", "https://")):
            return _error(f"--judge-url must start with http:// or https://, got {args.judge_url!r} "
                          "(e.g. http://localhost:11434/v1 for Ollama)")
        if _bad_url(url):
            return _error(f"--judge-url {args.judge_url!r} is not a valid address: {_bad_url(url)} "
                          "(e.g. http://localhost:11434/v1 for Ollama)")
        if not args.judge_model.strip():
            return _error("--judge-model is empty; give the judge model's name on that server (e.g. llama3.1:8b)")
    target = Path(args.dir).expanduser()
    if not target.exists():
        return _error(f"{target} does not exist; give the --out folder of `course finetune instruct` "
                      "(default runs/instruct-<profile>)")
    folder = target.parent if target.is_file() else target
    responses_path, metrics_path = folder / "responses.json", folder / "metrics.json"
    for path in (responses_path, metrics_path):
        if not path.is_file():
            return _error(f"no {path.name} in {folder}; `course evaluate` reads the folder that "
                          "`course finetune instruct --out DIR` writes")
    try:
        responses_bytes = responses_path.read_bytes()
    except OSError as err:
        return _error(f"cannot read {responses_path}: {err.strerror or err}")
    responses = _read_run_json(responses_path, "JSON")
    if isinstance(responses, str):
        return _error(responses)
    problem = _check_responses(responses, responses_path)
    if problem is not None:
        return _error(problem)
    metrics = _read_run_json(metrics_path, "JSON")
    if isinstance(metrics, str):
        return _error(metrics)
    if not isinstance(metrics, dict):
        return _error(f"{metrics_path} must hold a JSON object of metrics, got {type(metrics).__name__}")

    from .evaluation import mean_scores

    references = [e["output"] for e in responses]
    scores = mean_scores([e["model_response"] for e in responses], references)
    bases = [e.get("base_response") for e in responses]
    base = mean_scores(bases, references) if all(isinstance(b, str) for b in bases) else None
    template = f", template {metrics['style']}" if "style" in metrics else ""
    print(f"{folder}: {len(responses)} test responses{template}")
    rows = [("exact match", _percent(scores["exact_match"])
             + (f" (base {_percent(base['exact_match'])})" if base else "")),
            ("ROUGE-L", _fraction(scores["rouge_l"]) + (f" (base {_fraction(base['rouge_l'])})" if base else ""))]
    if isinstance(metrics.get("response_loss"), (int, float)):
        rows.append(("resp. loss", f"{_loss(metrics['response_loss'])} (from metrics.json; base "
                                   f"{_loss(metrics.get('base_response_loss'))})"))
    for name, value in rows:
        print(f"  {name:<11} {value}")
    for key in ("exact_match", "rouge_l"):
        stored = metrics.get(key)
        if isinstance(stored, (int, float)) and abs(stored - scores[key]) > 1e-9:
            print(f"note: metrics.json says {key} {stored:.4f}; the responses in {responses_path.name} give "
                  f"{scores[key]:.4f} (edited since?)", file=sys.stderr)
    if args.judge_url is None:
        if isinstance(metrics.get("judge_score"), (int, float)):
            print(f"  {'judge':<11} {metrics['judge_score']:.1f} / 100 by {metrics.get('judge_model')} "
                  f"({metrics.get('judge_scored')} scored; from metrics.json)")
        return 0

    from .evaluation import judge
    from .files import atomic_write

    key = args.judge_key if args.judge_key is not None else (os.environ.get("COURSE_JUDGE_KEY") or None)
    print(f"asking {args.judge_model} at {url} to score each response (0-100)...", flush=True)
    try:
        result = judge(responses, [e["model_response"] for e in responses], base_url=url,
                       model=args.judge_model.strip(), api_key=key, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {metrics_path} is unchanged", file=sys.stderr)
        return 130
    except ConnectionError as err:
        return _error(f"{err} ({metrics_path.name} is unchanged)", 1)
    except (ValueError, TypeError) as err:
        return _error(f"{err} ({metrics_path.name} is unchanged)", 1)
    if result.count == 0:
        why = next((e for e in result.errors if e), None)
        example = next((r for r in result.replies if r is not None), "")
        detail = (f"{result.failed} requests failed, e.g. {why}" if why else
                  f"no reply held a score from 0 to 100, e.g. {example!r}")
        return _error(f"the judge scored none of the {len(responses)} responses ({detail}); "
                      f"{metrics_path.name} is unchanged", 1)
    judged = {"judge_score": result.mean, "judge_scored": result.count, "judge_responses": len(responses),
              "judge_model": args.judge_model.strip(), "judge_url": url}
    # Re-read right before writing: keep whatever metrics.json holds now, and refuse to attach the score
    # to responses that changed while the judge was reading them (a run written again with --force).
    try:
        changed = responses_path.read_bytes() != responses_bytes
    except OSError:
        changed = True
    if changed:
        return _error(f"{responses_path} changed while the judge was scoring it; run `course evaluate` again "
                      f"({metrics_path.name} is unchanged)", 1)
    current = _read_run_json(metrics_path, "JSON")
    if not isinstance(current, dict):
        return _error(f"{metrics_path} changed while the judge was scoring and is no longer a JSON object; "
                      "it was not updated", 1)
    text = json.dumps(_json_safe({**current, **judged}), indent=2, allow_nan=False) + "\n"
    try:
        atomic_write(metrics_path, lambda fh: fh.write(text.encode("utf-8")), overwrite=True)
    except OSError as err:
        return _error(f"{err} ({metrics_path.name} is unchanged)", 1)
    unscored = len(responses) - result.count
    missed = f"; {result.failed} requests failed, {result.unparsed} replies without a score" if unscored else ""
    print(f"  {'judge':<11} {result.mean:.1f} / 100 by {judged['judge_model']} ({result.count} of {len(responses)} "
          f"scored{missed}) -> {metrics_path}")
    return 0


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
    if model_path.is_dir():
        return _error(f"{model_path} is a folder, not a checkpoint; give the folder that holds the model.pt file")
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


# --------------------------------------------------------------------------- #
# Step 8: course pretrain, course data shards
# --------------------------------------------------------------------------- #
#: ``course pretrain --dtype`` (``course_lib.trainer.DTYPES``; a test keeps them equal).
_DTYPES = ("bf16", "fp16", "fp32")


def _rank() -> int:
    """This process's rank under ``torchrun`` (0 when run alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _data_problem(value: str) -> str | None:
    """Why ``--data value`` cannot feed the trainer, or ``None`` (a shard folder or a registered text)."""
    from . import data
    from .shards import shard_files

    path = Path(value).expanduser()
    if path.is_dir():
        if shard_files(path, "train"):
            return None
        texts = " (it holds .txt files: tokenize them first with `course data shards " + str(path) + " --out DIR`)" \
            if any(path.glob("*.txt")) else ""
        return (f"--data {path} holds no training shards (train_000000.bin, ...){texts}; write shards with "
                f"`course data shards SOURCE --out {path}` or give a registered corpus name (`course data list`)")
    if path.is_file():
        return (f"--data {path} is a file; give a folder of shards (`course data shards {path} --out DIR` writes "
                "one) or a registered corpus name")
    if value == "gutenberg":
        return None
    entry = data.REGISTRY.get(value)
    if entry is None:
        texts = sorted(e.name for e in data.entries() if e.group == "text")
        return (f"--data {value!r} is neither a folder of shards nor a registered corpus; give a folder written by "
                f"`course data shards`, or one of: {', '.join(texts)}, gutenberg (all the books)")
    if entry.group != "text":
        return f"--data {value!r} is a {entry.group} file, not a text corpus; see `course data list`"
    return None


def _resume_command(args, profile: str, out: Path) -> str:
    """The command that continues this run: the same options, plus ``--resume``."""
    parts = ["course pretrain", f"--profile {profile}", f"--out {out}"]
    if args.data:
        parts.append(f"--data {args.data}")
    if args.dtype:
        parts.append(f"--dtype {args.dtype}")
    if args.compile is not None:
        parts.append("--compile" if args.compile else "--no-compile")
    if args.max_steps is not None:
        parts.append(f"--max-steps {args.max_steps}")
    if args.device:
        parts.append(f"--device {args.device}")
    command = " ".join(parts + ["--resume"])
    if _world_size() > 1:
        command = (f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', _world_size())} -m "
                   + command.replace("course pretrain", "course_lib.cli pretrain"))
    return command


def _stored_run_problem(out: Path, cfg) -> str | None:
    """Why the run in ``out`` (its ``config.json``) cannot be resumed with ``cfg``, or ``None``."""
    try:
        stored = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no readable config.json: the trainer checks the checkpoint itself
    if not isinstance(stored, dict):
        return None
    wanted = {**cfg.model_config().to_dict(), "batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps,
              "seed": cfg.seed}
    had = {**(stored.get("model_config") or {}),
           **{k: stored.get(k) for k in ("batch_size", "grad_accum_steps", "seed")}}
    keys = ("n_layers", "emb_dim", "n_heads", "context_length", "vocab_size", "batch_size", "grad_accum_steps", "seed")
    diffs = [f"{k} {had[k]} -> {wanted[k]}" for k in keys if k in had and had[k] is not None and had[k] != wanted[k]]
    if diffs:
        return (f"the run in --out {out} was started with other settings ({', '.join(diffs)}): resume it with the "
                f"--profile and options it was started with (see {out / 'config.json'}), or give another --out")
    return None


def _cmd_pretrain(args) -> int:
    from .config import get_device, get_profile

    rank0 = _rank() == 0
    fail = _error if rank0 else (lambda message, status=2: status)  # under torchrun, rank 0 speaks for all

    # Everything that can be refused is refused before a run of minutes, not after it.
    try:
        profile = get_profile(args.profile).name
        device = get_device(args.device)
    except ValueError as err:
        return fail(err)
    if args.max_steps is not None and args.max_steps < 1:
        return fail(f"--max-steps must be a positive number of optimizer steps, got {args.max_steps}")
    if args.grad_accum_steps is not None and args.grad_accum_steps < 1:
        return fail(f"--grad-accum-steps must be a positive number of micro-batches per step, got "
                    f"{args.grad_accum_steps}")
    if args.out is not None and not args.out.strip():  # "" must not quietly mean the default folder
        return fail("--out is empty; give a folder, or omit --out for runs/pretrain-<profile>")
    if args.data is not None and not args.data.strip():  # nor "." (Path(""))
        return fail("--data is empty; give a folder of shards or a registered corpus, or omit --data for the recipe's")
    if args.dtype == "fp16" and device.type != "cuda":
        return fail(f"--dtype fp16 needs a CUDA GPU (fp16 autocast with a gradient scaler); this run is on "
                    f"{device.type}: use --dtype bf16 or fp32")
    if args.data is not None:
        problem = _data_problem(args.data)
        if problem is not None:
            return fail(problem)

    from .trainer import CHECKPOINT, CONFIG, LOG, check_config, recipe, train

    out = Path(args.out).expanduser() if args.out else _default_run_dir("pretrain", profile)
    cfg = recipe(profile)
    changes = {"out_dir": str(out), "data": args.data, "dtype": args.dtype, "compile": args.compile,
               "max_steps": args.max_steps, "device": args.device, "grad_accum_steps": args.grad_accum_steps}
    notes = []
    if args.max_steps is not None and cfg.warmup_steps > args.max_steps:
        changes["warmup_steps"] = args.max_steps // 10
        notes.append(f"the recipe's {cfg.warmup_steps} warmup steps do not fit in --max-steps {args.max_steps}: "
                     f"warming up for {changes['warmup_steps']}")
    cfg = cfg.replace(skip_none=True, **changes)
    try:
        check_config(cfg)
    except (ValueError, TypeError) as err:
        return fail(err)

    checkpoint_path, log_path, config_path = out / CHECKPOINT, out / LOG, out / CONFIG
    # Every process checks (under torchrun they see the same folder), so all of them stop together.
    problem = _out_problem(out, (checkpoint_path, log_path, config_path), force=True)  # writable, no folder in the way
    if problem is not None:
        return fail(problem)
    earlier = [p.name for p in (checkpoint_path, log_path) if p.exists()]
    if earlier and not args.resume:
        return fail(f"--out {out} already holds a run ({' and '.join(earlier)}); pass --resume to continue it, "
                    "or give another --out for a new run")
    if args.resume and checkpoint_path.exists():
        problem = _stored_run_problem(out, cfg)
        if problem is not None:
            return fail(problem)
    if args.resume and not checkpoint_path.exists():
        notes.append(f"--resume: no {CHECKPOINT} in {out} yet, so a new run starts")

    from .checkpoint import NonFiniteError
    from .data import DataFetchError

    m = cfg.model_config()
    if rank0:
        procs = f", {_world_size()} processes" if _world_size() > 1 else ""
        print(f"pretraining the {profile} recipe: {m.n_layers} layers x {m.emb_dim} wide, context {m.context_length}, "
              f"on {cfg.data}; {cfg.max_steps:,} steps of {cfg.batch_size} x {cfg.grad_accum_steps} sequences per "
              f"process; {device.type}{procs}, {cfg.dtype}{', compiled' if cfg.compile else ''} -> {out}", flush=True)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    try:
        result = train(cfg, resume=args.resume, progress=not args.quiet, verbose=not args.quiet)
    except KeyboardInterrupt:  # before the loop (data, model) or a second Ctrl-C inside it
        if rank0:
            kept = f"the last checkpoint {checkpoint_path} is kept" if checkpoint_path.exists() else "no checkpoint"
            print(f"\ninterrupted: {kept}", file=sys.stderr)
        return 130
    except DataFetchError as err:
        return fail(f"{err.summary} (`course data fetch -v NAME` says how to stage a file by hand, or give --data "
                    "a folder of shards)", 1)
    except NonFiniteError as err:
        return fail(err, 1)
    except FileExistsError as err:  # a run appeared in --out meanwhile
        return fail(f"{err}", 2)
    except ValueError as err:  # a checkpoint that does not fit, a damaged shard file, ... (a TypeError is a bug)
        return fail(err)
    except OSError as err:
        return fail(f"{err} (the last complete checkpoint, if any, is kept)", 1)

    if not rank0:
        return 130 if result.interrupted else 0
    if not math.isfinite(result.tokens_per_s) and result.steps >= cfg.max_steps:
        print(f"nothing to train: the run in {out} has {result.steps:,} steps, and --max-steps is "
              f"{cfg.max_steps:,}; raise --max-steps to train on", file=sys.stderr)
        return 0

    def number(x, fmt):
        return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)

    rows = [
        ("steps", f"{result.steps:,} of {cfg.max_steps:,} ({result.tokens:,} tokens, {result.seconds:.1f} s on "
                  f"{device.type}{f' x {_world_size()}' if _world_size() > 1 else ''})"),
        ("loss", f"train {number(result.train_loss, '.3f')}, validation {number(result.val_loss, '.3f')}"),
        ("speed", f"{number(result.tokens_per_s, ',.0f')} tokens/s, MFU {number(100 * result.mfu, '.1f')}%"
                  + (" (of a rough CPU peak; see course_lib.mfu)" if device.type == "cpu" else "")),
        ("checkpoint", str(checkpoint_path)),
        ("log", f"{log_path} (loss, lr, gradient norm, tokens/s and MFU per step)"),
        ("config", str(config_path)),
    ]
    print(f"\n{'stopped' if result.interrupted else 'pretrained'} the {profile} recipe")
    for name, value in rows:
        print(f"  {name:<11} {value}")
    if result.interrupted:
        print(f"stopped by Ctrl-C after step {result.steps:,} of {cfg.max_steps:,}; saved {checkpoint_path}. "
              f"Continue with: {_resume_command(args, profile, out)}", file=sys.stderr)
        return 130
    return 0


def _cmd_data_shards(args) -> int:
    if not 0 < args.val_fraction < 1:
        return _error(f"--val-fraction must be between 0 and 1 (exclusive), such as 0.05; got {args.val_fraction:g}")
    if args.shard_tokens < 1:
        return _error(f"--shard-tokens must be a positive number of tokens per file, got {args.shard_tokens}")
    if args.workers is not None and args.workers < 1:
        return _error(f"--workers must be a positive number of processes, got {args.workers}")
    if not args.source.strip():
        return _error("NAME|PATH is empty; give a registered text (`course data list`), a .txt file or a folder "
                      "of them")
    if not args.out.strip():
        return _error("--out is empty; give the folder to write the shards into")
    out = Path(args.out).expanduser()
    from .paths import writable_problem

    problem = writable_problem(out)
    if problem is not None:
        return _error(f"the output folder {out} (--out) {problem}: give a folder you can write")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        return _error(f"--out {out} is not empty; pass --force to replace its shards (other files are kept), or give "
                      "another --out")

    from .data import DataFetchError
    from .shards import prepare_shards

    workers = args.workers if args.workers is not None else "one per CPU"
    print(f"tokenizing {args.source} with GPT-2's tokenizer ({workers} worker processes) into {out}", flush=True)
    try:
        meta = prepare_shards(args.source, out, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                              workers=args.workers, overwrite=args.force, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {out} holds no meta.json, so its shards are incomplete; run the command again with "
              "--force", file=sys.stderr)
        return 130
    except DataFetchError as err:
        return _error(f"{err.summary} (`course data fetch -v NAME` says how to stage a file by hand)", 1)
    except FileExistsError as err:
        return _error(f"{err} (pass --force to replace them, or give another --out)")
    except (ValueError, TypeError) as err:
        return _error(err)
    except OSError as err:
        return _error(err, 1)

    seconds = meta["seconds"]
    print(f"\n{meta['source']} -> {out} (validation split by {meta['split_by']})")
    for split, s in meta["splits"].items():
        files = len(s["files"])
        print(f"  {split:<7} {files:>3} file{'s' if files != 1 else ' '}  {s['tokens']:>13,} tokens  "
              f"({s['documents']:,} document{'s' if s['documents'] != 1 else ''})")
    rate = meta["tokens"] / seconds if seconds > 0 else float("nan")
    print(f"  {'total':<7} {meta['tokens']:,} tokens in {seconds:.1f} s ({rate:,.0f} tokens/s)")
    print(f"  {'meta':<7} {out / 'meta.json'}")
    print(f"\ntrain on it: course pretrain --data {out}")
    return 0


def _add_lora_arguments(q, head: str) -> None:
    """``--lora RANK``, ``--alpha A``, ``--targets LIST`` (step 9) on the sub-command parser ``q``."""
    q.add_argument("--lora", type=int, metavar="RANK",
                   help=f"train LoRA adapters of this rank (step 9) instead of the model's weights; {head}, "
                        "and DIR/adapter/ holds the adapters in Hugging Face PEFT's format (typical: 4, 8, 16)")
    q.add_argument("--alpha", type=float, metavar="A", help="LoRA's alpha; the update is scaled by alpha / rank "
                                                            "(default: 2 x the rank)")
    q.add_argument("--targets", metavar="LIST",
                   help="layers that get adapters, separated by commas: names such as W_query,W_value or the "
                        "groups attention and ff (default: the profile's LoRA recipe, attention for most)")
    q.add_argument("--lr", type=float, help="AdamW's learning rate (default: the recipe's; with --lora the profile's "
                                            "LoRA recipe's, which is higher: adapters start at zero)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course", description="The LLM Sovereignty Stack: course tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check Python, packages, device, profile and data")
    p.add_argument("--no-data", action="store_true", help="skip the data files")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("data", help="list, fetch or tokenize (shards) the course's data files")
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
    q = dsub.add_parser("shards", help="tokenize a corpus into token shards for `course pretrain` (step 8)",
                        description="Encode a corpus once with GPT-2's tokenizer, in parallel worker processes, into "
                                    "DIR/train_NNNNNN.bin and DIR/val_NNNNNN.bin (uint16 token ids after a 1 KiB "
                                    "header; see course_lib.shards) and DIR/meta.json. Every document starts with "
                                    "<|endoftext|>; the validation split is the corpus's last documents (a single "
                                    "document, such as a book, is split by tokens).")
    q.add_argument("source", metavar="NAME|PATH",
                   help="a registered text (`course data list`, e.g. tinystories-val), gutenberg (all the books), "
                        "a .txt file, or a folder of .txt files")
    q.add_argument("--out", metavar="DIR", required=True, help="the folder to write (new or empty unless --force)")
    q.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="share of the corpus held out for validation (default 0.05)")
    q.add_argument("--shard-tokens", type=int, default=2**24, metavar="N",
                   help="tokens per shard file (default 16,777,216: 32 MiB)")
    q.add_argument("--workers", type=int, metavar="N", help="tokenizing processes (default one per CPU)")
    q.add_argument("--force", action="store_true",
                   help="write into a folder that is not empty, replacing its shards (default: refuse)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_data_shards)

    p = sub.add_parser("check", help="check your exercises for step N")
    p.add_argument("step", type=int, help="step number, 1-9")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--solutions", action="store_true", help="check the reference solutions instead")
    g.add_argument("--file", help="check this file instead of exercises/stepNN.py")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a check that runs longer than this (default 30; the exercise's other checks "
                        "are then skipped)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("hint", help="the next hint for an exercise: a nudge, then the idea, then the key line",
                       description="Print the next hint for EXERCISE of step N: the first run shows hint 1 (a "
                                   "nudge), the next hints 1-2 (the idea), then 1-3 (the key line, never the "
                                   "whole solution). What you have seen is remembered in $COURSE_HINTS_FILE, "
                                   "else hints_seen.json in the data folder. Without EXERCISE: step N's exercises "
                                   "and how many hints each has shown.")
    p.add_argument("step", type=int, help="step number, 1-9")
    p.add_argument("exercise", nargs="?", metavar="EXERCISE", help="the function's name in exercises/stepNN.py")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--level", type=int, metavar="K", help="show hints 1 to K without recording them as seen")
    g.add_argument("--all", action="store_true", help="show all three hints without recording them as seen")
    p.set_defaults(func=_cmd_hint)

    p = sub.add_parser("progress", help="your exercises passed and best Ri scores per step, and what to do next",
                       description="Read your progress record (recorded by `course check N` and the notebooks' Ri "
                                   "cells; $COURSE_PROGRESS_FILE, else progress.json in the data folder) and print "
                                   "a line per step and the next thing to do.")
    p.add_argument("--json", action="store_true",
                   help="print the record and every step's exercise names as JSON (for `course cohort report`: "
                        "course progress --json > NAME.json)")
    p.add_argument("--learner", metavar="NAME", help="set the name the record carries (default $COURSE_LEARNER, "
                                                     "else your user name)")
    p.set_defaults(func=_cmd_progress)

    p = sub.add_parser("cohort", help="instructors: a report on the learners' progress files")
    csub = p.add_subparsers(dest="cohort_command", required=True)
    q = csub.add_parser("report", help="per step, who passed each exercise, the slowest ones, Ri score spreads",
                        description="Read every *.json file in DIR (the learners' `course progress --json` "
                                    "output; not sub-folders) and print, per step, how many learners passed each "
                                    "exercise, the slowest exercises and each Ri score's min / median / max per "
                                    "profile. Other files are listed as skipped, with the reason; of two records "
                                    "of one learner the later one counts.")
    q.add_argument("dir", metavar="DIR", help="the folder holding the learners' .json files")
    q.add_argument("--plot", metavar="FILE.png", help="also draw the report into this PNG")
    q.add_argument("--force", action="store_true", help="replace an existing --plot file (default: refuse)")
    q.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    q.set_defaults(func=_cmd_cohort_report)

    p = sub.add_parser("run", help="execute step N's notebook headless and save an executed copy")
    p.add_argument("step", type=int, help="step number, 1-9")
    p.add_argument("--profile", help="tiny, cpu or gpu (default $COURSE_PROFILE, else cpu)")
    p.add_argument("--out", help="folder for the executed copy (default runs/<profile>/)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("finetune", help="fine-tune the profile's base model (classify: step 6, instruct: step 7)")
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
    _add_lora_arguments(q, "the new head trains in full")
    q.add_argument("--epochs", type=int, help="epochs over the training split (default: the recipe's)")
    q.add_argument("--out", metavar="DIR", help="folder for model.pt and metrics.json (and adapter/ with --lora) "
                                                "(default runs/classify-<profile>/ in the course folder)")
    q.add_argument("--device", help="cuda, mps or cpu (default $COURSE_DEVICE, else the best available)")
    q.add_argument("--force", action="store_true",
                   help="replace the model.pt and metrics.json of an earlier run in DIR (default: refuse)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar or evaluations; only the summary")
    q.set_defaults(func=_cmd_finetune_classify)
    q = fsub.add_parser("instruct", help="into an assistant: writes DIR/model.pt, responses.json and metrics.json",
                        description="Instruction-tune the profile's base model (the book's 1,100 instructions, "
                                    "split 85/10/5 into train/test/validation), answer the test split before and "
                                    "after, and write DIR/model.pt (ask it with `course generate DIR "
                                    "\"instruction\"`), DIR/responses.json (each test entry with model_response "
                                    "and base_response) and DIR/metrics.json (response loss, exact match, "
                                    "ROUGE-L, seconds; `course evaluate DIR` adds a judge's score). Nothing is "
                                    "written if the run fails or is stopped.")
    q.add_argument("--profile", help="tiny, cpu or gpu (default $COURSE_PROFILE, else cpu): the base model and recipe")
    q.add_argument("--style", choices=_STYLES,
                   help="the prompt template: alpaca ('### Instruction:' / '### Response:') or phi3 "
                        "('<|user|>' / '<|assistant|>') (default: the recipe's, alpaca)")
    q.add_argument("--mask-prompt", action="store_true",
                   help="learn only the response: the prompt's tokens get no loss (default: the recipe's, "
                        "which learns both)")
    _add_lora_arguments(q, "nothing else trains")
    q.add_argument("--epochs", type=int, help="epochs over the training split (default: the recipe's)")
    q.add_argument("--out", metavar="DIR", help="folder for model.pt, responses.json and metrics.json (and adapter/ "
                                                "with --lora) (default runs/instruct-<profile>/ in the course folder)")
    q.add_argument("--device", help="cuda, mps or cpu (default $COURSE_DEVICE, else the best available)")
    q.add_argument("--force", action="store_true",
                   help="replace the model.pt, responses.json and metrics.json of an earlier run in DIR "
                        "(default: refuse)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars or evaluations; only the summary")
    q.set_defaults(func=_cmd_finetune_instruct)

    p = sub.add_parser("pretrain", help="pretrain a GPT with the production trainer (step 8); torchrun runs it "
                                        "on many processes",
                       description="Pretrain a GPT from scratch with course_lib.trainer.train and the profile's "
                                   "recipe (course_lib.trainer.recipe): AdamW, warmup + cosine, clipping, gradient "
                                   "accumulation, mixed precision, token shards. Writes DIR/checkpoint.pt (every "
                                   "few hundred steps and at the end), DIR/log.jsonl (loss, lr, gradient norm, "
                                   "tokens/s and MFU) and DIR/config.json. Ctrl-C finishes the step, saves and "
                                   "says how to --resume. Launched by torchrun (torchrun --standalone "
                                   "--nproc-per-node 2 -m course_lib.cli pretrain ...) the same command trains "
                                   "with DistributedDataParallel: NCCL on GPUs, gloo on CPUs; rank 0 prints and "
                                   "writes.")
    p.add_argument("--profile", help="tiny, cpu or gpu (default $COURSE_PROFILE, else cpu): the recipe")
    p.add_argument("--data", metavar="NAME|DIR",
                   help="a folder of shards (`course data shards`) or a registered corpus, tokenized once into "
                        "the data cache (default: the recipe's)")
    p.add_argument("--out", metavar="DIR", help="folder for checkpoint.pt, log.jsonl and config.json "
                                                "(default runs/pretrain-<profile>/ in the course folder)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in DIR from its checkpoint (default: refuse a DIR that holds a run)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: the recipe's; gpu compiles)")
    p.add_argument("--dtype", choices=_DTYPES,
                   help="autocast to bf16 (CPU and CUDA), fp16 (CUDA, with a gradient scaler) or plain fp32 "
                        "(default: the recipe's)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="optimizer steps in all, those before a --resume included; the schedule decays over them "
                        "(default: the recipe's)")
    p.add_argument("--grad-accum-steps", type=int, metavar="N",
                   help="micro-batches per optimizer step in each process (default: the recipe's); under torchrun "
                        "with K processes, the recipe's divided by K keeps its global batch")
    p.add_argument("--device", help="cuda, mps or cpu (default $COURSE_DEVICE, else the best available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or evaluations; only the summary")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("classify", help="label and probability of each text, with a fine-tuned classifier")
    p.add_argument("dir", metavar="DIR", help="the --out folder of `course finetune classify` (or its model.pt)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="messages to classify; - reads them from stdin, one a line")
    p.add_argument("--device", help="cuda, mps or cpu (default $COURSE_DEVICE, else the best available)")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("generate", help="the response of an instruction-tuned model to an instruction",
                       description="Print the response of the model in DIR (written by `course finetune "
                                   "instruct`) to an instruction, in the prompt template it was tuned with. "
                                   "Greedy unless --temperature is above 0.")
    p.add_argument("dir", metavar="DIR", help="the --out folder of `course finetune instruct` (or its model.pt)")
    p.add_argument("instruction", metavar="INSTRUCTION", help='the instruction, in quotes: "Name three fruits."')
    p.add_argument("--input", metavar="TEXT", help="the input the instruction works on, if it needs one")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="the most tokens to generate (default: as many as the test responses got)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 (default) picks the likeliest token each time; above 0 samples, more freely as T grows")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="with --temperature: sample only among the K likeliest tokens")
    p.add_argument("--seed", type=int, metavar="S", help="with --temperature: the same S gives the same response")
    p.add_argument("--style", choices=_STYLES,
                   help="the prompt template (default: the one the model was tuned with; set this only for a "
                        "checkpoint that records none)")
    p.add_argument("--device", help="cuda, mps or cpu (default $COURSE_DEVICE, else the best available)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("evaluate", help="score an instruction-tuned model's test responses (and ask a judge)",
                       description="Recompute exact match and ROUGE-L from DIR/responses.json. With --judge-url "
                                   "and --judge-model, an LLM behind any OpenAI-compatible server (Ollama, "
                                   "llama.cpp's llama-server, vLLM) scores each response from 0 to 100, and "
                                   "the mean is added to DIR/metrics.json as judge_score (the rest of the file "
                                   "is kept; nothing changes if the judge cannot be reached).")
    p.add_argument("dir", metavar="DIR", help="the --out folder of `course finetune instruct`")
    p.add_argument("--judge-url", metavar="URL",
                   help="the judge server's OpenAI-compatible root, e.g. http://localhost:11434/v1 (Ollama) or "
                        "http://localhost:8080/v1 (llama-server)")
    p.add_argument("--judge-model", metavar="NAME", help="the judge model's name on that server, e.g. llama3.1:8b")
    p.add_argument("--judge-key", metavar="KEY",
                   help="API key for a hosted judge (default $COURSE_JUDGE_KEY; a local server needs none)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar while the judge scores")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("adapters", help="work with LoRA adapter folders (step 9): merge one into its base model")
    asub = p.add_subparsers(dest="adapters_command", required=True)
    q = asub.add_parser("merge", help="fold a LoRA adapter into its base model: a Hugging Face GPT-2 folder",
                        description="Load BASE (a course checkpoint or run folder, or a Hugging Face GPT-2 folder; "
                                    "--profile P: that profile's base model), apply the PEFT-format adapter in "
                                    "ADAPTER (ours or one peft trained on GPT-2), merge it into the weights and "
                                    "write DIR in Hugging Face's layout (config.json + model.safetensors), which "
                                    "transformers, vLLM and TGI load. An adapter made for another base model is "
                                    "refused, naming the tensor that does not fit.")
    q.add_argument("paths", nargs="*", metavar="BASE ADAPTER",
                   help="the base model and the adapter folder (with --profile, only the adapter folder)")
    q.add_argument("--profile", help="tiny, cpu or gpu: merge into this profile's base model instead of BASE")
    q.add_argument("--out", metavar="DIR", required=True, help="the folder to write (new or empty unless --force)")
    q.add_argument("--force", action="store_true",
                   help="write into a folder that is not empty, replacing its model files")
    q.set_defaults(func=_cmd_adapters_merge)

    p = sub.add_parser("export", help="write a model for other runtimes: a Hugging Face folder or a GGUF file",
                       description="Export MODEL_DIR (a course checkpoint or run folder, or a Hugging Face GPT-2 "
                                   "folder; --profile P: that profile's base model) as a Hugging Face folder "
                                   "(--format hf: vLLM, TGI, transformers) or one GGUF file with GPT-2's tokenizer "
                                   "inside (--format gguf: llama.cpp's llama-server, Ollama). Writes are atomic; "
                                   "nothing is replaced without --force.")
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="the model to export (omit with --profile)")
    p.add_argument("--profile", help="tiny, cpu or gpu: export this profile's base model instead of MODEL_DIR")
    p.add_argument("--format", required=True, metavar="hf|gguf",
                   help="hf: a Hugging Face folder (config.json + model.safetensors); gguf: one .gguf file")
    p.add_argument("--out", metavar="PATH", required=True,
                   help="the folder (hf) or file (gguf, e.g. model.gguf) to write")
    p.add_argument("--dtype", default="f32", metavar="f32|f16",
                   help="the weights' type (default f32; with gguf, f16 applies to the matrices, as llama.cpp's "
                        "converter does)")
    p.add_argument("--force", action="store_true", help="replace an earlier export at --out (default: refuse)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API (step 9)",
                       description="Serve MODEL_DIR (the --out of `course finetune instruct` or `course pretrain`, "
                                   "a checkpoint file, or a Hugging Face GPT-2 folder) or the profile's base model "
                                   "at http://HOST:PORT/v1: /v1/models, /v1/completions, /v1/chat/completions "
                                   "(streaming too) and /health, as OpenAI's API, so any OpenAI client works with "
                                   "base_url=http://127.0.0.1:8000/v1. Concurrent requests are decoded together; "
                                   "a request's model picks the base or an adapter. Ctrl-C stops.")
    _add_serving_arguments(p)
    p.add_argument("--name", help="the base model's name for clients (default: MODEL_DIR's folder name, or "
                                  "<profile>-base)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: the network, "
                        "with --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", metavar="KEY", help="clients must send 'Authorization: Bearer KEY' (default: none)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("chat", help="chat with a model in the terminal, streamed (step 9)",
                       description="A chat in the terminal with history: with MODEL_DIR or --profile the model runs "
                                   "here (the engine of `course serve`); with --base-url it is any OpenAI-compatible "
                                   "server (course serve, vLLM, llama.cpp, Ollama). /reset forgets the history, "
                                   "/exit or Ctrl-D ends.")
    _add_serving_arguments(p)
    p.add_argument("--model", metavar="NAME", help="the adapter (or the base) to chat with (default: the base; "
                                                   "with --base-url, the server's first model)")
    p.add_argument("--base-url", metavar="URL", help="chat through this server instead, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", metavar="KEY", help="with --base-url: that server's key")
    p.add_argument("--system", metavar="TEXT", help="a system message put first in every request")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="0 picks the likeliest token each time; higher samples more freely (default 0.7)")
    p.add_argument("--seed", type=int, metavar="S", help="the same S gives the same answers")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="in [-2, 2]: taken from a token's score each time it was said; 0.5-1 stops a small "
                        "model's loops (default 0, OpenAI's frequency_penalty)")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("site", help="build the course website (Jupyter Book 2) or serve it locally")
    ssub = p.add_subparsers(dest="site_command", required=True)
    q = ssub.add_parser("build", help="build the website: README, notebooks executed in the tiny profile, "
                                      "instructor guide, API reference",
                        description="Build the course as a static website into DIR (default build/site): the "
                                    "notebooks are executed in the tiny profile (a few minutes), MyST turns the "
                                    "pages into JSON and course_lib.site writes the HTML. DIR must be new, empty "
                                    "or a site built earlier; the new site replaces it only once it is complete.")
    q.add_argument("--out", metavar="DIR", help="the folder to build into (default build/site)")
    q.set_defaults(func=_cmd_site_build)
    q = ssub.add_parser("serve", help="serve the built website at http://127.0.0.1:8000/")
    q.add_argument("--dir", metavar="DIR", help="the built site (default build/site)")
    q.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    q.set_defaults(func=_cmd_site_serve)

    p = sub.add_parser("lab", help="open the course in JupyterLab (other options go to `jupyter lab`, "
                                   "e.g. course lab --no-browser --port 8899)")
    p.set_defaults(func=_cmd_lab)
    return parser


#: Arguments (by dest) where a blank string is a mistake, not a value: a path, a name or a choice.
#: Commands whose own check says more (--data, --host, --api-key, --judge-model, --learner, texts) are not here.
_NOT_BLANK = frozenset({"out", "dir", "model", "model_dir", "file", "plot", "cache", "mirror", "name", "profile",
                        "device", "base_url", "judge_url", "adapter", "style", "targets", "pooling",
                        "trainable", "format", "dtype", "paths", "names"})


def _blank_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """What is wrong with the first argument of the command run that is a blank string where a
    path, a name or a choice goes (``--out ""`` quietly meant the default folder), or ``None``."""
    while True:                                      # down to the subcommand that was run
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or getattr(args, subs[0].dest, None) not in subs[0].choices:
            break
        parser = subs[0].choices[getattr(args, subs[0].dest)]
    for action in parser._actions:
        if action.dest not in _NOT_BLANK:
            continue
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            if action.option_strings:
                return f"{action.option_strings[-1]} is empty; give a value, or leave the option out for its default"
            return f"{action.metavar or action.dest.upper()}: an argument is empty; give a path or a name"
    return None


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    blank = _blank_argument(parser, args)
    if blank is not None:
        return _error(blank)
    seed = getattr(args, "seed", None)
    if isinstance(seed, int) and not -2**63 <= seed < 2**64:        # what torch's generators take
        return _error(f"--seed must be a whole number from -2**63 to 2**64 - 1, got {seed}; e.g. --seed 123")
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
