#!/usr/bin/env bash
# Step 8's GPU check: one script, within 10 minutes on one GPU, no internet needed.
#
#   1. pretrain  `course pretrain --profile gpu --dtype bf16 --compile --max-steps 300` (GPT-2 small,
#                524,288 tokens per step) on TinyStories' training file if it is staged, else on shards
#                made from the staged Gutenberg books (`course data shards gutenberg`, else the folder
#                $COURSE_DATA_MIRROR/gutenberg, else tinystories-val); prints tokens/s and MFU from
#                its log.jsonl (the first logged interval, with compilation, left out).
#   2. generation  python benchmarks/bench_generation.py --models gpt2-small --no-cache-repeats 0
#   3. tests     COURSE_DEVICE=cuda pytest -x -q tests (notebooks left out; a test module whose
#                imports are missing here, e.g. nbformat, is left out and named)
#
# Every part runs under `timeout`, inside one overall budget (GPU_CHECK_BUDGET seconds, default 560):
# a part that would overrun it is cut (pretraining gets Ctrl-C: it saves and prints its summary, and
# the figures come from its log either way). The pretraining runs first: it is the figure asked for.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, from any folder
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh  # the plumbing on a CPU: tiny profile, fp32, no
#                                                 # compile, 20 steps, gpt-tiny generation, a few tests
#
# Settings (environment): GPU_CHECK_STEPS (300), GPU_CHECK_PARTS ("pretrain generation tests"),
# GPU_CHECK_BUDGET (560), GPU_CHECK_PRETRAIN_S (330), GPU_CHECK_GENERATION_S (90),
# GPU_CHECK_DATA (a shard folder or corpus name: skips the data search), GPU_CHECK_WORK (scratch
# folder, default a new one under /tmp), GPU_CHECK_TESTS (pytest targets), PY (the Python to use),
# COURSE_DATA_MIRROR (the staged data; else ./shared/data, ../shared/data or /work/shared/data).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
START=$(date +%s)
DRY="${GPU_CHECK_DRY:-0}"
BUDGET="${GPU_CHECK_BUDGET:-560}"
PARTS="${GPU_CHECK_PARTS:-pretrain generation tests}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_MININTERVAL=10

say() { printf '\n=== %s (%ss elapsed) ===\n' "$*" "$(( $(date +%s) - START ))"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# cap WANTED: the seconds a part may take: WANTED, or what is left of the budget (minus a margin)
cap() { local l; l=$(( $(left) - 15 )); if (( l < $1 )); then echo "$l"; else echo "$1"; fi; }

# ---- Python and data ---------------------------------------------------------------------------
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
    else PY=python3; fi
fi
if [[ -z "${COURSE_DATA_MIRROR:-}" || ! -d "${COURSE_DATA_MIRROR:-}" ]]; then
    for d in "$ROOT/shared/data" "$ROOT/../shared/data" /work/shared/data; do
        if [[ -d "$d" ]]; then export COURSE_DATA_MIRROR="$(cd "$d" && pwd)"; break; fi
    done
fi
if [[ -z "${TIKTOKEN_CACHE_DIR:-}" && -d "${COURSE_DATA_MIRROR:-/nonexistent}/tiktoken_cache" ]]; then
    export TIKTOKEN_CACHE_DIR="$COURSE_DATA_MIRROR/tiktoken_cache"
fi

if [[ "$DRY" == 1 ]]; then
    DEVICE=cpu PROFILE=tiny DTYPE=fp32 COMPILE=--no-compile STEPS="${GPU_CHECK_STEPS:-20}"
    GEN_ARGS=(--models gpt-tiny --new-tokens 20 --repeats 1 --no-cache-repeats 0)
    TESTS="${GPU_CHECK_TESTS:-tests/test_schedules.py tests/test_cli_pretrain.py::test_cli_dtypes_are_the_trainers}"
else
    DEVICE=cuda PROFILE=gpu DTYPE=bf16 COMPILE=--compile STEPS="${GPU_CHECK_STEPS:-300}"
    GEN_ARGS=(--models gpt2-small --no-cache-repeats 0)
    TESTS="${GPU_CHECK_TESTS:-tests}"
fi

say "machine"
echo "root $ROOT, python $PY, work $WORK, mirror ${COURSE_DATA_MIRROR:-(none)}, budget ${BUDGET}s, dry run: $DRY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import os, torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if cuda else 'no GPU'}, bf16: {cuda and torch.cuda.is_bf16_supported()}, "
      f"{os.cpu_count()} CPUs")
