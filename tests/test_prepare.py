"""`python -m gpt_core.data prepare`: the tokens tiktoken gives, in order, cut into llm.c shards, whatever the
number of workers; every input kind; bad input named by file and line or offset; interrupted runs finish."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt_core.prepare as prep
from gpt_core.data import SAMPLE_CORPUS
from gpt_core.prepare import PrepareError, prepare
from gpt_core.shards import INCOMPLETE_MARKER, MANIFEST, ShardError, open_dataset, open_shard, read_header
from gpt_core.tokenizer import WordTokenizer, get_tokenizer

SAMPLE = SAMPLE_CORPUS.read_text(encoding="utf-8")


def reference(texts, tokenizer="gpt2") -> np.ndarray:
    """Each document's tokens as tiktoken's encode_ordinary gives them, then the end-of-text token."""
    enc = get_tokenizer(tokenizer)
    out = []
    for t in texts:
        out += enc.encode_ordinary(t) + [enc.eot_token]
    return np.array(out)


def all_tokens(root: Path, tokenizer="gpt2") -> np.ndarray:
    ds = open_dataset(root, tokenizer)
    parts = ([ds.val.read(0, len(ds.val))] if ds.val is not None else []) + [ds.train.read(0, len(ds.train))]
    return np.concatenate(parts)


def docs(n=40, seed=0) -> list[str]:
    """n documents: random slices of the sample text, some with non-ASCII text."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = int(rng.integers(0, len(SAMPLE) - 400))
        out.append(SAMPLE[a:a + int(rng.integers(1, 400))] + (" — naïve café ✓" if i % 7 == 0 else ""))
    return out


def run(inputs, out, **kw):
    kw.setdefault("val_tokens", 0)
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return prepare([str(i) for i in inputs], out, **kw)


# ---------------------------------------------------------------------------------------------- the tokens
def test_sample_corpus_val_first_then_train_shards(tmp_path):
    m = run([SAMPLE_CORPUS], tmp_path / "d", val_tokens=512, shard_tokens=1000)
    ref = reference([SAMPLE])
    assert len(ref) == 5146
    names = [s["file"] for s in m["shards"]]
    assert names == ["data_val_000000.bin"] + [f"data_train_{i:06d}.bin" for i in range(1, 6)]
    assert [s["tokens"] for s in m["shards"]] == [512, 1000, 1000, 1000, 1000, 634]
    assert m["tokens"] == {"train": 4634, "val": 512, "total": 5146} and m["documents"] == 1
    np.testing.assert_array_equal(open_shard(tmp_path / "d" / "data_val_000000.bin"), ref[:512])
    ds = open_dataset(tmp_path / "d", "gpt2")
    np.testing.assert_array_equal(ds.train.read(0, len(ds.train)), ref[512:])
    assert ds.manifest == json.loads((tmp_path / "d" / MANIFEST).read_text())
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(names + [MANIFEST])  # no marker, no tmp


def test_every_input_kind_in_order(tmp_path):
    d = docs(12)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text(d[0], encoding="utf-8")
    (src / "sub" / "a.txt.gz").write_bytes(gzip.compress(d[1].encode()))
    (src / "notes.md").write_text("ignored: not an input type")
    (src / ".hidden.txt").write_text("ignored: hidden")
    jl = tmp_path / "x.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(d[2:6])) + "\n\n")
    jz = tmp_path / "y.jsonl.gz"
    jz.write_bytes(gzip.compress("".join(json.dumps({"body": t}) + "\n" for t in d[6:9]).encode()))
    for i, t in enumerate(d[9:]):
        (tmp_path / f"glob_{i}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    m = run([src, jl, tmp_path / "glob_*.txt", tmp_path / "empty.txt"], tmp_path / "o1")
    # folder: sorted, recursed (b.txt before sub/a.txt.gz); then the jsonl lines; then the glob's matches
    expected = [d[0], d[1], *d[2:6], *d[9:]]
    np.testing.assert_array_equal(all_tokens(tmp_path / "o1"), reference(expected))
    assert m["documents"] == len(expected) and m["empty_documents_skipped"] == 1
    assert [f["path"] for f in m["files"]][:2] == [str(src / "b.txt"), str(src / "sub" / "a.txt.gz")]
    run([jz], tmp_path / "o2", text_key="body")
    np.testing.assert_array_equal(all_tokens(tmp_path / "o2"), reference(d[6:9]))


def test_one_and_two_workers_write_identical_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 500)  # many batches, so the pool really interleaves
    jl = tmp_path / "c.jsonl"
    d = docs(150, seed=1)
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in d), encoding="utf-8")
    for w in (1, 2):
        run([jl], tmp_path / f"w{w}", workers=w, val_tokens=300, shard_tokens=2000)
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert len(files) > 4 and files == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for f in files:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f
    np.testing.assert_array_equal(all_tokens(tmp_path / "w2"), reference(d))


