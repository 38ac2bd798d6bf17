"""Token shards in llm.c's format: byte-exact writing, reading through memmap, validation, dataset folders."""

import hashlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from gpt_core.shards import (
    INCOMPLETE_MARKER,
    MANIFEST,
    ShardError,
    ShardWriter,
    TokenSplit,
    is_token_dataset,
    open_dataset,
    open_shard,
    ranks_sha256,
    read_header,
    tokenizer_identity,
    write_shard,
)
from gpt_core.tokenizer import ASSETS, WordTokenizer, get_tokenizer


def llmc_datafile(path: Path, toks, model_desc: str = "gpt-2") -> Path:
    """What llm.c's dev/data/data_common.py `write_datafile` writes (the reference format, restated)."""
    magic, version, dtype = {"gpt-2": (20240520, 1, np.uint16), "llama-3": (20240801, 7, np.uint32)}[model_desc]
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(toks)
    path.write_bytes(header.tobytes() + np.array(toks, dtype=dtype).tobytes())
    return path


def nanogpt_load(path: Path) -> np.ndarray:
    """modded-nanogpt's `_load_data_shard`, restated with numpy."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype=np.int32)
        assert header[0] == 20240520, "magic number mismatch in the data .bin file"
        assert header[1] == 1, "unsupported version"
        tokens = np.frombuffer(f.read(), dtype=np.uint16)
    assert len(tokens) == header[2]
    return tokens


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------ format
def test_uint16_shard_is_byte_identical_to_llmc(tmp_path, rng):
    toks = rng.integers(0, 50257, 1003)
    ours = write_shard(tmp_path / "ours.bin", toks, vocab_size=50257)
    ref = llmc_datafile(tmp_path / "ref.bin", toks)
    assert ours.read_bytes() == ref.read_bytes()
    np.testing.assert_array_equal(nanogpt_load(ours), toks)
    m = open_shard(ref)
    assert isinstance(m, np.memmap) and m.dtype == np.uint16 and m.shape == (1003,)
    np.testing.assert_array_equal(m, toks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.bin", "ref.bin"]  # no temporary file left


def test_large_vocab_uses_llmc_version_7_uint32(tmp_path, rng):
    toks = rng.integers(0, 100277, 517)
    toks[0] = 100276
    ours = write_shard(tmp_path / "ours.bin", toks, vocab_size=100277)
    assert ours.read_bytes() == llmc_datafile(tmp_path / "ref.bin", toks, "llama-3").read_bytes()
    h = read_header(ours)
    assert (h.magic, h.version, h.n_tokens, h.dtype) == (20240801, 7, 517, np.uint32)
    np.testing.assert_array_equal(open_shard(ours), toks)
    # 65,536 ids still fit uint16
    assert read_header(write_shard(tmp_path / "w.bin", [65535], vocab_size=65536)).dtype == np.uint16


@pytest.mark.parametrize("tokens, message", [
    (np.array([0, 50257]), r"token ids must be in \[0, 50257\), got \[0, 50257\]"),
    (np.array([-1, 3]), r"must be in \[0, 50257\)"),
    (np.array([1.0, 2.0]), "must be integers"),
    (np.zeros((2, 2), int), "must be 1-D"),
    (np.array([], int), "at least one token"),
])
def test_write_refuses_bad_tokens_and_leaves_nothing(tmp_path, tokens, message):
    with pytest.raises(ValueError, match=message):
        write_shard(tmp_path / "x.bin", tokens, vocab_size=50257)
    assert list(tmp_path.iterdir()) == []


def test_writer_streams_and_an_exception_leaves_nothing(tmp_path):
    with ShardWriter(tmp_path / "s.bin", vocab_size=50257) as w:
        for i in range(5):
            w.write(np.arange(i * 10, i * 10 + 10))
    np.testing.assert_array_equal(open_shard(tmp_path / "s.bin"), np.arange(50))
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "t.bin", vocab_size=50257) as w:
        w.write(np.arange(10))
        raise RuntimeError("killed mid-shard")
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]


def test_a_failed_rename_keeps_the_old_shard(tmp_path):
    old = write_shard(tmp_path / "s.bin", [1, 2, 3], vocab_size=10)
    with mock.patch("gpt_core.shards.os.replace", side_effect=OSError("disk full")), pytest.raises(OSError):
        write_shard(old, [4, 5], vocab_size=10)
    np.testing.assert_array_equal(open_shard(old), [1, 2, 3])


# ---------------------------------------------------------------------------------------------- validation
def corrupt(path: Path, *, magic=None, version=None, count=None, cut=0, extra=b"") -> Path:
    data = bytearray(path.read_bytes())
    header = np.frombuffer(bytes(data[:1024]), dtype=np.int32).copy()
    for i, v in enumerate((magic, version, count)):
        if v is not None:
            header[i] = v
    data[:1024] = header.tobytes()
    path.write_bytes(bytes(data[:len(data) - cut]) + extra)
    return path


@pytest.mark.parametrize("change, message", [
    (dict(magic=20240521), "not a token shard of a known format: magic 20240521 version 1"),
    (dict(version=2), "magic 20240520 version 2"),
    (dict(magic=20240801), "magic 20240801 version 1"),  # llama-3 magic with the gpt-2 version
    (dict(count=101), r"truncated: the header counts 101 uint16 tokens \(1,226 bytes with the header\) but the "
                      "file has 1,224 bytes"),
    (dict(count=99), "longer than its header says"),
    (dict(cut=1), "truncated"),
    (dict(extra=b"\0\0"), "longer than its header says"),
    (dict(count=0), "counts 0 tokens"),
    (dict(cut=224), "shorter than the 1024-byte shard header"),
])
def test_open_shard_names_the_file_and_the_problem(tmp_path, change, message):
    path = corrupt(write_shard(tmp_path / "bad_train_000001.bin", np.arange(100), vocab_size=50257), **change)
    with pytest.raises(ShardError, match=message) as e:
        open_shard(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin does not exist"):
        open_shard(tmp_path / "nope.bin")


# -------------------------------------------------------------------------------------------------- splits
def test_split_reads_across_shard_boundaries(tmp_path, rng):
    parts = [rng.integers(0, 50257, n) for n in (7, 1, 13, 5)]
    paths = [write_shard(tmp_path / f"d_train_{i:06d}.bin", p, vocab_size=50257) for i, p in enumerate(parts)]
    split, ref = TokenSplit(paths), np.concatenate(parts)
    assert len(split) == 26 and split.paths == paths
    for start in range(26):
        for n in range(0, 27 - start):
            got = split.read(start, n)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, ref[start:start + n])
    assert split.locate(0) == (paths[0], 0)
    assert split.locate(7) == (paths[1], 0)
    assert split.locate(8) == (paths[2], 0)
    assert split.locate(25) == (paths[3], 4)
    for bad in [(-1, 2), (20, 7), (0, 27)]:
        with pytest.raises(IndexError, match=r"outside this split's \[0, 26\)"):
            split.read(*bad)
    with pytest.raises(IndexError):
        split.locate(26)


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_random_windows_do_not_grow_resident_memory(tmp_path, rng):
    """A 40 MB shard, 3,000 random windows: through a memmap, Linux maps whole page-cache folios per fault
    and the process's resident memory takes most of the file; the split must not."""
    path = write_shard(tmp_path / "big.bin", rng.integers(0, 50257, 20_000_000, dtype=np.uint16), vocab_size=50257)
    split = TokenSplit([path])
    before = _rss_file_mb()
    for s in rng.integers(0, len(split) - 129, 3000):
        split.read(s, 129)
    assert _rss_file_mb() - before < 8


