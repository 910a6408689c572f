"""Step 8 benchmark: the parallel shard writer against a single-process tiktoken pass.

Rows: :func:`course_lib.shards.write_shards` (encode every document, put the end-of-text id
before it, write uint16 shards to a temporary folder) with ``--workers`` processes, against
the reference: one process calling tiktoken's ``gpt2`` ``encode_ordinary`` on the same
documents (no files written). Speeds are tokens per second, each the best of ``--repeats``
runs, the contestants taking turns. Checks before timing: the shards hold exactly the
reference's ids (with the end-of-text ids), and every worker count writes byte-identical files.

Documents: ``--corpus gutenberg`` (default; 15 books, 13 MB) takes one document per book;
a corpus with fewer documents than four per worker (``tinystories-val`` is one file without
``<|endoftext|>``) is cut at blank lines (``--split paragraphs``, chosen by ``auto``), since
the writer parallelises over documents.

Target (issue 14): the writer scales with workers: with N workers at least 0.7 x N times
the speed of one worker (on a machine with N free cores).

Usage::

    python benchmarks/bench_shards.py
    python benchmarks/bench_shards.py --corpus tinystories-val --workers 1,2,4 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from course_lib.shards import iter_documents, read_shard, shard_files, source_files, write_shards
from course_lib.tokenizers import tiktoken_gpt2

EOT_ID = 50256


def documents(corpus: str, split: str, max_workers: int) -> tuple[list[str], str]:
    docs = list(iter_documents(p for _, p, _ in source_files(corpus)))
    if split == "paragraphs" or (split == "auto" and len(docs) < 4 * max_workers):
        docs = [p.strip() for d in docs for p in d.split("\n\n") if p.strip()]
        return docs, "paragraphs"
    return docs, "documents"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="gutenberg",
                   help="registered text name, 'gutenberg' (all the books), or a .txt file/folder (default gutenberg)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-tokens", type=int, default=2**20, help="tokens per shard (default 2**20)")
    p.add_argument("--split", choices=("auto", "documents", "paragraphs"), default="auto",
                   help="documents as the corpus gives them, or cut at blank lines (auto: when too few)")
    args = p.parse_args(argv)
    workers = sorted({int(w) for w in args.workers.split(",")})
    if 1 not in workers:
        workers = [1] + workers  # the baseline of the scaling target

    import tiktoken

    docs, unit = documents(args.corpus, args.split, max(workers))
    enc = tiktoken_gpt2()  # the same ids as tiktoken.get_encoding("gpt2"), offline
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)

    def reference():
        return sum(len(enc.encode_ordinary(d)) + 1 for d in docs)  # + 1: the end-of-text id per document

    root = tempfile.mkdtemp(prefix="bench_shards_")
    try:
        def ours(n):
            out = os.path.join(root, f"w{n}")
            shutil.rmtree(out, ignore_errors=True)
            return write_shards(docs, out, shard_tokens=args.shard_tokens, workers=n, progress=False)

        # correctness first: identical files for every worker count, the reference's ids inside
        want = np.array([i for d in docs for i in [EOT_ID] + enc.encode_ordinary(d)], dtype=np.uint16)
        files = {n: [f.read_bytes() for f in ours(n)] for n in workers}
        assert all(files[n] == files[1] for n in workers), "worker counts wrote different shards"
        got = np.concatenate([np.asarray(read_shard(f)) for f in shard_files(os.path.join(root, "w1"), "train")])
        assert np.array_equal(got, want), "the shards do not hold tiktoken's ids"
        n_tokens = len(want)

        times = {n: [] for n in workers}
        ref_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            assert reference() == n_tokens
            ref_times.append(time.perf_counter() - t0)
            for n in workers:
                t0 = time.perf_counter()
                ours(n)
                times[n].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ref_speed = n_tokens / min(ref_times)
    one = n_tokens / min(times[1])
    print(f"python {platform.python_version()}, tiktoken {tiktoken.__version__}, {os.cpu_count()} CPUs; corpus "
          f"{args.corpus}: {len(docs):,} {unit}, {n_bytes / 1e6:.1f} MB, {n_tokens:,} tokens; shards of "
          f"{args.shard_tokens:,} tokens; best of {args.repeats}")
    head = (f"{'task':<36} {'tokens/s':>11} {'ref tokens/s':>13} {'ours/ref':>9} {'vs 1 worker':>12}  "
            f"{'target':<14} ok")
    print(head)
    print("-" * len(head))
    ok_all = True
    for n in workers:
        speed = n_tokens / min(times[n])
        scale = speed / one
        if n == 1:
            target, ok = "", True
        else:
            target, ok = f">= {0.7 * n:.1f}x of 1", scale >= 0.7 * n
        ok_all &= ok
        print(f"{f'write_shards, workers={n}':<36} {speed:>11,.0f} {ref_speed:>13,.0f} {speed / ref_speed:>8.2f}x "
              f"{scale:>11.2f}x  {target:<14} {'yes' if ok else 'NO'}")
    print("ref = tiktoken gpt2 encode_ordinary, one process, same documents, no files written")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