def test_cl100k_writes_uint32_version_7(tmp_path):
    d = docs(5)
    for i, t in enumerate(d):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    m = run([tmp_path / "*.txt"], tmp_path / "o", tokenizer="cl100k_base", val_tokens=20)
    h = read_header(tmp_path / "o" / "data_train_000001.bin")
    assert (h.magic, h.version, h.dtype) == (20240801, 7, np.uint32)
    assert m["token_dtype"] == "uint32" and m["tokenizer"]["n_vocab"] == 100277
    np.testing.assert_array_equal(all_tokens(tmp_path / "o", "cl100k_base"), reference(d, "cl100k_base"))


def test_special_token_text_in_a_document_stays_text(tmp_path):
    (tmp_path / "a.txt").write_text("before <|endoftext|> after", encoding="utf-8")
    run([tmp_path / "a.txt"], tmp_path / "o")
    toks = all_tokens(tmp_path / "o")
    assert list(toks).count(50256) == 1 and toks[-1] == 50256  # only the end-of-document token is special


def test_word_tokenizer(tmp_path):
    vocab = WordTokenizer.from_text(SAMPLE).save(tmp_path / "v.json")
    tok = WordTokenizer.load(vocab)
    run([SAMPLE_CORPUS], tmp_path / "o", tokenizer=f"word:{vocab}", val_tokens=100)
    np.testing.assert_array_equal(all_tokens(tmp_path / "o", f"word:{vocab}"),
                                  tok.encode(SAMPLE) + [tok.eot_token])
    no_eot = WordTokenizer(["a", "b"]).save(tmp_path / "no_eot.json")
    with pytest.raises(PrepareError, match="has no <|endoftext|> token"):
        run([SAMPLE_CORPUS], tmp_path / "o2", tokenizer=f"word:{no_eot}")
    assert not (tmp_path / "o2").exists()  # refused before anything was written


def test_hugging_face_saved_datasets(tmp_path):
    import datasets

    d = docs(9)
    datasets.Dataset.from_dict({"content": d[:5] + [""], "n": list(range(6))}).save_to_disk(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": d[5:8]}),
                          "test": datasets.Dataset.from_dict({"content": d[8:]})}).save_to_disk(tmp_path / "dd")
    m = run([tmp_path / "ds", tmp_path / "dd"], tmp_path / "o", text_key="content")
    np.testing.assert_array_equal(all_tokens(tmp_path / "o"), reference(d[:8]))
    assert m["empty_documents_skipped"] == 1 and [f["kind"] for f in m["files"]] == ["hf", "hf"]
    run([tmp_path / "dd"], tmp_path / "o2", text_key="content", hf_split="test")
    np.testing.assert_array_equal(all_tokens(tmp_path / "o2"), reference(d[8:]))
    with pytest.raises(PrepareError, match=r"has no column 'text' \(columns: \['content', 'n'\]\)"):
        run([tmp_path / "ds"], tmp_path / "o3")
    with pytest.raises(PrepareError, match=r"has splits \['test', 'train'\], not 'validation'"):
        run([tmp_path / "dd"], tmp_path / "o4", text_key="content", hf_split="validation")
    datasets.Dataset.from_dict({"text": ["ok", None]}).save_to_disk(tmp_path / "none")
    with pytest.raises(PrepareError, match="none row 1: 'text' is a NoneType"):
        run([tmp_path / "none"], tmp_path / "o5")


