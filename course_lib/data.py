"""The data registry: every file the course uses, and one way to get it.

Cross-cutting (imports nothing from the steps). Each :class:`DataFile` names a
file, where it comes from (upstream URLs, a backup where one exists), its
sha256, size and license. :func:`fetch` turns a name into a local path:

1. the **cache** (``data/`` in a course checkout, or ``$COURSE_DATA_DIR``):
   a file already there and verified is returned at once;
2. a **mirror** folder (``$COURSE_DATA_MIRROR`` or ``mirror=``), laid out like
   the cache: a classroom share, a USB stick, CI's staged copy. A verified file
   there is copied into the cache (or, when the cache cannot be written, returned
   where it is);
3. a **download** from each URL in turn, with a progress bar, checked against
   the sha256 before it is moved into place.

Every write goes through :func:`course_lib.files.atomic_write`: a temporary
``.part`` file in the destination folder, renamed over the target only once it has
been verified, so an interrupted or corrupt download never replaces a good file and
never leaves a half-written one behind (the ``.part`` file of a download that was
killed outright is removed by the next fetch of that file).

Decisions:

* Files whose sha256 nobody publishes (``sha256=None``) are **pinned on first
  download**: the first verified copy's sha256 is written beside it as
  ``<file>.sha256`` (``sha256sum`` format), and every later use of that copy (and any
  re-download into that place) is checked against it; ``fetch`` says so. Until then
  such a file is checked by its size only (where known). We never invent a checksum:
  delete the ``.sha256`` file to accept a new upstream version.
* ``course data fetch --all`` skips entries marked ``optional`` (GPT-2 large and
  XL, 3.3 GB and 6.4 GB; TinyStories' 2.2 GB training file); fetch them by name.
* The Gutenberg books are registered at the exact bytes of a pinned Git commit
  (the copies the course was built with); gutenberg.org's own copies carry a
  BOM and CRLF endings and so a different checksum.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .checks import boolean, finite_number
from .files import atomic_write, scratch_file
from .paths import find_course_root, writable_problem

__all__ = [
    "DataFile",
    "DataFetchError",
    "REGISTRY",
    "register",
    "get_entry",
    "fetch",
    "status",
    "file_problem",
    "default_cache_dir",
    "default_mirror",
    "sha256_of",
    "read_text",
    "entries",
    "pin_path",
]

_CHUNK = 1 << 20  # 1 MiB


class DataFetchError(RuntimeError):
    """A registered file could not be obtained from the cache, the mirror or any URL.

    ``str(err)`` is the full explanation; ``err.summary`` is one line (for listings).
    """

    def __init__(self, message: str, summary: str = ""):
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]


@dataclass(frozen=True)
class DataFile:
    """One registered file.

    Attributes:
        name: the registry key, e.g. ``"the-verdict"``.
        path: where it lives, relative to the cache (and to a mirror).
        urls: upstream URL first, then backups.
        sha256: hex digest of the file's bytes, or ``None`` where nobody publishes one.
        size: size in bytes, or ``None`` where unknown.
        license: a short license statement.
        description: one line for ``course data list``.
        archive_member: set when the URLs serve a zip archive: the member to extract
            (``sha256``/``size`` then describe the member, not the zip).
        group: ``"text"``, ``"tokenizer"`` or ``"weights"``.
        optional: left out of ``course data fetch --all``.
    """

    name: str
    path: str
    urls: tuple[str, ...]
    sha256: str | None
    size: int | None
    license: str
    description: str
    archive_member: str | None = None
    group: str = "text"
    optional: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)


REGISTRY: dict[str, DataFile] = {}


def register(entry: DataFile) -> DataFile:
    """Add ``entry`` to :data:`REGISTRY` (a name may be registered once)."""
    if not isinstance(entry, DataFile):
        raise TypeError(f"entry must be a DataFile, got {type(entry).__name__}")
    if entry.name in REGISTRY:
        raise ValueError(f"a data file named {entry.name!r} is already registered")
    REGISTRY[entry.name] = entry
    return entry


# --------------------------------------------------------------------------- #
# The course's files
# --------------------------------------------------------------------------- #
_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
_OPENAI_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2"

register(DataFile(
    "the-verdict", "the-verdict.txt",
    (f"{_RASBT}/ch02/01_main-chapter-code/the-verdict.txt",),
    "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", 20479,
    "public domain (Edith Wharton, 1908)",
    "The Verdict: a 20 KB short story, the course's first corpus",
))
register(DataFile(
    "sms-spam", "sms_spam_collection/SMSSpamCollection",
    ("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
     "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"),
    "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d", 477907,
    "CC BY 4.0 (Almeida, Gómez Hidalgo & Yamakami, DocEng'11)",
    "SMS Spam Collection v.1: 5,574 labelled messages (4,827 ham, 747 spam)",
    archive_member="SMSSpamCollection",
))
register(DataFile(
    "sms-spam-readme", "sms_spam_collection/readme",
    ("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
     "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"),
    "8753cd2d3cab68f80c8257851b8c2037778c267f55accb6fd1b5a2e32d36a84e", 5868,
    "CC BY 4.0", "the SMS Spam Collection's own readme and license",
    archive_member="readme",
))
register(DataFile(
    "instruction-data", "instruction-data.json",
    (f"{_RASBT}/ch07/01_main-chapter-code/instruction-data.json",),
    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", 203524,
    "Apache-2.0 (rasbt/LLMs-from-scratch)",
    "1,100 Alpaca-style instruction/input/output examples",
))
register(DataFile(
    "gpt2-encoder", "encoder.json",
    (f"{_OPENAI_GPT2}/encodings/main/encoder.json", f"{_OPENAI_GPT2}/models/124M/encoder.json"),
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", 1042301,
    "OpenAI GPT-2 modified MIT license", "GPT-2's BPE vocabulary: 50,257 token -> id entries",
    group="tokenizer",
))
register(DataFile(
    "gpt2-vocab-bpe", "vocab.bpe",
    (f"{_OPENAI_GPT2}/encodings/main/vocab.bpe", f"{_OPENAI_GPT2}/models/124M/vocab.bpe"),
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", 456318,
    "OpenAI GPT-2 modified MIT license", "GPT-2's 50,000 BPE merges",
    group="tokenizer",
))
register(DataFile(
    "tiny-shakespeare", "input.txt",
    ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1115394,
    "public domain text; char-rnn repository MIT", "Tiny Shakespeare: 1.1 MB of plays",
))

_TINYSTORIES = (
    ("tinystories-sample", "tinystories/tinystories_sample.txt",
     "https://raw.githubusercontent.com/stanford-cs336/assignment1-basics/"
     "25a8a49f6460c83a30416d42348f2ef11d1dd185/tests/fixtures/tinystories_sample.txt",
     "defaedb58bf28079f3e29c6142cb7f3568d331a577e0911c5d7925c465c50c43", 3794,
     "TinyStories sample: 5 stories separated by <|endoftext|> (test fixture)"),
    ("tinystories-val", "tinystories/tinystories_val.txt",
     "https://raw.githubusercontent.com/yuninxia/moe-routing-bench/"
     "6877be50c1c389c73047d7f27104bee6a995efd6/data/tinystories_val.txt",
     "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6", 794375,
     "TinyStories validation prefix: 795 KB of simple English stories"),
)
for _name, _path, _url, _sha, _size, _desc in _TINYSTORIES:
    register(DataFile(_name, _path, (_url,), _sha, _size,
                      "CDLA-Sharing-1.0 (Eldan & Li, 2023)", _desc))
# The full training file for the gpu recipe (step 8). Hugging Face publishes neither its sha256
# nor its exact size for this path, so it is pinned on first download (see the module docstring).
register(DataFile(
    "tinystories-train", "tinystories/TinyStoriesV2-GPT4-train.txt",
    ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",),
    None, None, "CDLA-Sharing-1.0 (Eldan & Li, 2023)",
    "TinyStories V2 (GPT-4) training file, about 2.2 GB (the gpu recipe); no published sha256: "
    "pinned on first download",
    optional=True,
))

_GUTENBERG_COMMIT = "https://raw.githubusercontent.com/vyjayanv-hub/112_TP_Vasudevan/f983423acfbf1acaf7d7d92f78fdb56bc7ef31fa"
#: (ebook number, title, size, sha256): Project Gutenberg editions with header and footer.
GUTENBERG_BOOKS = (
    (1184, "The Count of Monte Cristo", 2725443, "0e88c3611e45bb7c4bc329c71cd018eea39b6c489b565835de8d2daeccf35793"),
    (1342, "Pride and Prejudice", 757470, "bf72b178d84c65c7669ef3273d9144c526998ceb972878c1835b2200305d19fd"),
    (1400, "Great Expectations", 1037423, "7cf356c42833ed45bf31bcb19bc77e9517a30914a37bea3970c133be4716b2f7"),
    (1513, "Romeo and Juliet", 163852, "c57b24e231f122d62ca067852c7dc5ced93de6547a19c79405ee7f3a950c165d"),
    (175, "The Phantom of the Opera", 494039, "fce5d43a7d5659e8f013aab751af80f5ef1a632d83bcc58b8382a07286efbcc2"),
    (20203, "Autobiography of Benjamin Franklin", 458869, "21e0603fb09ee4acb9dcc3e3cff35975229f1c404308fb197980c145b635116e"),
    (25344, "The Scarlet Letter", 517217, "71124f8d7e9bba090110350b0959ae8be3c25ddbe5f96da14ea3e918d7e567ea"),
    (2701, "Moby Dick", 1253948, "fb259a942dd7dad856d6093c4d4090acb782a6e3d37b6d843c0e0c962ac5f06e"),
    (28054, "The Brothers Karamazov", 2001519, "bc9822d548dd114be7d5b0f9642a9ab4ee1b3788f207a53a8bdadef942ab01f2"),
    (345, "Dracula", 874494, "9017c5102ad39d704b0a37d241b898bc0aaae2955e7123bc4569b68fca5e087c"),
    (514, "Little Women", 1050214, "454c8f25f9420540799c95d3120d354255ba13e85757953690a28cfee1e54dad"),
    (64317, "The Great Gatsby", 299767, "3865269180ab760c1ddcae0bd540c8c2ce2824fc8d7a556721f1ab8d68b3434b"),
    (84, "Frankenstein", 441143, "905e38dc26f492e18269229eb14edf2166760e17df1dc59c7fcb3be1f945c364"),
    (844, "The Importance of Being Earnest", 137570, "7ff0fddbb49c58bec65bf2d21c2b2b438dd0de6dd4ed9f5e8561345547782943"),
    (98, "A Tale of Two Cities", 790969, "5b0e73de2d968f6c978ed15315d868fbe78d01e61c797404872e689af76a36cc"),
)
for _num, _title, _size, _sha in GUTENBERG_BOOKS:
    register(DataFile(
        f"gutenberg-{_num}", f"gutenberg/pg{_num}.txt", (f"{_GUTENBERG_COMMIT}/pg{_num}.txt",),
        _sha, _size, "public domain in the USA (Project Gutenberg License)",
        f"{_title} (Project Gutenberg #{_num})",
        extra={"gutenberg_url": f"https://www.gutenberg.org/cache/epub/{_num}/pg{_num}.txt"},
    ))

# GPT-2 weights in Hugging Face's safetensors layout. Checksums are the ones the hub
# publishes (LFS pointers) for the pinned revision.
_GPT2_WEIGHTS = (
    # name, hub repo, revision, size, sha256, optional
    ("gpt2", "openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e", 548105171,
     "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707", False),
    ("gpt2-medium", "openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da", 1519984962,
     "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd", False),
    ("gpt2-large", "openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519", 3247159078,
     "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce", True),
    # The hub shows "6.43 GB" for XL but no exact byte count was found: checked by sha256 only.
    ("gpt2-xl", "openai-community/gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2", None,
     "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a", True),
)
_LABEL = {"gpt2": "small (124M)", "gpt2-medium": "medium (355M)", "gpt2-large": "large (774M)", "gpt2-xl": "XL (1.5B)"}
for _name, _repo, _rev, _size, _sha, _optional in _GPT2_WEIGHTS:
    register(DataFile(
        f"{_name}-weights", f"gpt2/{_name}/model.safetensors",
        (f"https://huggingface.co/{_repo}/resolve/{_rev}/model.safetensors",),
        _sha, _size, "OpenAI GPT-2 modified MIT license",
        f"GPT-2 {_LABEL[_name]} weights (Hugging Face safetensors)",
        group="weights", optional=_optional, extra={"hub_repo": _repo, "revision": _rev},
    ))


# --------------------------------------------------------------------------- #
# Where files live
# --------------------------------------------------------------------------- #
def default_cache_dir() -> Path:
    """``$COURSE_DATA_DIR``, else ``data/`` in the course checkout, else ``~/.cache/llm-sovereignty``."""
    env = os.environ.get("COURSE_DATA_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    root = find_course_root()
    if root is not None:
        return root / "data"
    return Path.home() / ".cache" / "llm-sovereignty"


def default_mirror() -> Path | None:
    """``$COURSE_DATA_MIRROR`` as a path, or ``None`` when it is not set."""
    env = os.environ.get("COURSE_DATA_MIRROR", "").strip()
    return Path(env).expanduser() if env else None


def get_entry(name: str | DataFile, registry: dict[str, DataFile] | None = None) -> DataFile:
    """Look up a registered file by name.

    Raises:
        ValueError: the name is not registered; the message lists close matches.
    """
    if isinstance(name, DataFile):
        return name
    registry = REGISTRY if registry is None else registry
    if not isinstance(name, str):
        raise TypeError(f"name must be a registered file name (str), got {type(name).__name__}")
    if name not in registry:
        import difflib

        close = difflib.get_close_matches(name, list(registry), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"no data file named {name!r} is registered{hint} "
                         f"(`course data list` shows them all)")
    return registry[name]


# --------------------------------------------------------------------------- #
# Verification
# --------------------------------------------------------------------------- #
def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pin_path(path: str | os.PathLike) -> Path:
    """Where the sha256 of a file without a published checksum is pinned: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


