"""Step 8 — token shards: tokenize a corpus once, in parallel, then read windows through memory maps.

A long run reads the same tokens many times; tokenizing on the fly would cost more than the
model on small GPUs. So the corpus is encoded once into fixed-size files of ``uint16`` ids
(GPT-2's 50,257 ids fit in 16 bits: half the disk and page cache of ``int32``), and training
reads random windows from them through ``np.memmap``: the operating system pages in only the
bytes a batch touches, so a 10 GB corpus trains on a laptop with 8 GB of RAM.

**File format** (the layout of llm.c's GPT-2 token shards, ``dev/data/data_common.py``)::

    header   256 x int32 little-endian (1,024 bytes)
             [0] SHARD_MAGIC = 20240520   [1] SHARD_VERSION = 1   [2] number of tokens   [3:] 0
    tokens   number-of-tokens x uint16 little-endian

**Documents.** Every document is encoded with tiktoken's ``encode_ordinary`` and preceded by
the end-of-text token (50256 for GPT-2), so the model sees where one text ends and the next
begins. A source file is cut into documents at each ``<|endoftext|>`` (TinyStories); a file
without one is one document (a book). Documents are stripped; empty ones are dropped.

* :func:`write_shard` / :func:`read_shard` — one file (atomic write; header checked on read).
* :func:`write_shards` — documents to ``{split}_{i:06d}.bin`` files, encoded by worker processes.
* :func:`prepare_shards` — a registered corpus or ``.txt`` files to train/val shards + ``meta.json``
  (``course data shards NAME --out DIR``).
* :class:`ShardLoader` — ``(x, y)`` batches of random windows (training) or of windows in
  order (validation), disjoint across DDP ranks, resumable from ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data
from .checks import boolean, describe, integer, non_negative_int, positive_int, probability
from .config import get_device
from .files import atomic_write
from .tokenizers import ENDOFTEXT

__all__ = [
    "SHARD_MAGIC", "SHARD_VERSION", "HEADER_BYTES", "ShardError", "write_shard", "read_shard",
    "write_shards", "prepare_shards", "iter_documents", "source_files", "shard_files", "ShardLoader",
]

SHARD_MAGIC = 20240520  # llm.c's magic for GPT-2 token shards (the date it was introduced)
SHARD_VERSION = 1       # 1: uint16 ids, as in llm.c's GPT-2 shards
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKENS_PER_SHARD = 2**31 - 1  # the header's int32 count
_DTYPE = np.dtype("<u2")
_READ_CHARS = 1 << 22  # 4 Mi characters per read when splitting a source file into documents
_BATCH_CHARS = 1 << 18  # ~256K characters of documents per task sent to a worker
_FIX = "; write it again with course_lib.shards.prepare_shards (`course data shards NAME --out DIR`)"


class ShardError(ValueError):
    """A shard file that is not a valid token shard (wrong magic or version, truncated, too long).
    The message names the file and what is wrong."""


def _as_path(name: str, value) -> Path:
    """``value`` as an expanded :class:`~pathlib.Path`, if it is a ``str`` or ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (a str or pathlib.Path), got {describe(value)}")
    return Path(value).expanduser()


# --------------------------------------------------------------------------- #
# One shard
# --------------------------------------------------------------------------- #
def _as_uint16(tokens: np.ndarray | Sequence[int]) -> np.ndarray:
    not_ids = f"tokens must be a sequence of token ids (a list, numpy array or tensor), got {describe(tokens)}"
    if isinstance(tokens, (str, bytes)):
        raise TypeError(not_ids)
    try:
        arr = np.asarray(tokens)
    except ValueError:  # ragged nested lists
        raise ValueError("tokens must be a flat sequence of token ids, got nested lists of unequal lengths") from None
    if arr.ndim == 0:  # None, a number, a generator
        raise TypeError(not_ids)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional (a list of ids), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("tokens is empty: a shard holds at least one token")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integer token ids, got dtype {arr.dtype}")
    if arr.dtype != _DTYPE:
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 65535:
            bad = high if high > 65535 else low
            raise ValueError(f"token id {bad} does not fit in a uint16 shard (ids 0..65,535): a vocabulary of "
                             "more than 65,536 ids needs a wider format; use GPT-2's tokenizer (50,257 ids)")
        arr = arr.astype(_DTYPE)
    if arr.size > MAX_TOKENS_PER_SHARD:
        raise ValueError(f"{arr.size:,} tokens do not fit in one shard (at most {MAX_TOKENS_PER_SHARD:,})")
    return arr


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Sequence[int], *, overwrite: bool = False) -> Path:
    """Write one shard file atomically: the 1,024-byte header, then ``tokens`` as little-endian uint16.

    Args:
        path: the file to write (missing folders are created).
        tokens: ``[n]`` token ids, ``1 <= n <= 2**31 - 1``, each in ``0..65535``.
        overwrite: replace an existing file. Default ``False``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: empty or not 1-D, or an id outside ``0..65535`` (a vocabulary over 65,536 ids).
        TypeError: ids that are not integers, ``tokens`` not a sequence, ``path`` not a path.
        FileExistsError: ``path`` exists and ``overwrite`` is ``False``.
    """
    path, overwrite = _as_path("path", path), boolean("overwrite", overwrite)
    arr = _as_uint16(tokens)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)

    def write(out) -> None:
        out.write(header.tobytes())
        out.write(np.ascontiguousarray(arr).tobytes())

    return atomic_write(path, write, overwrite=overwrite)