# ------------------------------------------------------------------------------------------------ bad input
def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, data, message", [
    ("a.txt", b"caf\xc3\xa9 ok \xff then", r"a.txt, byte offset 9: not UTF-8 \(invalid start byte: b'\\xff th'\)"),
    ("a.txt.gz", gzip.compress(b"ok\x80"), r"a.txt.gz, byte offset 2 \(decompressed\): not UTF-8"),
    ("a.jsonl", b'{"text": "fine"}\n{"text": "bad \xfe"}\n', r"a.jsonl line 2, byte offset 31: not UTF-8"),
    ("a.jsonl", b'{"text": "fine"}\n\n{"text": oops}\n', r"a.jsonl line 3 is not JSON: Expecting value"),
    ("a.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', r"a.jsonl line 2 has no key 'text' \(it has \['body'\]\)"),
    ("a.jsonl", b'["text"]\n', r"a.jsonl line 1 has no key 'text' \(it has list\)"),
    ("a.jsonl", b'{"text": 5}\n', r"a.jsonl line 1: 'text' is a int, not a string"),
    ("a.txt", b"", "hold no documents"),
    ("a.jsonl", b"\n  \n", "hold no documents"),
    ("a.jsonl.gz", b"not gzip at all", "not a readable gzip file"),
    ("a.csv", b"x", "unknown input type"),
])
def test_bad_input_names_the_file_and_leaves_no_dataset(tmp_path, name, data, message):
    src = write(tmp_path / name, data)
    with pytest.raises(PrepareError, match=message) as e:
        run([src], tmp_path / "o")
    assert str(src) in str(e.value) or "hold no documents" in message
    assert not (tmp_path / "o" / MANIFEST).exists()
    assert not list(tmp_path.glob("o/*.bin")) and not list(tmp_path.glob("o/.*.tmp"))


@pytest.mark.parametrize("workers", [1, 2])
def test_line_numbers_and_offsets_hold_across_work_items(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(prep, "BATCH_CHARS", 64)  # each item a few lines: line 31 is deep in a later item
    good = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(1, 31))
    src = write(tmp_path / "a.jsonl.gz", gzip.compress((good + '{"text": "caf\xe9"}\n').encode("latin-1")))
    with pytest.raises(PrepareError, match=rf"a.jsonl.gz line 31, byte offset {len(good) + 13} \(decompressed\): "
                                           "not UTF-8"):
        run([src], tmp_path / "o", workers=workers)
    src = write(tmp_path / "b.jsonl", (good + "{oops}\n").encode())
    with pytest.raises(PrepareError, match="b.jsonl line 31 is not JSON"):
        run([src], tmp_path / "o", workers=workers)
    listed = list(prep.iter_documents(prep.resolve_inputs([tmp_path / "a.jsonl.gz"]), errors="replace"))
    assert listed[29] == (f"{tmp_path / 'a.jsonl.gz'} line 30", "line 30") and listed[30][1] == "caf\ufffd"


def test_errors_replace_goes_on(tmp_path):
    src = write(tmp_path / "a.txt", b"caf\xc3\xa9 ok \xff then")
    m = run([src], tmp_path / "o", errors="replace")
    np.testing.assert_array_equal(all_tokens(tmp_path / "o"), reference(["café ok \ufffd then"]))
    assert m["documents_with_replaced_bytes"] == 1