#: What :func:`_pinned` returns for a pin file that is there but holds no sha256.
_DAMAGED_PIN = "damaged"


def _pinned(path: Path) -> str | None:
    """The sha256 pinned beside ``path`` (first word of ``<path>.sha256``), ``None`` when there is
    no pin file, or :data:`_DAMAGED_PIN` when it is there but holds no sha256 (never replaced
    by the hash of whatever copy is there now: that would accept a damaged copy)."""
    pin = pin_path(path)
    if not pin.exists():
        return None
    try:
        words = pin.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return _DAMAGED_PIN
    ok = words and len(words[0]) == 64 and all(c in "0123456789abcdef" for c in words[0].lower())
    return words[0].lower() if ok else _DAMAGED_PIN


def _pin(path: Path, entry: DataFile) -> None:
    """Record the sha256 of a verified copy of a file that has no published one (first use only)."""
    if entry.sha256 is not None or _pinned(path) is not None:
        return
    line = f"{sha256_of(path)}  {path.name}\n".encode("ascii")
    try:
        atomic_write(pin_path(path), lambda out: out.write(line), overwrite=True)
    except OSError:  # a read-only copy (a mirror read in place) stays unpinned
        pass


def _check(path: Path, entry: DataFile, verify: bool = True, pinned_at: Path | None = None) -> str | None:
    """``None`` if ``path`` holds ``entry``'s bytes, else the reason it does not.
    With ``verify=False`` only the size is compared. Without a published sha256 the one
    pinned beside ``pinned_at`` (default ``path``) is used, if any."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return f"size {size:,} bytes, expected {entry.size:,}"
    expected, note = entry.sha256, ""
    if expected is None:
        expected = _pinned(pinned_at or path)
        note = f" (pinned in {pin_path(pinned_at or path)} at first download; delete it to accept a new version)"
        if verify and expected == _DAMAGED_PIN:
            return (f"its pin file {pin_path(pinned_at or path)} is damaged (it holds no sha256), so the copy "
                    "cannot be checked; delete the pin file to accept the copy there as it is")
    if verify and expected is not None:
        got = sha256_of(path)
        if got != expected:
            return f"sha256 {got[:16]}..., expected {expected[:16]}...{note}"
    return None


def file_problem(path: str | os.PathLike, name: str | DataFile, verify: bool = True) -> str | None:
    """Why the file at ``path`` is not the registered file ``name``, or ``None`` if it is.

    Args:
        path: any file (a cached copy, a mirror's copy).
        name: a registered name or :class:`DataFile`.
        verify: compare the sha256 too (default); ``False`` compares the size only.

    Returns:
        ``None``, ``"missing"``, or the size or checksum that differs.

    Raises:
        ValueError: ``name`` is not registered.
    """
    return _check(Path(path), get_entry(name), verify)


def _cache_label(cache_dir) -> str:
    """How the user set the cache folder, for error messages."""
    if cache_dir is not None:
        return "cache_dir (--cache)"
    return "COURSE_DATA_DIR" if os.environ.get("COURSE_DATA_DIR", "").strip() else "the data folder"


def _copy_from(src: Path):
    """A writer for :func:`~course_lib.files.atomic_write` that copies ``src``."""
    def write(out) -> None:
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, _CHUNK)
    return write


# --------------------------------------------------------------------------- #
# Downloading
# --------------------------------------------------------------------------- #
class _Rejected(Exception):
    """A download arrived whole but is not the registered file (wrong size or sha256)."""


def _verifier(entry: DataFile, target: Path):
    """A ``check`` for :func:`~course_lib.files.atomic_write`: refuse bytes that are not ``entry``'s
    (or, without a published sha256, not those pinned for ``target``)."""
    def check(path: Path) -> None:
        problem = _check(path, entry, pinned_at=target)
        if problem is not None:
            raise _Rejected(problem)
    return check


def _download(url: str, out, label: str, progress: bool, timeout: float) -> None:
    """Stream ``url`` into the binary file ``out``.

    Raises ``OSError`` subclasses (HTTPError, URLError, timeouts) or ``http.client``
    exceptions (IncompleteRead: fewer bytes than ``Content-Length`` promised) on failure.
    """
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "course-lib (LLM Sovereignty Stack)"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  disable=not progress, leave=False) as bar:
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise http.client.IncompleteRead(b"", total - received)


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
        if isinstance(reason, socket.gaierror):
            return f"no network (cannot resolve host: {reason})"
        return f"cannot connect ({reason})"
    if isinstance(err, http.client.IncompleteRead):
        return f"connection dropped mid-file ({len(err.partial)} bytes then {err.expected} missing)"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(err, (ConnectionError, http.client.HTTPException)):
        return f"connection dropped mid-file ({type(err).__name__}: {err})"
    return f"{type(err).__name__}: {err}"


def _extract_member(archive: Path, member: str):
    """A writer for :func:`~course_lib.files.atomic_write` that copies ``member`` out of the zip ``archive``.

    Raises ``zipfile.BadZipFile`` for a file that is not a zip or lacks the member."""
    def write(out) -> None:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise zipfile.BadZipFile(f"archive has no member {member!r}")
            with zf.open(names[0]) as src:
                shutil.copyfileobj(src, out, _CHUNK)
    return write


def _fetch_from(url: str, entry: DataFile, target: Path, progress: bool, timeout: float) -> None:
    """Download ``url`` (and extract ``entry.archive_member``) into ``target``, verified before the rename."""
    label = target.name
    if entry.archive_member is None:
        atomic_write(target, lambda out: _download(url, out, label, progress, timeout), overwrite=True,
                     check=_verifier(entry, target), suffix=".part")
        return
    with scratch_file(target) as archive:  # the zip itself is never kept
        with open(archive, "wb") as out:
            _download(url, out, label, progress, timeout)
        atomic_write(target, _extract_member(archive, entry.archive_member), overwrite=True,
                     check=_verifier(entry, target), suffix=".part")


# --------------------------------------------------------------------------- #
# fetch
# --------------------------------------------------------------------------- #
def fetch(name: str | DataFile, *, cache_dir: str | os.PathLike | None = None,
          mirror: str | os.PathLike | None = None, registry: dict[str, DataFile] | None = None,
          progress: bool = True, timeout: float = 30.0, verbose: bool = False) -> Path:
    """Return a local, verified path to the registered file ``name``.

    Looks in the cache, then in the mirror, then downloads (see the module docstring).

    Args:
        name: a key of :data:`REGISTRY` (or a :class:`DataFile`).
        cache_dir: where files are kept; default :func:`default_cache_dir`.
        mirror: a folder laid out like the cache; default ``$COURSE_DATA_MIRROR``.
        registry: look ``name`` up here instead of :data:`REGISTRY` (tests use this).
        progress: show a progress bar while downloading.
        timeout: seconds to wait on a silent connection.
        verbose: print where the file came from.

    Returns:
        the cached copy; or the mirror's verified copy itself when the cache cannot be
        written (``COURSE_DATA_DIR`` read-only, or a file).

    Raises:
        ValueError: unknown name; ``mirror`` is not a folder; ``cache_dir`` or ``mirror`` an empty
            string (it would be the working folder); a ``timeout`` that is not a positive number;
            or the file has to be downloaded and the cache folder cannot be written (the message
            says which folder).
        TypeError: ``progress`` or ``verbose`` not ``True``/``False``.
        DataFetchError: no source gave the right bytes; the message names the file,
            every URL tried and why it failed, and how to stage the file by hand.
    """
    entry = get_entry(name, registry)
    progress, verbose = boolean("progress", progress), boolean("verbose", verbose)
    timeout = finite_number("timeout", timeout, positive=True, hint=" (seconds to wait on a silent connection)")
    cache, mirror_dir = _folders(cache_dir, mirror)
    if mirror_dir is not None and not mirror_dir.is_dir():
        raise ValueError(f"mirror folder {str(mirror_dir)!r} does not exist; point COURSE_DATA_MIRROR "
                         f"(or --mirror) at the folder that holds the course's data, or unset it to download")
    target = cache / entry.path
    say = print if verbose else (lambda *a, **k: None)

    cached_problem = _check(target, entry)
    if cached_problem is None:
        _pin(target, entry)
        return target

    if mirror_dir is not None:
        candidate = mirror_dir / entry.path
        problem = _check(candidate, entry)
        if problem is None:
            if candidate.resolve() == target.resolve():
                return target
            try:
                atomic_write(target, _copy_from(candidate), overwrite=True, suffix=".part")
            except OSError as err:  # a read-only or misdirected cache: the verified copy serves as it is
                say(f"{entry.name}: cannot write {target} ({err.strerror or err}); reading the mirror's copy in place")
                return candidate
            _pin(target, entry)
            say(f"{entry.name}: copied from mirror {candidate}")
            return target
        mirror_note = f"mirror {candidate}: {problem}"
    else:
        mirror_note = "no mirror set (COURSE_DATA_MIRROR)"

    cache_issue = writable_problem(target.parent)
    if cache_issue is not None:
        raise ValueError(
            f"cannot fetch {entry.name!r}: {_cache_label(cache_dir)} {target.parent} {cache_issue}. Point "
            "COURSE_DATA_DIR (or --cache) at a folder you can write, or set COURSE_DATA_MIRROR to a folder that "
            "holds the course's data (it is then read in place)")

    failures: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    for url in entry.urls:
        try:
            _fetch_from(url, entry, target, progress, timeout)
        except _Rejected as err:
            failures.append(f"{url}: downloaded file rejected, {err}")
            continue
        except zipfile.BadZipFile as err:
            failures.append(f"{url}: not a usable zip archive ({err})")
            continue
        except (OSError, http.client.HTTPException) as err:
            failures.append(f"{url}: {_describe(err)}")
            continue
        if entry.sha256 is None:
            _pin(target, entry)
            say(f"{entry.name}: no published sha256; pinned this copy's in {pin_path(target)}, "
                "later uses are checked against it")
        say(f"{entry.name}: downloaded from {url}")
        return target

    lines = [f"could not fetch {entry.name!r} ({entry.description}).",
             f"  cache {target}: {cached_problem}", f"  {mirror_note}"]
    lines += [f"  {f}" for f in failures]
    checksum = f"sha256 {entry.sha256}" if entry.sha256 else "its size" + (f" ({entry.size} bytes)" if entry.size else "")
    lines.append(
        "To stage it by hand: on a machine with internet, download "
        f"{entry.urls[0]}{' and extract ' + repr(entry.archive_member) if entry.archive_member else ''}, "
        f"check {checksum}, and save it as {target} — or put it at <mirror>/{entry.path} and set "
        "COURSE_DATA_MIRROR=<mirror> (an instructor can prepare a mirror with `course data fetch --all`)."
    )
    short = [mirror_note if mirror_dir is not None else "no mirror"] + [f.split(": ", 1)[-1] for f in failures]
    raise DataFetchError("\n".join(lines), summary="; ".join(short))


def _folders(cache_dir, mirror) -> tuple[Path, Path | None]:
    """``(cache, mirror)`` as expanded paths (the defaults for ``None``); an empty string is refused,
    not read as the working folder."""
    for label, value in (("cache_dir", cache_dir), ("mirror", mirror)):
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value).strip()):
            raise ValueError(f"{label} is {value!r}; give a folder (or None for the default), not the working "
                             "folder by accident")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache, (Path(mirror).expanduser() if mirror is not None else default_mirror())


def status(name: str | DataFile, *, cache_dir: str | os.PathLike | None = None,
           mirror: str | os.PathLike | None = None, verify: bool = True) -> str:
    """One word for where a file stands.

    ``cached`` (in the cache and good), ``corrupt`` (in the cache, damaged), ``in-mirror``
    (not cached; the mirror's copy is good), ``mirror-corrupt`` (not cached; the mirror's
    copy is damaged, so :func:`fetch` would download) or ``missing``.

    Args:
        verify: compare sha256 checksums (default). ``False`` compares sizes only (no hashing).
        cache_dir, mirror: as for :func:`fetch`.
    """
    entry = get_entry(name)
    verify = boolean("verify", verify)
    cache, mirror_dir = _folders(cache_dir, mirror)          # "~/cache" as fetch reads it
    target = cache / entry.path
    if target.is_file():
        return "cached" if _check(target, entry, verify) is None else "corrupt"
    if mirror_dir is not None and (mirror_dir / entry.path).is_file():
        return "in-mirror" if _check(mirror_dir / entry.path, entry, verify) is None else "mirror-corrupt"
    return "missing"


def read_text(name: str, **fetch_kwargs) -> str:
    """Fetch a registered text file and return its contents (UTF-8).

    Raises:
        ValueError: the file is not UTF-8 text (named); and as :func:`fetch`.
    """
    path = fetch(name, **fetch_kwargs)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} ({name}) is not UTF-8 text ({err.reason} at byte {err.start}); it is not the "
                         "course's file: delete it and fetch it again") from None


def entries(names: Iterable[str] | None = None, include_optional: bool = True) -> list[DataFile]:
    """Registered entries (all, or the named ones), in registration order.

    Raises:
        TypeError: ``names`` is one name (a str) rather than a list of them; ``include_optional``
            not ``True``/``False``.
    """
    include_optional = boolean("include_optional", include_optional)
    if isinstance(names, (str, bytes)):
        raise TypeError(f"names must be a list of data names, got the single name {names!r}; wrap it as [name]")
    if names is not None:
        return [get_entry(n) for n in names]
    return [e for e in REGISTRY.values() if include_optional or not e.optional]