def read_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map the tokens of one shard after checking its header against the file's size.

    Returns:
        a read-only ``np.memmap`` of ``[n]`` uint16 ids; nothing is read until it is indexed.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a folder.
        ShardError: (a ``ValueError``) shorter than the header, wrong magic number or version,
            no tokens, or a size that does not match the header's token count (truncated or too long).
    """
    path = _as_path("path", path)
    if path.is_dir():
        raise IsADirectoryError(f"token shard {path} is a folder; give a shard file inside it (e.g. "
                                f"{path / 'train_000000.bin'}), or give the folder to ShardLoader")
    if not path.is_file():
        raise FileNotFoundError(f"token shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"token shard {path} is truncated: {size:,} bytes, shorter than the "
                         f"{HEADER_BYTES:,}-byte header{_FIX}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path} is not a token shard: magic number {magic}, expected {SHARD_MAGIC}{_FIX}")
    if version != SHARD_VERSION:
        raise ShardError(f"token shard {path} has format version {version}; this course_lib reads version "
                         f"{SHARD_VERSION} (uint16 ids){_FIX}")
    expected = HEADER_BYTES + 2 * count
    if count <= 0:
        raise ShardError(f"token shard {path} holds no tokens (header count {count}){_FIX}")
    if size != expected:
        what = "truncated" if size < expected else "too long"
        raise ShardError(f"token shard {path} is {what}: its header says {count:,} tokens ({expected:,} bytes) "
                         f"but the file has {size:,} bytes{_FIX}")
    return np.memmap(path, dtype=_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


# --------------------------------------------------------------------------- #
# Encoding documents in worker processes
# --------------------------------------------------------------------------- #
def _encoding(tokenizer):
    """A tiktoken ``Encoding`` for ``tokenizer`` (a name, or an Encoding itself)."""
    import tiktoken

    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer
    if tokenizer == "gpt2":  # offline, from the data registry; the same ids as tiktoken's "gpt2"
        from .tokenizers import tiktoken_gpt2

        return tiktoken_gpt2()
    if not isinstance(tokenizer, str):
        raise TypeError(f"tokenizer must be a tiktoken encoding name such as 'gpt2' or a tiktoken.Encoding, "
                        f"got {type(tokenizer).__name__}")
    try:
        return tiktoken.get_encoding(tokenizer)
    except ValueError:
        names = ", ".join(tiktoken.list_encoding_names())
        raise ValueError(f"tokenizer {tokenizer!r} is not a tiktoken encoding ({names}); use 'gpt2'") from None
    except OSError as err:  # requests' ConnectionError: tiktoken downloads other encodings on first use
        raise OSError(f"tiktoken could not download the {tokenizer!r} encoding ({type(err).__name__}); connect to "
                      "the internet or set TIKTOKEN_CACHE_DIR to a folder holding it, or use 'gpt2' (built offline "
                      "from the course data)") from None


def _encode(texts: list[str], enc, eot: int | None) -> np.ndarray:
    """``[eot] + encode_ordinary(text)`` for each text, joined, as uint16 (one compact array per
    batch travels back from a worker cheaply)."""
    ids = []
    for text in texts:
        if eot is not None:
            ids.append(eot)
        ids += enc.encode_ordinary(text)
    return np.array(ids, dtype=_DTYPE)


_WORKER: dict[str, Any] = {}  # a worker process's encoding and end-of-text id, set once when it starts


def _init_worker(enc, eot: int | None) -> None:
    _WORKER["enc"], _WORKER["eot"] = enc, eot


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    return _encode(texts, _WORKER["enc"], _WORKER["eot"])


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _batches(documents: Iterable[str], chars: int = _BATCH_CHARS) -> Iterator[list[str]]:
    """Consecutive documents grouped into lists of about ``chars`` characters (a longer document alone)."""
    batch, size = [], 0
    for doc in documents:
        if not isinstance(doc, str):
            raise TypeError(f"documents must be texts (str), got {type(doc).__name__}")
        batch.append(doc)
        size += len(doc)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(documents: Iterable[str], enc, eot_id: int | None, workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(documents, ids)`` of consecutive batches of documents, in order. With ``workers > 1``,
    ``Pool.imap`` encodes the batches (each task one batch of ~256K characters: many short stories
    or one book); they are fed in blocks, two in flight, so a huge corpus is never queued whole."""
    batches = _batches(documents)
    if workers == 1:
        for batch in batches:
            yield len(batch), _encode(batch, enc, eot_id)
        return
    block = 4 * workers
    with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(enc, eot_id)) as pool:
        pending = None
        while chunk := list(itertools.islice(batches, block)):
            submitted = zip([len(b) for b in chunk], pool.imap(_encode_in_worker, chunk))
            if pending is not None:
                yield from pending
            pending = submitted
        if pending is not None:
            yield from pending