EOF
if [[ "$DRY" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA GPU here: run with GPU_CHECK_DRY=1 to check the script's plumbing on a CPU"; exit 1
fi

# The data for pretraining: TinyStories' training file if staged, else the Gutenberg books. Each is
# tokenized here, under its own time limit, so that the pretraining's limit is spent on training.
make_shards() {  # make_shards SOURCE OUT SECONDS
    local t; t=$(cap "$3")
    (( t >= 20 )) || return 1
    timeout -k 10 "$t" "$PY" -m course_lib.cli data shards "$1" --out "$2" --workers "$(nproc)" -q --force
}
find_data() {
    if [[ -n "${GPU_CHECK_DATA:-}" ]]; then DATA="$GPU_CHECK_DATA"; DATA_NOTE="GPU_CHECK_DATA"; return; fi
    local state
    state=$("$PY" -c "from course_lib import data; print(data.status('tinystories-train', verify=False))" 2>/dev/null)
    if [[ "$PROFILE" == gpu && ( "$state" == cached || "$state" == in-mirror ) ]]; then
        echo "tinystories-train is staged ($state): tokenizing it (at most 150 s)"
        if make_shards tinystories-train "$WORK/shards-tinystories" 150; then
            DATA="$WORK/shards-tinystories"; DATA_NOTE="TinyStories' training file (the gpu recipe's own data)"; return
        fi
        echo "tokenizing tinystories-train failed or took too long: falling back to the Gutenberg books"
    else
        echo "tinystories-train is ${state:-unknown} here (no internet): making shards of the Gutenberg books"
    fi
    if make_shards gutenberg "$WORK/shards-gutenberg" 120; then
        DATA="$WORK/shards-gutenberg"; DATA_NOTE="shards of the registered Gutenberg books (course data shards gutenberg)"
        return
    fi
    if compgen -G "${COURSE_DATA_MIRROR:-/nonexistent}/gutenberg/*.txt" >/dev/null; then
        echo "'course data shards gutenberg' failed: tokenizing the folder $COURSE_DATA_MIRROR/gutenberg instead"
        if make_shards "$COURSE_DATA_MIRROR/gutenberg" "$WORK/shards-gutenberg" 120; then
            DATA="$WORK/shards-gutenberg"; DATA_NOTE="shards of the .txt files in $COURSE_DATA_MIRROR/gutenberg"; return
        fi
    fi
    DATA=tinystories-val; DATA_NOTE="TinyStories' validation file (no Gutenberg books found; a small corpus)"
}

report_log() {  # tokens/s and MFU from a run's log.jsonl, the first interval (compilation) left out
    "$PY" - "$1" <<'EOF'
import json, statistics, sys
from pathlib import Path
path = Path(sys.argv[1]) / "log.jsonl"
if not path.is_file():
    sys.exit(f"no {path}: the run logged nothing")
recs = []
for line in path.read_text().splitlines():
    try:
        recs.append(json.loads(line))
    except ValueError:
        pass
timed = [r for r in recs[1:] if r.get("tokens_per_s")] or [r for r in recs if r.get("tokens_per_s")]
if not timed:
    sys.exit(f"{path}: no step was timed")
cfg = json.loads((path.parent / "config.json").read_text())
tps = [r["tokens_per_s"] for r in timed]
mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
val = [r for r in recs if r.get("val_loss") is not None]
print(f"steps logged: {recs[-1]['step']} of {cfg['max_steps']} ({recs[-1]['tokens']:,} tokens), "
      f"{cfg['global_batch_tokens']:,} tokens per step, dtype {cfg['dtype']}, compile {cfg['compile']}")
print(f"loss: first {recs[0]['loss']:.3f}, last {recs[-1]['loss']:.3f}"
      + (f", validation {val[-1]['val_loss']:.3f} at step {val[-1]['step']}" if val else ""))
print(f"RESULT tokens/s: median {statistics.median(tps):,.0f}, best {max(tps):,.0f} (over {len(timed)} logged "
      f"intervals after the first)")
if mfu:
    print(f"RESULT MFU: median {100 * statistics.median(mfu):.1f}%, best {100 * max(mfu):.1f}%")
EOF
}

STATUS=0
for part in $PARTS; do
    case "$part" in
    pretrain)
        say "1. pretrain: the $PROFILE recipe, $DTYPE, ${COMPILE#--}, $STEPS steps, on $DEVICE"
        find_data
        echo "data: $DATA — $DATA_NOTE"
        out="$WORK/pretrain-$PROFILE"
        rm -rf "$out"
        t=$(cap "${GPU_CHECK_PRETRAIN_S:-330}")
        if (( t < 30 )); then echo "skipped: only ${t}s left of the budget"; STATUS=1; continue; fi
        echo "time limit ${t}s (Ctrl-C then: the run saves and prints its summary)"
        timeout -s INT -k 60 "$t" "$PY" -m course_lib.cli pretrain --profile "$PROFILE" --data "$DATA" --out "$out" \
            --dtype "$DTYPE" "$COMPILE" --max-steps "$STEPS" --device "$DEVICE" -q
        rc=$?
        case $rc in
            0) echo "pretrain: finished" ;;
            130|124) echo "pretrain: stopped at the time limit (status $rc); figures from the steps it made" ;;
            *) echo "pretrain: FAILED (status $rc)"; STATUS=1 ;;
        esac
        report_log "$out" || STATUS=1
        ;;
    generation)
        say "2. generation benchmark: ${GEN_ARGS[*]}"
        t=$(cap "${GPU_CHECK_GENERATION_S:-90}")
        if (( t < 20 )); then echo "skipped: only ${t}s left of the budget"; STATUS=1; continue; fi
        timeout -k 10 "$t" "$PY" benchmarks/bench_generation.py "${GEN_ARGS[@]}" \
            || { echo "generation: FAILED or cut (status $?)"; STATUS=1; }
        ;;
    tests)
        say "3. tests on $DEVICE: $TESTS"
        t=$(cap 600)
        if (( t < 30 )); then echo "skipped: only ${t}s left of the budget"; STATUS=1; continue; fi
        # leave out test modules whose imports this machine lacks (named), and nbval when it is missing
        mapfile -t IGNORE < <("$PY" - $TESTS <<'EOF'
import ast, importlib.util, sys
from pathlib import Path
targets = [Path(t.split("::")[0]) for t in sys.argv[1:]]
files = [f for t in targets for f in (sorted(t.rglob("test_*.py")) if t.is_dir() else [t])]
for f in files:
    missing = set()
    for node in ast.walk(ast.parse(f.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            top = name.split(".")[0]
            if top not in sys.modules and importlib.util.find_spec(top) is None and not (f.parent / f"{top}.py").exists():
                missing.add(top)
    if missing:
        print(f"--ignore={f}")
        print(f"left out {f} (needs {', '.join(sorted(missing))})", file=sys.stderr)
EOF
)
        ADDOPTS=()
        if ! "$PY" -c "import nbval" 2>/dev/null; then  # pyproject's addopts name nbval's options
            ADDOPTS=(-o "addopts=-p no:cacheprovider"); echo "nbval is not installed here"
        fi
        # shellcheck disable=SC2086
        COURSE_DEVICE="$DEVICE" timeout -k 10 "$t" "$PY" -m pytest -x -q "${ADDOPTS[@]}" "${IGNORE[@]}" $TESTS
        rc=$?
        (( rc == 0 )) && echo "tests: passed" || { echo "tests: FAILED or cut at ${t}s (status $rc)"; STATUS=1; }
        ;;
    *) echo "unknown part $part (choose from: pretrain generation tests)"; STATUS=1 ;;
    esac
done
say "done (status $STATUS; work folder $WORK)"
exit $STATUS