def test_missing_paths_and_empty_matches(tmp_path):
    with pytest.raises(FileNotFoundError, match="input .*missing.txt does not exist"):
        run([tmp_path / "missing.txt"], tmp_path / "o")
    with pytest.raises(PrepareError, match="matches nothing"):
        run([tmp_path / "*.jsonl"], tmp_path / "o")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PrepareError, match="holds no .txt, .jsonl"):
        run([tmp_path / "empty_dir"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_validation_larger_than_the_data(tmp_path):
    with pytest.raises(PrepareError, match="--val-tokens 5,146 leaves no training tokens: the inputs hold only 5,146"):
        run([SAMPLE_CORPUS], tmp_path / "o", val_tokens=5146)
    with pytest.raises(PrepareError, match="--val-tokens 9,999 leaves no training tokens"):
        run([SAMPLE_CORPUS], tmp_path / "o", val_tokens=9999)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [INCOMPLETE_MARKER]
    with pytest.raises(ShardError, match="unfinished"):
        open_dataset(tmp_path / "o", "gpt2")
    assert run([SAMPLE_CORPUS], tmp_path / "o", val_tokens=5145)["tokens"]["train"] == 1


@pytest.mark.parametrize("kw, message", [
    (dict(workers=0), "--workers must be >= 1"), (dict(shard_tokens=0), "--shard-tokens must be in"),
    (dict(shard_tokens=2**31), "int32"), (dict(val_tokens=-1), "--val-tokens must be in"),
    (dict(prefix="a/b"), "--prefix"), (dict(tokenizer="no_such_encoding"), "unknown encoding"),
])
def test_bad_options(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        run([SAMPLE_CORPUS], tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


def test_out_folder_rules(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("mine")
    with pytest.raises(PrepareError, match="not empty and holds no earlier prepare"):
        run([SAMPLE_CORPUS], tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["thesis.tex"]
    run([SAMPLE_CORPUS], tmp_path / "o", shard_tokens=1000)
    with pytest.raises(PrepareError, match="already holds a prepared dataset .* --overwrite"):
        run([SAMPLE_CORPUS], tmp_path / "o")
    m = run([SAMPLE_CORPUS], tmp_path / "o", overwrite=True)  # one shard now: the old five are gone
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["data_train_000001.bin", MANIFEST]
    assert m["shards"] == [{"file": "data_train_000001.bin", "split": "train", "tokens": 5146}]


# ------------------------------------------------------------------------------------------- crash safety
def test_interrupted_prepare_leaves_nothing_that_looks_complete_and_a_rerun_finishes(tmp_path, monkeypatch):
    kw = dict(val_tokens=512, shard_tokens=1000)
    run([SAMPLE_CORPUS], tmp_path / "clean", **kw)

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(prep._Shards, "commit", interrupted)  # every shard written, then Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            run([SAMPLE_CORPUS], tmp_path / "o", **kw)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [INCOMPLETE_MARKER]
    with pytest.raises(ShardError, match="unfinished"):
        open_dataset(tmp_path / "o", "gpt2")
    run([SAMPLE_CORPUS], tmp_path / "o", **kw)
    for p in (tmp_path / "clean").iterdir():
        assert (tmp_path / "o" / p.name).read_bytes() == p.read_bytes(), p.name
    assert len(list((tmp_path / "o").iterdir())) == len(list((tmp_path / "clean").iterdir()))


def test_rerun_after_a_killed_prepare(tmp_path):
    """What `kill -9` leaves: the marker, finished shards under temporary names, a half shard, and (killed
    while renaming) some final names, among them a stale one from a larger layout."""
    o = tmp_path / "o"
    o.mkdir()
    (o / INCOMPLETE_MARKER).write_text("")
    (o / ".data_val_000000.bin.tmp").write_bytes(b"\0" * 2048)
    (o / ".data_train_000001.bin.tmp").write_bytes(b"\0" * 100)
    (o / "data_train_000009.bin").write_bytes(b"\0" * 1030)
    with pytest.raises(ShardError, match="unfinished"):
        open_dataset(o, "gpt2")
    m = run([SAMPLE_CORPUS], o, val_tokens=512)
    assert sorted(p.name for p in o.iterdir()) == ["data_train_000001.bin", "data_val_000000.bin", MANIFEST]
    np.testing.assert_array_equal(all_tokens(o), reference([SAMPLE]))
    assert m["tokens"]["val"] == 512


def start_and_signal(tmp_path: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Run the CLI on a corpus that takes seconds, and send `sig` once its first shard is being written."""
    import os
    import time

    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        line = json.dumps({"text": SAMPLE}) + "\n"
        corpus.write_text(line * 400, encoding="utf-8")  # 8 MB, 2M tokens
    # Ctrl-C as a terminal delivers it, to a process that does not ignore SIGINT: a suite started in the background
    # by a non-interactive shell (`make test &`) ignores SIGINT, as POSIX has it, and the child would inherit that.
    import signal

    p = subprocess.Popen([sys.executable, "-m", "gpt_core.data", "prepare", str(corpus), "--out", str(out),
                          "--workers", "2", "--shard-tokens", "20000", "--val-tokens", "1000", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180  # a loaded machine: the signal must land mid-run, not in the exit
    while not list(out.glob(".*.bin.tmp")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "prepare finished before it could be interrupted"
    assert list(out.glob(".*.bin.tmp")), "no shard was being written after 180 s"
    os.kill(p.pid, sig)
    stdout, stderr = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_and_kill_of_a_running_prepare(tmp_path):
    import signal

    r = start_and_signal(tmp_path, tmp_path / "a", signal.SIGINT)
    assert r.returncode == 130 and "interrupted: no manifest was written" in r.stderr
    assert "Traceback" not in r.stderr  # the workers ignore Ctrl-C; the main process cleans up
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [INCOMPLETE_MARKER]

    r = start_and_signal(tmp_path, tmp_path / "b", signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / MANIFEST).exists() and (tmp_path / "b" / INCOMPLETE_MARKER).exists()
    with pytest.raises(ShardError, match="unfinished"):
        open_dataset(tmp_path / "b", "gpt2")
    r = cli("prepare", tmp_path / "corpus.jsonl", "--out", tmp_path / "b", "--workers", "2", "--shard-tokens",
            "20000", "--val-tokens", "1000", "--no-progress")
    assert r.returncode == 0, r.stderr
    ds = open_dataset(tmp_path / "b", "gpt2")
    one = reference([SAMPLE])
    assert len(ds.train) + len(ds.val) == 400 * len(one)
    np.testing.assert_array_equal(ds.train.read(len(ds.train) - len(one), len(one)), one)  # the last document
    assert not list((tmp_path / "b").glob(".*"))


# ------------------------------------------------------------------------------------------------------ CLI
def cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt_core.data", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_prepare_info_and_help(tmp_path):
    r = cli("prepare", SAMPLE_CORPUS, "--out", tmp_path / "d", "--val-tokens", "1e2", "--shard-tokens", "2_000",
            "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr  # runpy's double-import warning, among others
    assert "5,146 tokens (100 validation) in 3 training shard(s) + 1 validation" in r.stderr
    assert "tok/s" in r.stderr  # the progress bar
    r = cli("info", tmp_path / "d")
    assert r.returncode == 0 and "5,046 training tokens in 3 shard(s), 100 validation tokens" in r.stdout
    r = cli("info", tmp_path / "d", "--tokenizer", "cl100k_base")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "prepared with tokenizer 'gpt2'" in r.stderr
    r = cli("prepare", tmp_path / "nope.txt", "--out", tmp_path / "e")
    assert r.returncode == 2 and "nope.txt does not exist" in r.stderr
    r = cli("prepare", "--help")
    assert r.returncode == 0
    for flag in ("--tokenizer", "--text-key", "--workers", "--shard-tokens", "--val-tokens", "--errors", "--out",
                 "--hf-split", "magic 20240520"):
        assert flag in r.stdout
    r = cli("prepare", SAMPLE_CORPUS, "--out", tmp_path / "f", "--shard-tokens", "1.5")
    assert r.returncode == 2 and "not a whole count" in r.stderr
