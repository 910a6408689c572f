"""Token shards: the file format, the parallel writer against tiktoken, prepare_shards, and ShardLoader's windows."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from _corpora import corpus, gpt2_tiktoken
from course_lib import data
from course_lib.shards import (HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION, ShardError, ShardLoader, iter_documents,
                               prepare_shards, read_shard, shard_files, source_files, write_shard, write_shards)

tiktoken = pytest.importorskip("tiktoken")
EOT, EOT_ID = "<|endoftext|>", 50256


@pytest.fixture(scope="module")
def ref():
    return gpt2_tiktoken()


@pytest.fixture(scope="module")
def paragraphs():
    """The Verdict cut into its paragraphs: ~200 small documents, ~5,000 tokens."""
    return [p.strip() for p in corpus("the-verdict").split("\n\n") if p.strip()]


def expected_ids(ref, docs, eot=True):
    ids = []
    for d in docs:
        ids += ([EOT_ID] if eot else []) + ref.encode_ordinary(d)
    return np.array(ids, dtype=np.int64)


def read_all(paths):
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in paths])


# --------------------------------------------------------------------------- #
# One shard: the format
# --------------------------------------------------------------------------- #
def test_shard_file_layout_is_the_documented_header_then_uint16(tmp_path):
    tokens = [0, 1, 50256, 65535, 7]
    path = write_shard(tmp_path / "a.bin", tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    assert struct.unpack("<3i", raw[:12]) == (20240520, 1, 5) == (SHARD_MAGIC, SHARD_VERSION, 5)
    assert raw[12:1024] == bytes(1012)
    assert struct.unpack("<5H", raw[1024:]) == tuple(tokens)
    mm = read_shard(path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16 and mm.tolist() == tokens


def test_write_shard_is_not_silently_overwritten(tmp_path):
    path = write_shard(tmp_path / "a.bin", [1, 2, 3])
    with pytest.raises(FileExistsError):
        write_shard(path, [4, 5])
    assert read_shard(path).tolist() == [1, 2, 3]
    write_shard(path, [4, 5], overwrite=True)
    assert read_shard(path).tolist() == [4, 5]


def test_uint16_overflow_is_refused(tmp_path, ref):
    with pytest.raises(ValueError, match="70000.*uint16"):
        write_shard(tmp_path / "a.bin", [1, 70000])
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "a.bin", np.array([-1, 3]))
    with pytest.raises(ValueError, match="empty"):
        write_shard(tmp_path / "a.bin", [])
    assert not (tmp_path / "a.bin").exists()
    big = tiktoken.Encoding(name="big", pat_str=ref._pat_str, mergeable_ranks=ref._mergeable_ranks,
                            special_tokens={EOT: 70000})  # 70,001 ids
    with pytest.raises(ValueError, match="70,001 ids.*65,536"):
        write_shards(["hello"], tmp_path / "out", tokenizer=big, workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "magic":
        raw[0:4] = struct.pack("<i", 12345)
    elif how == "version":
        raw[4:8] = struct.pack("<i", 2)
    elif how == "truncated":
        raw = raw[:-3]
    elif how == "too long":
        raw += b"\0\0"
    elif how == "count":  # a header that says more tokens than the file holds
        raw[8:12] = struct.pack("<i", 999)
    elif how == "header":
        raw = raw[:500]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how,match", [
    ("magic", "not a token shard: magic number 12345, expected 20240520"),
    ("version", "version 2"),
    ("truncated", "truncated"),
    ("too long", "too long"),
    ("count", "truncated: its header says 999 tokens"),
    ("header", "truncated: 500 bytes, shorter than the 1,024-byte header"),
])
def test_damaged_shard_is_a_shard_error_naming_the_file(tmp_path, how, match):
    path = write_shard(tmp_path / "train_000000.bin", np.arange(100))
    _damage(path, how)
    with pytest.raises(ShardError, match=match) as err:
        read_shard(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(ShardError, match=match):  # the loader checks every file it opens
        ShardLoader(tmp_path, batch_size=1, context_length=4)


# --------------------------------------------------------------------------- #
# write_shards against tiktoken
# --------------------------------------------------------------------------- #
def test_write_shards_round_trips_to_tiktokens_ids(tmp_path, ref, paragraphs):
    paths = write_shards(paragraphs, tmp_path, shard_tokens=1000, workers=1, progress=False)
    want = expected_ids(ref, paragraphs)
    assert len(want) > 3000 and np.array_equal(read_all(paths), want)
    assert [p.name for p in paths] == [f"train_{i:06d}.bin" for i in range(len(paths))] == \
        [p.name for p in shard_files(tmp_path, "train")]
    assert [len(read_shard(p)) for p in paths[:-1]] == [1000] * (len(paths) - 1)   # exactly shard_tokens...
    assert 0 < len(read_shard(paths[-1])) <= 1000                                   # ...except the last
    assert [p.stat().st_size for p in paths[:-1]] == [1024 + 2000] * (len(paths) - 1)


def test_write_shards_without_eot_and_the_tinystories_separators(tmp_path, ref):
    text = corpus("tinystories-sample")
    stories = [s.strip() for s in text.split(EOT) if s.strip()]
    assert len(stories) == 5 and list(iter_documents([data.fetch("tinystories-sample", progress=False)])) == stories
    paths = write_shards(stories, tmp_path, split="val", workers=1, progress=False)
    assert [p.name for p in paths] == ["val_000000.bin"]
    assert np.array_equal(read_all(paths), expected_ids(ref, stories))
    assert int(np.count_nonzero(read_all(paths) == EOT_ID)) == 5
    plain = write_shards(stories, tmp_path / "plain", workers=1, eot=False, progress=False)
    assert np.array_equal(read_all(plain), expected_ids(ref, stories, eot=False))


def test_two_workers_write_byte_identical_shards(tmp_path, paragraphs):
    docs = paragraphs * 4  # more documents than one block of work sent to the pool
    one = write_shards(docs, tmp_path / "one", shard_tokens=3000, workers=1, progress=False)
    two = write_shards(iter(docs), tmp_path / "two", shard_tokens=3000, workers=2, progress=True)
    assert len(one) == len(two) > 3
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]


def test_write_shards_refuses_existing_shards_and_overwrite_removes_stale_ones(tmp_path, paragraphs):
    first = write_shards(paragraphs, tmp_path, shard_tokens=1000, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards(paragraphs[:3], tmp_path, workers=1, progress=False)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in shard_files(tmp_path, "train")]
    again = write_shards(paragraphs[:3], tmp_path, shard_tokens=1000, workers=1, progress=False, overwrite=True)
    assert len(again) == 1 < len(first) and shard_files(tmp_path, "train") == again
    write_shards(paragraphs[:3], tmp_path, split="val", workers=1, progress=False)  # another split is fine
    with pytest.raises(ValueError, match="no tokens"):
        write_shards(["", ""], tmp_path / "empty", eot=False, workers=1, progress=False)
    with pytest.raises(TypeError, match="iterable of texts"):
        write_shards("one text", tmp_path / "x", workers=1, progress=False)
    with pytest.raises(ValueError, match="split"):
        write_shards(["a"], tmp_path / "x", split="../up", workers=1, progress=False)


@pytest.mark.parametrize("fail", ["bad document", "interrupt"])
def test_a_failed_overwrite_leaves_the_earlier_shards_as_they_were(tmp_path, paragraphs, fail):
    """A run that fails (or is stopped) after its first shards were full keeps the old shards byte for byte,
    and leaves neither new shards nor its staging folder behind."""
    first = write_shards(paragraphs, tmp_path, shard_tokens=1000, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(first) >= 3

    def documents():
        for _ in range(15):                      # other text, past the first batch of ~256K characters
            yield from reversed(paragraphs)
        if fail == "interrupt":
            raise KeyboardInterrupt
        yield 42

    with pytest.raises(TypeError if fail == "bad document" else KeyboardInterrupt):
        write_shards(documents(), tmp_path, shard_tokens=1000, workers=1, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(TypeError):
        write_shards(documents() if fail == "bad document" else [b"bytes"], tmp_path / "fresh", workers=1,
                     progress=False, shard_tokens=1000)
    assert not (tmp_path / "fresh").exists()           # a first run that fails leaves no partial shards, no folder


@pytest.mark.parametrize("chars", [1, 5, 12, 13, 14, 40, 1 << 20])
def test_documents_are_split_at_separators_across_reads(tmp_path, chars):
    text = f"  first\r\n{EOT}second{EOT}{EOT}\n third one \n{EOT}" + "x" * 30 + EOT[:6] + "y"
    path = tmp_path / "a.txt"
    path.write_bytes(text.encode("utf-8"))
    want = [d.strip() for d in text.split(EOT) if d.strip()]
    assert want == ["first", "second", "third one", "x" * 30 + "<|endo" + "y"]
    assert list(iter_documents([path], chars=chars)) == want


# --------------------------------------------------------------------------- #
# prepare_shards
# --------------------------------------------------------------------------- #
def test_prepare_shards_holds_out_the_last_documents(tmp_path, ref):
    stories = [s.strip() for s in corpus("tinystories-sample").split(EOT) if s.strip()]
    out = prepare_shards("tinystories-sample", tmp_path / "ts", progress=False, workers=1)
    assert np.array_equal(read_all(shard_files(tmp_path / "ts", "train")), expected_ids(ref, stories[:4]))
    assert np.array_equal(read_all(shard_files(tmp_path / "ts", "val")), expected_ids(ref, stories[4:]))
    meta = json.loads((tmp_path / "ts" / "meta.json").read_text())
    assert {k: out[k] for k in meta} == meta
    assert meta["splits"]["train"]["documents"] == 4 and meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["val"]["tokens"] == len(expected_ids(ref, stories[4:]))
    assert meta["sources"][0]["sha256"] == data.REGISTRY["tinystories-sample"].sha256
    assert meta["tokenizer"] == "gpt2" and meta["eot_token"] == EOT_ID and meta["split_by"] == "documents"
    assert out["tokens"] == meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]


def test_prepare_shards_of_one_document_splits_its_tokens(tmp_path, ref):
    text = corpus("the-verdict")
    out = prepare_shards("the-verdict", tmp_path / "v", val_fraction=0.1, progress=True)
    train, val = (read_all(shard_files(tmp_path / "v", s)) for s in ("train", "val"))
    want = expected_ids(ref, [text.strip()])
    assert np.array_equal(np.concatenate([train, val]), want)
    assert len(val) == round(0.1 * len(want)) and out["split_by"] == "tokens"


def test_prepare_shards_of_a_folder_and_refusing_a_non_empty_out_dir(tmp_path, ref):
    src = tmp_path / "src"
    src.mkdir()
    (src / "b.txt").write_text(f"third{EOT}fourth", encoding="utf-8")
    (src / "a.txt").write_text(f"first{EOT}second\n", encoding="utf-8")
    (src / "notes.md").write_text("not a .txt file")
    out = tmp_path / "out"
    meta = prepare_shards(src, out, val_fraction=0.5, progress=False, workers=1)
    assert np.array_equal(read_all(shard_files(out, "train")), expected_ids(ref, ["first", "second"]))
    assert np.array_equal(read_all(shard_files(out, "val")), expected_ids(ref, ["third", "fourth"]))
    assert [s["name"] for s in meta["sources"]] == ["a.txt", "b.txt"]
    assert meta["sources"][0]["sha256"] == data.sha256_of(src / "a.txt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        prepare_shards(src, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare_shards(src, out, val_fraction=0.25, progress=False, overwrite=True, workers=1)
    assert json.loads((out / "meta.json").read_text())["splits"]["val"]["documents"] == 1


def test_prepare_shards_bad_input(tmp_path):
    with pytest.raises(ValueError, match="registered data name"):
        prepare_shards("no-such-corpus", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="not a text corpus"):
        prepare_shards("gpt2-encoder", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_shards("the-verdict", tmp_path / "o", val_fraction=0, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        prepare_shards(tmp_path / "empty", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- #
# ShardLoader
# --------------------------------------------------------------------------- #
SIZES = (100, 37, 100, 64)  # shard lengths; token value = its global position, so a window tells where it was


@pytest.fixture
def numbered(tmp_path) -> Path:
    start = 0
    for i, n in enumerate(SIZES):
        write_shard(tmp_path / f"train_{i:06d}.bin", np.arange(start, start + n))
        start += n
    return tmp_path


def _shard_of(pos) -> np.ndarray:
    return np.searchsorted(np.cumsum(SIZES), pos, side="right")


def _starts(loader, batches) -> np.ndarray:
    out = []
    for _ in range(batches):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (loader.batch_size, loader.context_length) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one (consecutive positions here)
        assert torch.equal(x - x[:, :1], torch.arange(loader.context_length).expand_as(x))
        out += x[:, 0].tolist()
    return np.array(out)


def _valid_starts(T, slices):
    return {s for a, b in slices for s in range(a, b - T)}


def test_random_windows_never_cross_a_shard_end(numbered):
    T = 16
    starts = _starts(ShardLoader(numbered, batch_size=8, context_length=T, seed=3), 500)
    assert np.array_equal(_shard_of(starts), _shard_of(starts + T))  # x and the last y token: same shard
    bounds = np.concatenate([[0], np.cumsum(SIZES)])
    assert set(starts.tolist()) == _valid_starts(T, zip(bounds[:-1], bounds[1:]))  # every other start is drawn


def test_cross_shard_windows_may_cross(numbered):
    T = 16
    starts = _starts(ShardLoader(numbered, batch_size=8, context_length=T, seed=3, cross_shard=True), 500)
    assert (_shard_of(starts) != _shard_of(starts + T)).any()
    assert set(starts.tolist()) == _valid_starts(T, [(0, sum(SIZES))])


def test_random_windows_depend_on_the_seed_and_are_reproducible(numbered):
    a, b, c = (_starts(ShardLoader(numbered, batch_size=4, context_length=8, seed=s), 5) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_random_ranks_draw_disjoint_tokens(numbered):
    T, seen = 8, []
    for rank in range(2):
        loader = ShardLoader(numbered, batch_size=8, context_length=T, rank=rank, world_size=2, seed=5)
        starts = _starts(loader, 400)
        seen.append({int(s) + k for s in starts for k in range(T + 1)})  # every token of x and y
        # each rank stays inside its half of every shard
        bounds = np.concatenate([[0], np.cumsum(SIZES)])
        halves = [(a + rank * (b - a) // 2, a + (rank + 1) * (b - a) // 2) for a, b in zip(bounds[:-1], bounds[1:])]
        assert set(starts.tolist()) == _valid_starts(T, halves)
    assert seen[0].isdisjoint(seen[1])


def _seq_windows(T, slices):
    return [s for a, b in slices for s in range(a, b - T, T)]


def test_sequential_pass_covers_the_windows_in_order(numbered):
    T, B = 16, 3
    loader = ShardLoader(numbered, "train", batch_size=B, context_length=T, sequential=True)
    bounds = np.concatenate([[0], np.cumsum(SIZES)])
    windows = _seq_windows(T, zip(bounds[:-1], bounds[1:]))  # starts 0, 16, ... in each shard
    assert len(windows) == 6 + 2 + 6 + 3
    n = len(windows) // B
    assert loader.num_batches == len(loader) == n == 5
    batches = list(loader)
    assert len(batches) == n
    got = torch.cat([x for x, _ in batches])[:, 0].tolist()
    assert got == windows[: n * B]
    assert all(torch.equal(y, x + 1) for x, y in batches)
    # next_batch walks the same pass and starts again after the end; iter() does not move it
    walked = [loader.next_batch()[0] for _ in range(n + 1)]
    assert all(torch.equal(w, b[0]) for w, b in zip(walked, batches)) and torch.equal(walked[n], batches[0][0])
    assert torch.equal(next(iter(loader))[0], batches[0][0])


def test_sequential_ranks_take_every_other_batch(numbered):
    T, B = 8, 2
    whole = [x for x, _ in ShardLoader(numbered, batch_size=B, context_length=T, sequential=True)]
    ranks = [[x for x, _ in ShardLoader(numbered, batch_size=B, context_length=T, sequential=True,
                                        rank=r, world_size=2)] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    for r in range(2):
        assert all(torch.equal(a, b) for a, b in zip(ranks[r], whole[r::2]))
    tokens = [set(torch.cat(rk).flatten().tolist()) for rk in ranks]
    assert tokens[0].isdisjoint(tokens[1])


@pytest.mark.parametrize("sequential", [False, True])
def test_state_dict_resumes_with_the_same_batches(numbered, sequential):
    kw = dict(batch_size=4, context_length=8, seed=11, sequential=sequential, world_size=2)
    a = ShardLoader(numbered, rank=0, **kw)
    b1 = ShardLoader(numbered, rank=1, **kw)
    for _ in range(3):
        a.next_batch()
        b1.next_batch()
    buf = io.BytesIO()
    torch.save({"loader": a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["loader"]  # plain ints and bools: a checkpoint can hold it
    after_a = [a.next_batch() for _ in range(6)]
    after_b = [b1.next_batch() for _ in range(6)]
    for rank, after in ((0, after_a), (1, after_b)):  # rank 0's state resumes either rank
        resumed = ShardLoader(numbered, rank=rank, **kw)
        resumed.load_state_dict(state)
        for (x, y), (x2, y2) in zip(after, (resumed.next_batch() for _ in range(6))):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    fresh = ShardLoader(numbered, rank=0, **kw)
    assert not torch.equal(fresh.next_batch()[0], after_a[0][0])  # the state did matter


def test_state_from_other_settings_is_refused(numbered):
    state = ShardLoader(numbered, batch_size=4, context_length=8).state_dict()
    other = ShardLoader(numbered, batch_size=2, context_length=8)
    with pytest.raises(ValueError, match="batch_size=4"):
        other.load_state_dict(state)
    other.load_state_dict(dict(state, batches=7), strict=False)
    assert other.state_dict()["batches"] == 7
    with pytest.raises(ValueError, match="state_dict"):
        other.load_state_dict({"step": 3})


def test_state_over_other_data_of_the_same_size_is_refused(numbered, tmp_path):
    """Shards written again with the same number of tokens but other ones (the documents in another order):
    the settings and token count match, the data does not; strict resume says so (it resumed silently)."""
    kw = dict(batch_size=4, context_length=8)
    state = ShardLoader(numbered, **kw).state_dict()
    other = tmp_path / "other"
    start = 0
    for i, n in enumerate(SIZES):
        write_shard(other / f"train_{i:06d}.bin", np.arange(start, start + n)[::-1].copy())
        start += n
    moved = ShardLoader(other, **kw)
    assert moved.num_tokens == state["num_tokens"] and moved.fingerprint != state["data"]
    with pytest.raises(ValueError, match="saved on other data.*strict=False"):
        moved.load_state_dict(state)
    moved.load_state_dict(state, strict=False)
    ShardLoader(numbered, **kw).load_state_dict(state)                              # the same data: fine
    old = {k: v for k, v in state.items() if k != "data"}                           # saved before fingerprints
    ShardLoader(other, **kw).load_state_dict(old)


def test_loader_reads_through_memory_maps(numbered):
    loader = ShardLoader(numbered, batch_size=2, context_length=4)
    assert all(isinstance(s, np.memmap) for s in loader._shards)
    assert loader.num_tokens == sum(SIZES)
    files = ShardLoader(sorted(numbered.glob("*.bin"))[:2], batch_size=2, context_length=4)  # a list of files
    assert files.num_tokens == SIZES[0] + SIZES[1]


def test_loader_bad_input(tmp_path, numbered):
    kw = dict(batch_size=2, context_length=8)
    with pytest.raises(ValueError, match="does not exist.*prepare_shards"):
        ShardLoader(tmp_path / "nope", **kw)
    with pytest.raises(ValueError, match="no 'val' shards.*'train'"):
        ShardLoader(numbered, "val", **kw)
    with pytest.raises(ValueError, match="context_length \\+ 1 = 101 tokens.*largest shard holds 100"):
        ShardLoader(numbered, batch_size=2, context_length=100)
    ShardLoader(numbered, batch_size=2, context_length=100, cross_shard=True)  # fits across shards
    with pytest.raises(ValueError, match="per rank"):
        ShardLoader(numbered, batch_size=2, context_length=60, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(numbered, rank=2, world_size=2, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        ShardLoader(numbered, batch_size=0, context_length=8)
    with pytest.raises(ValueError, match="no batch of batch_size=100"):
        ShardLoader(numbered, batch_size=100, context_length=8, sequential=True)
    with pytest.raises(TypeError, match="no length"):
        len(ShardLoader(numbered, **kw))


# --------------------------------------------------------------------------- #
# Bad input: every error names the argument (none from numpy, torch or os)
# --------------------------------------------------------------------------- #
def test_write_shard_overwrite_must_be_a_bool(tmp_path):
    path = write_shard(tmp_path / "a.bin", [1, 2, 3])
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        write_shard(path, [4, 5], overwrite="no")  # a truthy string must not replace the learner's file
    assert read_shard(path).tolist() == [1, 2, 3]


def test_bad_tokens_and_paths_name_the_argument(tmp_path):
    for bad in (None, 5, "abc", (i for i in range(3))):
        with pytest.raises(TypeError, match="tokens must be a sequence of token ids"):
            write_shard(tmp_path / "a.bin", bad)
    with pytest.raises(ValueError, match="flat sequence"):  # numpy's "inhomogeneous shape" otherwise
        write_shard(tmp_path / "a.bin", [[1, 2], [3]])
    with pytest.raises(TypeError, match="path must be a path"):
        write_shard(None, [1])
    with pytest.raises(TypeError, match="path must be a path"):
        read_shard(None)
    with pytest.raises(TypeError, match="directory must be a path"):
        shard_files(None, "train")
    for split in (None, "*", "../train"):
        with pytest.raises(ValueError, match="split must be a name"):
            shard_files(tmp_path, split)
    assert not (tmp_path / "a.bin").exists()


def test_a_folder_given_as_a_shard_file_is_named_as_a_folder(tmp_path, numbered):
    with pytest.raises(IsADirectoryError, match="is a folder"):  # not "does not exist"
        read_shard(numbered)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        ShardLoader([numbered], batch_size=1, context_length=4)


def test_iter_documents_bad_arguments(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(f"one{EOT}two", encoding="utf-8")
    assert list(iter_documents([path], chars=1)) == ["one", "two"]
    with pytest.raises(ValueError, match="chars must be a positive integer"):
        iter_documents([path], chars=0)  # reading 0 characters at a time would silently give no documents
    for single in (path, str(path)):
        with pytest.raises(TypeError, match=r"wrap it as \[path\]"):  # not its characters as file names
            iter_documents(single)


def test_iter_documents_never_opens_an_integer_as_a_file_descriptor(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("mine", encoding="utf-8")
    with open(path, encoding="utf-8") as fh:
        for bad in (fh.fileno(), None, ""):
            with pytest.raises(TypeError, match=r"paths\[1\] must be the path of a text file"):
                list(iter_documents([path, bad]))
        assert fh.read() == "mine"                 # the descriptor was not read and closed under it


def test_an_empty_source_is_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("private", encoding="utf-8")
    for source in ("", "  "):
        with pytest.raises(ValueError, match="source is empty"):
            source_files(source)
        with pytest.raises(ValueError, match="source is empty"):
            prepare_shards(source, tmp_path / "out", progress=False, workers=1)
    assert not (tmp_path / "out").exists()


def test_write_shards_leaves_no_empty_folder_and_no_stale_meta_json(tmp_path):
    with pytest.raises(ValueError, match="gave no tokens"):
        write_shards([""], tmp_path / "new", eot=False, workers=1, progress=False)
    assert not (tmp_path / "new").exists()
    out = tmp_path / "prepared"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(EOT.join(f"story number {i}." for i in range(40)), encoding="utf-8")
    prepare_shards(corpus, out, progress=False, workers=1)
    assert (out / "meta.json").is_file()
    write_shards(["other text"], out, split="train", overwrite=True, workers=1, progress=False)
    assert not (out / "meta.json").exists()        # it counted the tokens of the shards just replaced


def test_write_shards_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir .* is a file"):  # not mkdir's "[Errno 17] File exists"
        write_shards(["hello"], tmp_path / "file", workers=1, progress=False)
    for bad in (None, 5):
        with pytest.raises(TypeError, match="documents must be an iterable of texts"):
            write_shards(bad, tmp_path / "o", workers=1, progress=False)
    with pytest.raises(TypeError, match="progress must be True or False"):
        write_shards(["hello"], tmp_path / "o", workers=1, progress="no")
    with pytest.raises(TypeError, match="total must be an integer"):
        write_shards(["hello"], tmp_path / "o", workers=1, progress=False, total="5")
    assert not (tmp_path / "o").exists()


def test_tokenizer_errors_are_ours(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"'nope' is not a tiktoken encoding \(gpt2, ") as err:
        write_shards(["hello"], tmp_path / "o", tokenizer="nope", workers=1, progress=False)
    assert "\n" not in str(err.value)

    def offline(name):
        raise ConnectionError("Max retries exceeded")  # what requests raises offline (an OSError)

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(OSError, match="could not download the 'r50k_base' encoding.*TIKTOKEN_CACHE_DIR"):
        write_shards(["hello"], tmp_path / "o", tokenizer="r50k_base", workers=1, progress=False)


def test_prepare_shards_checks_every_argument_before_touching_out_dir(tmp_path):
    out = tmp_path / "ts"
    prepare_shards("tinystories-sample", out, progress=False, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = [(dict(source="no-such-corpus"), ValueError, "registered data name"),
           (dict(shard_tokens=0), ValueError, "shard_tokens"),
           (dict(source="the-verdict", workers=0), ValueError, "workers"),  # one document: no write_shards call
           (dict(val_fraction="0.1"), TypeError, "val_fraction"),
           (dict(progress="no"), TypeError, "progress")]
    for change, error, match in bad:
        kw = dict(dict(source="tinystories-sample", workers=1, progress=False), **change)
        with pytest.raises(error, match=match):
            prepare_shards(kw.pop("source"), out, overwrite=True, **kw)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # meta.json and shards kept


def test_loader_bad_paths_and_devices_name_the_argument(numbered):
    kw = dict(batch_size=2, context_length=8)
    for bad in (None, 5, str(numbered).encode()):
        with pytest.raises(TypeError, match="directory_or_files must be a shard folder or a list"):
            ShardLoader(bad, **kw)
    with pytest.raises(TypeError, match=r"directory_or_files\[i\] must be a path"):
        ShardLoader([None], **kw)
    with pytest.raises(ValueError, match="'gpu'.*not a device name"):  # not torch's RuntimeError
        ShardLoader(numbered, device="gpu", **kw)
    if not torch.cuda.is_available():  # refused when made, not at the first batch
        with pytest.raises(ValueError, match="CUDA is not available"):
            ShardLoader(numbered, device="cuda", **kw)
    assert ShardLoader(numbered, device="cpu", **kw).next_batch()[0].device.type == "cpu"


def test_cross_shard_too_short_counts_all_the_tokens(numbered):
    with pytest.raises(ValueError, match=f"all shards together: they hold {sum(SIZES)} tokens") as err:
        ShardLoader(numbered, batch_size=1, context_length=sum(SIZES), cross_shard=True)
    assert "cross_shard=True" not in str(err.value)  # it already is


def test_load_state_dict_checks_its_arguments(numbered):
    loader = ShardLoader(numbered, batch_size=2, context_length=8)
    state = loader.state_dict()
    with pytest.raises(TypeError, match="strict must be True or False"):
        loader.load_state_dict(dict(state, seed=1), strict="no")
    for batches in (True, 2.0, -1, "3"):
        with pytest.raises(ValueError, match=r"state\['batches'\] must be an integer >= 0"):
            loader.load_state_dict(dict(state, batches=batches))
    with pytest.raises(ValueError, match="has no 'batch_size'"):  # strict: a bare count is not a full state
        loader.load_state_dict({"batches": 3})
    loader.load_state_dict({"batches": np.int64(3)}, strict=False)
    assert loader.state_dict()["batches"] == 3 and type(loader.state_dict()["batches"]) is int
    assert loader.state_dict() == dict(state, batches=3)


def test_a_random_loader_is_truthy_without_a_length(numbered):
    loader = ShardLoader(numbered, batch_size=2, context_length=8)
    assert loader and ShardLoader(numbered, batch_size=2, context_length=8, sequential=True)
    with pytest.raises(TypeError, match="no length"):
        len(loader)
