"""Step 2 benchmark: our BPE trainer against Hugging Face ``tokenizers``, our GPT-2 encoder against tiktoken.

Rows:

* ``train``: :meth:`BPETokenizer.train` against ``tokenizers``' ``BpeTrainer`` with the
  ``ByteLevel`` pre-tokenizer (GPT-2's regex, the 256-byte alphabet, one special token),
  same text, same vocabulary size. Targets: within 10x of Hugging Face on 1 MB at
  vocabularies of 1,000 and 5,000; under 1.5 s for a vocabulary of 500 on 100 KB.
* ``encode``: :class:`GPT2Tokenizer` against ``tiktoken``'s ``gpt2`` (``encode_ordinary``, one
  thread) on 1 MB. ``cold`` empties our pre-token cache before every run (a fresh
  tokenizer); ``warm`` encodes again with the cache filled. Target: cold within 20x.

Each figure is the best of ``--repeats`` runs, ours and the reference taking turns (robust
to other load on a shared machine). Text comes from the course's data registry.

Usage::

    python benchmarks/bench_tokenizers.py
    python benchmarks/bench_tokenizers.py --text gutenberg-2701 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import time

from course_lib.data import fetch
from course_lib.tokenizers import BPETokenizer, GPT2Tokenizer, tiktoken_gpt2

EOT = "<|endoftext|>"


def first_bytes(text: str, n: int) -> str:
    """The first ``n`` bytes of ``text`` (UTF-8), cut back to a whole character."""
    return text.encode("utf-8")[:n].decode("utf-8", errors="ignore")


def best_of(fns: dict, repeats: int) -> dict:
    """Minimum seconds of each zero-argument function; the functions take turns."""
    times = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(ts), results[name]) for name, ts in times.items()}


def hf_train(text: str, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="gutenberg-1184", help="registry name of the training text (default Monte Cristo)")
    p.add_argument("--encode-text", default="gutenberg-2701", help="registry name of the text to encode (default Moby Dick)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import tiktoken
    import tokenizers

    source = fetch(args.text, progress=False).read_text(encoding="utf-8")
    mb, kb100 = first_bytes(source, 1_000_000), first_bytes(source, 100_000)
    rows = []  # (task, ours s, reference s, ratio, target, ok, note)

    for text, label, vocab_size in ((mb, "1 MB", 1000), (mb, "1 MB", 5000), (kb100, "100 KB", 500)):
        r = best_of({"ours": lambda: BPETokenizer.train(text, vocab_size),
                     "hf": lambda: hf_train(text, vocab_size)}, args.repeats)
        (t_ours, ours), (t_hf, hf) = r["ours"], r["hf"]
        assert ours.vocab_size == hf.get_vocab_size() == vocab_size
        ratio = t_ours / t_hf
        if vocab_size == 500:
            target, ok = "< 1.5 s", t_ours < 1.5
        else:
            target, ok = "<= 10x", ratio <= 10
        rows.append((f"train BPE, {label}, vocab {vocab_size:,}", t_ours, t_hf, ratio, target, ok,
                     f"{len(ours.merges):,} merges each"))

    enc_text = first_bytes(fetch(args.encode_text, progress=False).read_text(encoding="utf-8"), 1_000_000)
    ours_tok, ref = GPT2Tokenizer.from_pretrained(), tiktoken_gpt2()

    def cold():
        ours_tok._cache.clear()
        return ours_tok.encode_ordinary(enc_text)

    r = best_of({"cold": cold, "ref": lambda: ref.encode_ordinary(enc_text)}, args.repeats)
    (t_cold, ids), (t_ref, ref_ids) = r["cold"], r["ref"]
    assert ids == ref_ids, "GPT2Tokenizer and tiktoken disagree"
    t_warm, _ = best_of({"warm": lambda: ours_tok.encode_ordinary(enc_text)}, args.repeats)["warm"]
    rows.append(("encode GPT-2, 1 MB, cold cache", t_cold, t_ref, t_cold / t_ref, "<= 20x", t_cold / t_ref <= 20,
                 f"{len(ids):,} tokens, same ids"))
    rows.append(("encode GPT-2, 1 MB, warm cache", t_warm, t_ref, t_warm / t_ref, "", True, ""))

    print(f"python {platform.python_version()}, tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}; "
          f"train text: {args.text}, encode text: {args.encode_text}; best of {args.repeats}")
    head = f"{'task':<34} {'ours s':>8} {'ref s':>8} {'ours/ref':>9}  {'target':<8} {'ok':<4} note"
    print(head)
    print("-" * len(head))
    for task, a, b, ratio, target, ok, note in rows:
        print(f"{task:<34} {a:>8.3f} {b:>8.3f} {ratio:>8.2f}x  {target:<8} {'yes' if ok else 'NO':<4} {note}")
    print("ref = Hugging Face tokenizers BpeTrainer (train) / tiktoken gpt2 (encode)")
    return 0 if all(row[5] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