class _ShardWriter:
    """Fills one ``shard_tokens`` buffer and writes ``{split}_{i:06d}.bin`` each time it is full."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=_DTYPE)
        self.filled, self.tokens, self.paths = 0, 0, []

    def add(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < len(ids):
            take = min(self.shard_tokens - self.filled, len(ids) - pos)
            self.buf[self.filled:self.filled + take] = ids[pos:pos + take]
            self.filled, pos = self.filled + take, pos + take
            if self.filled == self.shard_tokens:
                self._flush()
        self.tokens += len(ids)

    def _flush(self) -> None:
        path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
        self.paths.append(write_shard(path, self.buf[:self.filled], overwrite=True))
        self.filled = 0

    def close(self) -> list[Path]:
        """Write the last, partial shard. Returns the paths written, in order."""
        if self.filled:
            self._flush()
        return self.paths


def _check_split(split: str) -> str:
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", split):
        raise ValueError(f"split must be a name of letters, digits and '-', such as 'train' or 'val'; got {split!r}")
    return split


def shard_files(directory: str | os.PathLike, split: str) -> list[Path]:
    """The ``{split}_NNNNNN.bin`` files in ``directory``, in order (an empty list if none, or no such folder).

    Raises:
        ValueError: ``split`` is not a name of letters, digits and ``-``.
        TypeError: ``directory`` is not a path.
    """
    directory, split = _as_path("directory", directory), _check_split(split)
    pattern = re.compile(rf"{re.escape(split)}_(\d{{6,}})\.bin")
    found = [(int(m.group(1)), p) for p in directory.glob(f"{split}_*.bin")
             if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _tokenizer_setup(tokenizer, eot: bool):
    enc = _encoding(tokenizer)
    if enc.n_vocab > 65536:
        raise ValueError(f"tokenizer {enc.name!r} has {enc.n_vocab:,} ids, more than the 65,536 a uint16 shard "
                         "can hold; use 'gpt2' (50,257 ids)")
    eot_id = None
    if eot:
        if ENDOFTEXT not in enc.special_tokens_set:
            raise ValueError(f"tokenizer {enc.name!r} has no {ENDOFTEXT} token; pass eot=False")
        eot_id = enc.eot_token
    return enc, eot_id


def write_shards(documents: Iterable[str], out_dir: str | os.PathLike, *, split: str = "train",
                 shard_tokens: int = 2**24, workers: int | None = None, tokenizer="gpt2", eot: bool = True,
                 progress: bool = True, overwrite: bool = False, total: int | None = None) -> list[Path]:
    """Encode ``documents`` and write them as ``{out_dir}/{split}_{i:06d}.bin`` shards.

    Every shard holds exactly ``shard_tokens`` tokens except the last; a document may run on
    from one shard into the next. ``workers`` processes encode (``Pool.imap``, order kept), so
    the files are byte-identical for any number of workers.

    Args:
        documents: texts, one per document (read lazily).
        out_dir: the folder (created if missing).
        split: the file-name prefix, e.g. ``"train"`` or ``"val"``.
        shard_tokens: tokens per file. Default ``2**24`` (16.8M tokens, 32 MiB).
        workers: encoding processes; ``None``: one per available CPU; ``1``: encode in this process.
        tokenizer: a tiktoken encoding name (``"gpt2"``, built offline from the registry) or a
            ``tiktoken.Encoding``; at most 65,536 ids.
        eot: put the end-of-text id before every document. Default ``True``.
        progress: show a tqdm progress bar (documents, with the token count).
        overwrite: replace this split's shards in ``out_dir`` (and delete its extra old ones). A
            ``meta.json`` there (:func:`prepare_shards`'), which describes the shards replaced, is
            removed when they are.
        total: the number of documents, for the progress bar only.

    The shards are written into a hidden folder inside ``out_dir`` and moved into place only once
    every document is encoded, so a run that fails or is interrupted leaves the split's earlier
    shards as they were (and no partial ones).

    Returns:
        the paths written, in order.

    Raises:
        FileExistsError: ``out_dir`` already holds shards of ``split`` and ``overwrite`` is ``False``.
        ValueError: bad ``split``/``shard_tokens``/``workers``/``total``; ``out_dir`` is a file; a tokenizer
            of more than 65,536 ids or without an end-of-text token (with ``eot``); documents that give no tokens.
        TypeError: ``documents`` not an iterable of str; a flag that is not ``True``/``False``.
    """
    from tqdm.auto import tqdm

    split = _check_split(split)
    shard_tokens = positive_int("shard_tokens", shard_tokens)
    if shard_tokens > MAX_TOKENS_PER_SHARD:
        raise ValueError(f"shard_tokens must be at most {MAX_TOKENS_PER_SHARD:,} (the header's int32), "
                         f"got {shard_tokens:,}")
    workers = _default_workers() if workers is None else positive_int("workers", workers)
    eot, overwrite, progress = boolean("eot", eot), boolean("overwrite", overwrite), boolean("progress", progress)
    total = integer("total", total, minimum=0, allow_none=True)
    if isinstance(documents, (str, bytes)):
        raise TypeError("documents must be an iterable of texts (e.g. a list of str), not one str; "
                        "wrap a single text as [text]")
    if not isinstance(documents, Iterable):
        raise TypeError(f"documents must be an iterable of texts (e.g. a list of str), got {describe(documents)}")
    out_dir = _as_path("out_dir", out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; give a folder for the shards")
    old = shard_files(out_dir, split)
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(old)} {split!r} shard(s) ({old[0].name}...); pass "
                              "overwrite=True to replace them, or choose another folder")
    enc, eot_id = _tokenizer_setup(tokenizer, eot)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{split}-writing-", dir=out_dir))   # same disk: moves are renames
    done = False
    try:
        writer = _ShardWriter(staging, split, shard_tokens)
        stream = _encoded(documents, enc, eot_id, workers)  # starts the pool before tqdm starts its thread
        with tqdm(total=total, unit="doc", desc=f"{split} shards", disable=not progress, leave=False) as bar:
            for n_docs, ids in stream:
                writer.add(ids)
                bar.update(n_docs)
                bar.set_postfix_str(f"{writer.tokens:,} tokens", refresh=False)
        if writer.tokens == 0:
            raise ValueError("documents gave no tokens: pass at least one non-empty text (or eot=True)")
        if old:                                # prepare_shards' description of the shards replaced
            (out_dir / "meta.json").unlink(missing_ok=True)
        paths = []
        for written in writer.close():
            os.replace(written, out_dir / written.name)
            paths.append(out_dir / written.name)
        for path in set(old) - set(paths):     # an earlier, longer run's last shards
            path.unlink(missing_ok=True)
        done = True
        return paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not done:                  # a failed first write leaves no empty folder behind
            with contextlib.suppress(OSError):
                out_dir.rmdir()


# --------------------------------------------------------------------------- #
# From a registered corpus or .txt files to train/val shards
# --------------------------------------------------------------------------- #
def source_files(source: str | os.PathLike, progress: bool = False) -> list[tuple[str, Path, str | None]]:
    """``(label, path, published sha256 or None)`` of every file of ``source``.

    ``source`` is a registered text name (``"tinystories-val"``, ``"the-verdict"``), ``"gutenberg"``
    (every ``gutenberg-*`` book), a ``.txt`` file, or a folder whose ``*.txt`` files are taken in
    name order. Registered files are fetched (cache, mirror or download, with a progress bar
    when ``progress``).

    Raises:
        ValueError: none of these (an empty string included), a registered file that is not text, or a
            folder without ``.txt`` files.
    """
    if isinstance(source, str) and (source == "gutenberg" or source in data.REGISTRY):
        names = ([e.name for e in data.entries() if e.name.startswith("gutenberg-")]
                 if source == "gutenberg" else [source])
        out = []
        for name in names:
            entry = data.get_entry(name)
            if entry.group != "text":
                raise ValueError(f"source {name!r} is a {entry.group} file, not a text corpus; see `course data list`")
            out.append((name, data.fetch(name, progress=progress), entry.sha256))
        return out
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a registered data name or a path, got {type(source).__name__}")
    if not str(source).strip():                     # Path("") is the working folder: every .txt in it
        raise ValueError("source is empty; give a registered text name (`course data list`), a .txt file or a "
                         "folder of them")
    path = Path(source).expanduser()
    if path.is_file():
        return [(path.name, path, None)]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"source folder {path} holds no .txt files")
        return [(p.name, p, None) for p in files]
    raise ValueError(f"source {str(source)!r} is neither a registered data name (`course data list`; or "
                     "'gutenberg' for all the books) nor a .txt file or a folder of them")


def _split_stream(fh, chars: int = _READ_CHARS) -> Iterator[str]:
    """The raw documents of an open text file, cut at each ``<|endoftext|>``, reading ``chars`` at a time.
    The current document is kept as a list of pieces, so one without separators costs linear time."""
    keep_back = len(ENDOFTEXT) - 1  # a separator may straddle two reads
    parts: list[str] = []
    carry = ""
    while chunk := fh.read(chars):
        pieces = (carry + chunk).split(ENDOFTEXT)
        if len(pieces) > 1:
            yield "".join(parts) + pieces[0]
            yield from pieces[1:-1]
            parts = []
        last = pieces[-1]
        cut = max(0, len(last) - keep_back)
        parts.append(last[:cut])
        carry = last[cut:]
    yield "".join(parts) + carry


def iter_documents(paths: Iterable[str | os.PathLike], chars: int = _READ_CHARS) -> Iterator[str]:
    """The documents of UTF-8 text files, streamed: each file is cut at ``<|endoftext|>`` (a file without
    one is one document), each piece stripped of surrounding whitespace, empty ones dropped.
    Line endings are kept as they are in the file.

    Args:
        paths: a list of text files (one file: ``[path]``).
        chars: characters read at a time. Default 4 Mi.

    Raises:
        TypeError: ``paths`` is one path rather than a list of them; an item that is not a path (an
            integer would be opened as a file descriptor), raised when it is reached.
        ValueError: ``chars`` is not a positive integer; a file that is not UTF-8.
        FileNotFoundError, IsADirectoryError: as ``open``.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"paths must be a list of text files, got the single path {str(paths)!r}; wrap it as [path]")
    return _documents(paths, positive_int("chars", chars))  # checked now, not at the first document