def test_split_pickles_and_notices_a_shrunk_shard(tmp_path):
    import pickle

    path = write_shard(tmp_path / "s.bin", np.arange(100), vocab_size=50257)
    split = TokenSplit([path])
    split.read(0, 10)
    clone = pickle.loads(pickle.dumps(split))
    np.testing.assert_array_equal(clone.read(90, 10), np.arange(90, 100))
    with open(path, "r+b") as f:
        f.truncate(1024 + 100)
    with pytest.raises(ShardError, match="shorter than its header said") as e:
        split.read(60, 10)
    assert str(path) in str(e.value)
    split.close()


def test_split_refuses_mixed_token_widths(tmp_path):
    a = write_shard(tmp_path / "a.bin", [1], vocab_size=50257)
    b = write_shard(tmp_path / "b.bin", [1], vocab_size=100277)
    with pytest.raises(ShardError, match="mix token widths"):
        TokenSplit([a, b])


# ------------------------------------------------------------------------------------------ dataset folders
def llmc_folder(root: Path, rng, prefix="fineweb", sizes=(300, 500, 200), model_desc="gpt-2") -> list[np.ndarray]:
    """llm.c's fineweb.py layout: shard 0 is val, then train shards."""
    root.mkdir(parents=True, exist_ok=True)
    parts = [rng.integers(0, 50257, n) for n in sizes]
    for i, p in enumerate(parts):
        llmc_datafile(root / f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.bin", p, model_desc)
    return parts


def test_llmc_folder_opens_with_gpt2(tmp_path, rng):
    val, *train = llmc_folder(tmp_path / "fw", rng)
    assert is_token_dataset(tmp_path / "fw")
    for tok in ("gpt2", "r50k_base"):  # the same ranks file under two names
        ds = open_dataset(tmp_path / "fw", tok)
        assert ds.manifest is None and ds.tokenizer_name is None
        assert [p.name for p in ds.train.paths] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
        np.testing.assert_array_equal(ds.train.read(0, len(ds.train)), np.concatenate(train))
        np.testing.assert_array_equal(ds.val.read(0, len(ds.val)), val)
        assert "700 training tokens in 2 shard(s), 300 validation tokens" in ds.describe()


def test_llmc_names_without_index_and_without_val(tmp_path, rng):
    (tmp_path / "ts").mkdir()
    llmc_datafile(tmp_path / "ts" / "tiny_shakespeare_train.bin", rng.integers(0, 50257, 50))
    llmc_datafile(tmp_path / "ts" / "tiny_shakespeare_val.bin", rng.integers(0, 50257, 20))
    ds = open_dataset(tmp_path / "ts", "gpt2")
    assert (len(ds.train), len(ds.val)) == (50, 20)
    (tmp_path / "ts" / "tiny_shakespeare_val.bin").unlink()
    assert open_dataset(tmp_path / "ts", "gpt2").val is None


def test_llmc_folder_with_another_tokenizer_is_refused(tmp_path, rng):
    llmc_folder(tmp_path / "fw", rng)
    with pytest.raises(ShardError, match=r"carry no tokenizer record .* only with --tokenizer gpt2, not "
                                         r"'cl100k_base'"):
        open_dataset(tmp_path / "fw", "cl100k_base")


def test_llmc_llama3_folder_is_refused_with_gpt2(tmp_path, rng):
    llmc_folder(tmp_path / "ll", rng, model_desc="llama-3")
    with pytest.raises(ShardError, match="uint32 tokens"):
        open_dataset(tmp_path / "ll", "gpt2")


@pytest.mark.parametrize("layout, error, message", [
    ({}, ShardError, "holds no token shards"),
    ({"notes.txt": 5, "x.bin": 5}, ShardError, "holds no token shards"),
    ({"fw_val_000000.bin": 5}, ShardError, "no training shards"),
    ({"a_train_000001.bin": 5, "b_train_000001.bin": 5}, ShardError, "several datasets .prefixes a, b"),
    ({"fw_train_000001.bin": 5, INCOMPLETE_MARKER: 0}, ShardError, "unfinished .* run the same prepare command"),
])
def test_bad_folders(tmp_path, rng, layout, error, message):
    root = tmp_path / "d"
    root.mkdir()
    for name, n in layout.items():
        if name.endswith(".bin"):
            llmc_datafile(root / name, rng.integers(0, 50257, n))
        else:
            (root / name).write_text("x")
    with pytest.raises(error, match=message) as e:
        open_dataset(root, "gpt2")
    assert str(root) in str(e.value)


def test_a_corrupt_shard_in_a_folder_names_that_shard(tmp_path, rng):
    llmc_folder(tmp_path / "fw", rng)
    bad = corrupt(tmp_path / "fw" / "fineweb_train_000002.bin", cut=3)
    with pytest.raises(ShardError, match="truncated") as e:
        open_dataset(tmp_path / "fw", "gpt2")
    assert str(bad) in str(e.value)


def test_missing_and_file_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder .*nowhere does not exist"):
        open_dataset(tmp_path / "nowhere", "gpt2")
    f = tmp_path / "corpus.txt"
    f.write_text("hello")
    assert not is_token_dataset(f) and not is_token_dataset(tmp_path / "nowhere")
    with pytest.raises(ShardError, match="is a file"):
        open_dataset(f, "gpt2")


def manifest_folder(root: Path, rng, tokenizer: str) -> dict:
    root.mkdir()
    name, sha = tokenizer_identity(tokenizer)
    n_vocab = get_tokenizer(tokenizer).n_vocab
    shards = []
    for i, (split, n) in enumerate([("val", 40), ("train", 100)]):
        p = write_shard(root / f"x_{split}_{i:06d}.bin", rng.integers(0, n_vocab, n), vocab_size=n_vocab)
        shards.append({"file": p.name, "split": split, "tokens": n})
    m = {"format": "gpt_core.shards", "version": 1, "tokenizer": {"name": name, "sha256": sha}, "shards": shards}
    (root / MANIFEST).write_text(json.dumps(m))
    return m


def test_manifest_folder_checks_the_tokenizer_hash(tmp_path, rng):
    m = manifest_folder(tmp_path / "d", rng, "cl100k_base")
    ds = open_dataset(tmp_path / "d", "cl100k_base")
    assert ds.manifest == m and ds.tokenizer_name == "cl100k_base" and ds.train.dtype == np.uint32
    with pytest.raises(ShardError, match=r"prepared with tokenizer 'cl100k_base' \(ranks sha256 223921b76ee9…\) but "
                                         r"the tokenizer given is 'gpt2' \(ranks sha256 306cd27f03c1…\)"):
        open_dataset(tmp_path / "d", "gpt2")


def test_manifest_word_vocab_changed_under_the_same_name(tmp_path, rng):
    vocab = tmp_path / "vocab.json"
    WordTokenizer.from_text("a b c d e f g h").save(vocab)
    manifest_folder(tmp_path / "d", rng, f"word:{vocab}")
    assert open_dataset(tmp_path / "d", f"word:{vocab}").train is not None
    WordTokenizer.from_text("a b c d e f g h i").save(vocab)  # same path, other ids
    with pytest.raises(ShardError, match="its token ids would mean other words"):
        open_dataset(tmp_path / "d", f"word:{vocab}")


@pytest.mark.parametrize("edit, message", [
    (lambda m, root: (root / m["shards"][1]["file"]).unlink(), "listed in .* but missing"),
    (lambda m, root: write_shard(root / m["shards"][1]["file"], [1, 2], vocab_size=100277),
     "holds 2 tokens but .* lists 100"),
    (lambda m, root: (root / MANIFEST).write_text("{not json"), "is not valid JSON"),
    (lambda m, root: (root / MANIFEST).write_text(json.dumps({**m, "version": 99})), "manifest version 99"),
    (lambda m, root: (root / MANIFEST).write_text(json.dumps({**m, "format": "x"})), "not a manifest written by"),
    (lambda m, root: (root / MANIFEST).write_text(json.dumps({**m, "shards": m["shards"][:1]})),
     "lists no training shards"),
])
def test_manifest_folder_changed_after_prepare(tmp_path, rng, edit, message):
    m = manifest_folder(tmp_path / "d", rng, "cl100k_base")
    edit(m, tmp_path / "d")
    with pytest.raises(ShardError, match=message):
        open_dataset(tmp_path / "d", "cl100k_base")


# ------------------------------------------------------------------------------------------- tokenizer hash
def tiktoken_expected_hash(tiktoken_name: str) -> str:
    """The sha256 tiktoken's own constructor demands of the ranks file it downloads."""
    from tiktoken_ext import openai_public

    seen = {}

    def capture(url, expected_hash=None):
        seen["hash"] = expected_hash
        return get_tokenizer("gpt2")._mergeable_ranks  # any ranks; only the hash matters here

    with mock.patch.object(openai_public, "load_tiktoken_bpe", capture):
        openai_public.ENCODING_CONSTRUCTORS[tiktoken_name]()
    return seen["hash"]


@pytest.mark.parametrize("name, tiktoken_name, filename", [
    ("gpt2", "r50k_base", "gpt2.tiktoken"), ("cl100k_base", "cl100k_base", "cl100k_base.tiktoken")])
def test_tokenizer_identity_is_the_ranks_file_hash(name, tiktoken_name, filename):
    assert tokenizer_identity(name) == (name, tiktoken_expected_hash(tiktoken_name))
    # the fallback for encodings not shipped (downloaded by tiktoken) gives the same hash from the ranks
    assert ranks_sha256(get_tokenizer(name)) == hashlib.sha256((ASSETS / filename).read_bytes()).hexdigest()


def test_tokenizer_identity_of_a_word_vocab(tmp_path):
    vocab = WordTokenizer.from_text("one two three").save(tmp_path / "v.json")
    assert tokenizer_identity(f"word:{vocab}") == (f"word:{vocab}", hashlib.sha256(vocab.read_bytes()).hexdigest())
    with pytest.raises(FileNotFoundError):
        tokenizer_identity(f"word:{tmp_path / 'missing.json'}")