def _documents(paths: Iterable[str | os.PathLike], chars: int) -> Iterator[str]:
    for i, path in enumerate(paths):
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():   # open(3) reads file descriptor 3
            raise TypeError(f"paths[{i}] must be the path of a text file, got {path!r}")
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                for doc in _split_stream(fh, chars):
                    if doc := doc.strip():
                        yield doc
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err})") from None


def prepare_shards(source: str | os.PathLike, out_dir: str | os.PathLike, *, val_fraction: float = 0.05,
                   shard_tokens: int = 2**24, workers: int | None = None, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Tokenize a corpus with GPT-2's tokenizer into ``train_*.bin`` and ``val_*.bin`` shards and ``meta.json``.

    The validation split is the **last** ``val_fraction`` of the documents (at least one, and at least
    one left for training); a source of a single document (a book, The Verdict) is split by tokens
    instead. Either way it is never empty.

    Args:
        source: see :func:`source_files` (``"tinystories-val"``, ``"gutenberg"``, a ``.txt`` file or folder).
        out_dir: the folder to write; must be empty or new unless ``overwrite``.
        val_fraction: share of the corpus held out, ``0 < val_fraction < 1``. Default 0.05.
        shard_tokens, workers: as :func:`write_shards`.
        overwrite: write into a non-empty ``out_dir``: its ``meta.json`` is removed when writing starts
            (so an interrupted run leaves no ``meta.json``) and its train/val shards are replaced; other
            files are left alone.
        progress: show progress bars.

    Returns:
        the contents of ``meta.json`` (``source``, ``tokenizer``, ``eot_token``, ``shard_tokens``,
        ``split_by``, ``splits`` with ``files``/``tokens``/``documents`` per split, ``sources`` with
        each file's sha256 and size, ``format``) plus ``out_dir``, ``tokens`` and ``seconds``.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is ``False``.
        ValueError: a bad ``source``, ``val_fraction`` outside (0, 1), bad ``shard_tokens``/``workers``,
            ``out_dir`` is a file, a source with no text. These are checked before ``out_dir`` is touched.
        TypeError: ``val_fraction`` not a number, a flag that is not ``True``/``False``, a path that is not one.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    # every argument is checked before anything is fetched, read or deleted
    val_fraction = probability("val_fraction", val_fraction, strict=True, hint=" (0 < val_fraction < 1, e.g. 0.05)")
    if val_fraction == 0:
        raise ValueError("val_fraction must be above 0: the validation split is never empty; pass e.g. 0.05")
    shard_tokens = positive_int("shard_tokens", shard_tokens)
    if shard_tokens > MAX_TOKENS_PER_SHARD:
        raise ValueError(f"shard_tokens must be at most {MAX_TOKENS_PER_SHARD:,} (the header's int32), "
                         f"got {shard_tokens:,}")
    workers = None if workers is None else positive_int("workers", workers)
    overwrite, progress = boolean("overwrite", overwrite), boolean("progress", progress)
    out_dir = _as_path("out_dir", out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; give a folder for the shards")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {out_dir} is not empty; pass overwrite=True (--overwrite) to replace its "
                              "shards, or choose a new folder")
    sources = source_files(source, progress=progress)
    enc, eot_id = _tokenizer_setup("gpt2", True)
    paths = [p for _, p, _ in sources]
    opts = dict(shard_tokens=shard_tokens, workers=workers, progress=progress, overwrite=overwrite)

    n_docs = sum(1 for _ in tqdm(iter_documents(paths), desc="counting documents", unit="doc",
                                 disable=not progress, leave=False))
    if n_docs == 0:
        raise ValueError(f"source {source!r} holds no text")
    (out_dir / "meta.json").unlink(missing_ok=True)  # from here on: half-replaced shards never look complete
    if n_docs >= 2:
        split_by = "documents"
        n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
        docs = iter_documents(paths)
        train = write_shards(itertools.islice(docs, n_docs - n_val), out_dir, split="train",
                             total=n_docs - n_val, **opts)
        val = write_shards(docs, out_dir, split="val", total=n_val, **opts)
        doc_counts = {"train": n_docs - n_val, "val": n_val}
    else:  # one document: cut its tokens
        split_by = "tokens"
        ids = _encode([next(iter_documents(paths))], enc, eot_id)
        if len(ids) < 2:
            raise ValueError(f"source {source!r} is too short to split: {len(ids)} token(s)")
        cut = len(ids) - min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
            writer = _ShardWriter(out_dir, split, shard_tokens)
            writer.add(part)
            new = writer.close()
            for path in set(shard_files(out_dir, split)) - set(new):     # an earlier, longer run's
                path.unlink(missing_ok=True)
            written.append(new)
        train, val = written
        doc_counts = {"train": 1, "val": 1}

    def tokens(files):
        return sum(len(read_shard(f)) for f in files)

    meta = {
        "source": str(source),
        "tokenizer": enc.name,
        "eot_token": eot_id,
        "vocab_size": enc.n_vocab,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "split_by": split_by,
        "splits": {name: {"files": [p.name for p in files], "tokens": tokens(files), "documents": doc_counts[name]}
                   for name, files in (("train", train), ("val", val))},
        "sources": [{"name": label, "path": str(path), "bytes": path.stat().st_size,
                     "sha256": sha or data.sha256_of(path)} for label, path, sha in sources],
        "format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_bytes": HEADER_BYTES,
                   "dtype": "uint16 little-endian"},
    }
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(out_dir / "meta.json", lambda out: out.write(text.encode("utf-8")), overwrite=True)
    seconds = time.perf_counter() - started
    total_tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {**meta, "out_dir": str(out_dir), "tokens": total_tokens, "seconds": seconds}


# --------------------------------------------------------------------------- #
# Reading batches
# --------------------------------------------------------------------------- #
def _mix(*values: int) -> int:
    """A 63-bit seed from integers: batch ``i`` of rank ``r`` gets its own, independent stream."""
    digest = hashlib.blake2b(",".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShardLoader:
    """``(x, y)`` batches of windows from token shards, read through memory maps.

    A window is ``context_length + 1`` consecutive tokens; ``x`` is its first ``context_length``,
    ``y`` the same shifted by one. Windows stay inside one shard (a window across two shards
    would join two unrelated places of the corpus) unless ``cross_shard=True``, which treats
    the files as one stream.

    **Random** (``sequential=False``, training): each batch's start positions are drawn uniformly
    from a ``torch.Generator`` seeded by ``(seed, rank, batch index)``. Under DDP every shard (the
    whole stream with ``cross_shard``) is cut into ``world_size`` contiguous slices and rank ``r``
    draws windows lying wholly inside its own slices: ranks never see the same tokens, and
    every rank's batches follow from one integer (the batch index), the same on all ranks.

    **Sequential** (``sequential=True``, validation): windows at starts ``0, T, 2T, ...`` of each
    shard (their ``x`` do not overlap), grouped into batches in order; rank ``r`` takes global
    batches ``r, r + world_size, ...``. An incomplete last batch, and batches that would give the
    ranks unequal counts, are left out. ``iter(loader)`` yields one pass from the start (without
    moving ``next_batch``'s position); ``next_batch()`` goes on in order and starts again after the end.

    ``state_dict()`` holds the number of batches drawn, the settings and :attr:`fingerprint` (of
    the data); ``load_state_dict`` on a new loader (on any rank: rank 0's saved state resumes every
    rank) continues with exactly the batches the uninterrupted loader would have given.

    Args:
        directory_or_files: a folder of ``{split}_NNNNNN.bin`` shards, one shard file, or a list of
            shard files (``split`` unused for files).
        split: which files of the folder, e.g. ``"train"`` or ``"val"``.
        batch_size: windows per batch ``B``.
        context_length: tokens per window ``T`` (``x`` and ``y`` are ``[B, T]``).
        rank, world_size: this process's DDP rank and the number of processes. Default 0 and 1.
        seed: base seed of the random windows. Default 0.
        sequential: windows in order (validation) instead of random. Default ``False``.
        cross_shard: let windows run from one shard into the next. Default ``False``.
        device: where the batches go (``"cuda"``: pinned memory and a non-blocking copy). Default CPU.

    Raises:
        ValueError: a missing folder, no shards of ``split``, bad sizes or ranks, a device that is not
            one or is not on this machine, or shards too small for one window of ``context_length + 1``
            tokens (per rank) / for one batch (sequential).
        TypeError: a path that is not one, a seed or rank that is not an integer, a flag that is not a bool.
        ShardError: a damaged shard file; FileNotFoundError: a listed file that does not exist.
    """

    def __init__(self, directory_or_files, split: str = "train", *, batch_size: int, context_length: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, sequential: bool = False,
                 cross_shard: bool = False, device: str | torch.device | None = None):
        self.files = self._find(directory_or_files, split)
        self.batch_size = positive_int("batch_size", batch_size)
        self.context_length = positive_int("context_length", context_length)
        self.world_size = positive_int("world_size", world_size)
        self.rank = integer("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be below world_size ({self.world_size}), got {self.rank}")
        self.seed = integer("seed", seed)
        self.sequential, self.cross_shard = boolean("sequential", sequential), boolean("cross_shard", cross_shard)
        self.device = get_device(device) if device is not None else None  # a clear error for "gpu", or cuda without one
        self._shards = [read_shard(f) for f in self.files]  # memory maps: nothing read yet
        sizes = np.array([len(s) for s in self._shards], dtype=np.int64)
        digest = hashlib.blake2b(digest_size=8)
        for shard in self._shards:  # each shard's length, first and last 4,096 tokens: a few KB read
            digest.update(len(shard).to_bytes(8, "little"))
            digest.update(np.ascontiguousarray(shard[:4096]).tobytes())
            digest.update(np.ascontiguousarray(shard[-4096:]).tobytes())
        #: 16 hex digits of the shards' lengths and ends: the state of a loader over other data has another.
        self.fingerprint = digest.hexdigest()
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])  # global position of each shard's first token
        total = int(self._offsets[-1])
        bounds = self._offsets.tolist()
        streams = [(0, total)] if self.cross_shard else list(zip(bounds[:-1], bounds[1:]))  # windows stay inside one
        T, W = self.context_length, self.world_size
        if self.sequential:  # windows every T tokens; the last y token is the next x's first
            self._starts = np.array([a for a, _ in streams], dtype=np.int64)
            counts = np.array([max(0, (b - a - 1) // T) for a, b in streams], dtype=np.int64)
            self._stride = T
        else:  # rank r's slice of each stream; any start inside it whose window fits
            r = self.rank
            slices = [(a + r * (b - a) // W, a + (r + 1) * (b - a) // W) for a, b in streams]
            self._starts = np.array([a for a, _ in slices], dtype=np.int64)
            counts = np.array([max(0, b - a - T) for a, b in slices], dtype=np.int64)
            self._stride = 1
        self._cum = np.concatenate([[0], np.cumsum(counts)])  # windows before each stream
        self.num_windows = int(self._cum[-1])
        if self.num_windows == 0:
            per_rank = f" per rank (world_size={W})" if W > 1 and not self.sequential else ""
            if self.cross_shard:
                raise ValueError(f"a window of context_length + 1 = {T + 1:,} tokens does not fit in all shards "
                                 f"together{per_rank}: they hold {total:,} tokens; use a shorter context_length or "
                                 "more data")
            raise ValueError(f"a window of context_length + 1 = {T + 1:,} tokens does not fit in one shard{per_rank}: "
                             f"the largest shard holds {int(sizes.max()):,} tokens; use a shorter context_length, "
                             "larger shards (shard_tokens), or cross_shard=True")
        if self.sequential and self.num_batches == 0:
            raise ValueError(f"{self.num_windows:,} windows of {T:,} tokens make no batch of "
                             f"batch_size={self.batch_size}"
                             f"{f' on each of {W} ranks' if W > 1 else ''}; lower batch_size or context_length, or "
                             "hold out more validation data")
        self._step = 0

    @staticmethod
    def _find(directory_or_files, split: str) -> list[Path]:
        if isinstance(directory_or_files, (str, os.PathLike)):
            path = _as_path("directory_or_files", directory_or_files)
            if path.is_file():
                return [path]
            if not path.is_dir():
                raise ValueError(f"shard folder {path} does not exist; write shards first with "
                                 "course_lib.shards.prepare_shards (`course data shards NAME --out DIR`)")
            files = shard_files(path, _check_split(split))
            if not files:
                there = sorted({m.group(1) for p in path.glob("*.bin")
                                if (m := re.fullmatch(r"(.+)_\d{6,}\.bin", p.name))})
                have = f" (it has {', '.join(repr(s) for s in there)})" if there else ""
                raise ValueError(f"no {split!r} shards ({split}_000000.bin, ...) in {path}{have}")
            return files
        if not isinstance(directory_or_files, Iterable) or isinstance(directory_or_files, bytes):
            raise TypeError(f"directory_or_files must be a shard folder or a list of shard files, got "
                            f"{describe(directory_or_files)}")
        files = [_as_path("directory_or_files[i]", f) for f in directory_or_files]
        if not files:
            raise ValueError("directory_or_files is an empty list; give a shard folder or shard files")
        return files

    # ------------------------------------------------------------------ sizes
    @property
    def num_tokens(self) -> int:
        """Tokens in all the loader's files (every rank's)."""
        return int(self._offsets[-1])

    @property
    def num_batches(self) -> int:
        """Sequential: batches in one pass for this rank (equal on all ranks). Random: batches that hold
        as many tokens as this rank's share of the data (one "epoch")."""
        if self.sequential:
            return self.num_windows // self.batch_size // self.world_size
        return self.num_tokens // self.world_size // (self.batch_size * self.context_length)

    def __bool__(self) -> bool:  # ``if loader:`` must not ask a random loader for its length
        return True

    def __len__(self) -> int:
        if not self.sequential:
            raise TypeError("a random ShardLoader has no length (it draws forever); see num_batches")
        return self.num_batches

    # ---------------------------------------------------------------- batches
    def _window_starts(self, windows: np.ndarray) -> np.ndarray:
        """Global token positions of window indices ``[B]``."""
        stream = np.searchsorted(self._cum, windows, side="right") - 1
        return self._starts[stream] + (windows - self._cum[stream]) * self._stride

    def _read(self, start: int, n: int) -> np.ndarray:
        """``n`` tokens from global position ``start`` (across shard ends only where allowed)."""
        out, i = [], int(np.searchsorted(self._offsets, start, side="right")) - 1
        while n > 0:
            local = start - int(self._offsets[i])
            piece = self._shards[i][local:local + n]
            out.append(piece)
            n, start, i = n - len(piece), start + len(piece), i + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.context_length + 1
        buf = np.empty((len(windows), span), dtype=np.int64)  # [B, T + 1]
        for row, start in enumerate(self._window_starts(windows).tolist()):
            buf[row] = self._read(start, span)
        t = torch.from_numpy(buf)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()  # [B, T] each
        if self.device is not None and self.device.type != "cpu":
            pin = self.device.type == "cuda"
            x, y = ((v.pin_memory() if pin else v).to(self.device, non_blocking=pin) for v in (x, y))
        return x, y

    def _sequential_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (i * self.world_size + self.rank) * self.batch_size  # this rank's i-th batch, globally
        return self._batch(np.arange(first, first + self.batch_size, dtype=np.int64))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)``, two int64 tensors ``[batch_size, context_length]``."""
        i = self._step
        self._step += 1
        if self.sequential:
            return self._sequential_batch(i % self.num_batches)
        g = torch.Generator().manual_seed(_mix(self.seed, self.rank, i))
        windows = torch.randint(self.num_windows, (self.batch_size,), generator=g).numpy()
        return self._batch(windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential: one pass, from the first batch. Random: ``next_batch()`` forever."""
        if self.sequential:
            for i in range(self.num_batches):
                yield self._sequential_batch(i)
        else:
            while True:
                yield self.next_batch()

    # ----------------------------------------------------------------- resume
    _CHECKED = ("batch_size", "context_length", "num_tokens", "sequential", "cross_shard", "seed", "world_size")

    def state_dict(self) -> dict:
        """``{"batches": batches drawn so far, ...settings, "data": fingerprint}``: plain ints, bools
        and a str (safe for ``torch.load(weights_only=True)``), the same on every rank."""
        return {"batches": self._step, **{k: getattr(self, k) for k in self._CHECKED}, "data": self.fingerprint}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, of this loader or of rank 0's).

        Args:
            strict: refuse a state saved with other settings or data (exact resume would not hold).
                ``False`` takes only the batch count (e.g. to resume on another number of GPUs).

        Raises:
            ValueError: with ``strict``, a setting that differs or is missing (named, with both values),
                or shards with other contents (:attr:`fingerprint`); a state without a ``batches`` count >= 0.
            TypeError: ``strict`` is not ``True``/``False``.
        """
        strict = boolean("strict", strict)
        if not isinstance(state, dict) or "batches" not in state:
            raise ValueError(f"state must be a dict from ShardLoader.state_dict() (with a 'batches' count), got "
                             f"{describe(state)}")
        batches = non_negative_int("state['batches']", state["batches"], hint=" (from ShardLoader.state_dict())")
        if strict:
            for key in self._CHECKED:
                if key not in state:
                    raise ValueError(f"the loader state has no {key!r}, so it may come from other settings: exact "
                                     "resume needs a state from ShardLoader.state_dict() (pass strict=False to take "
                                     "only its batch count)")
                if state[key] != getattr(self, key):
                    raise ValueError(f"the loader state was saved with {key}={state[key]!r}, this loader has "
                                     f"{getattr(self, key)!r}: exact resume needs the same data and settings "
                                     "(pass strict=False to continue anyway)")
            # a state saved before loaders had a fingerprint has no "data": its settings were checked above
            if "data" in state and state["data"] != self.fingerprint:
                raise ValueError(f"the loader state was saved on other data: the shards hold as many tokens "
                                 f"({self.num_tokens:,}) but other ones (fingerprint {state['data']!r}, these "
                                 f"{self.fingerprint!r}); were they written again? Exact resume needs the shards "
                                 "the run started on (pass strict=False to continue anyway)")
        self._step = batches
