import hashlib

import numpy as np
import pytest
import tiktoken

from gpt_core import get_tokenizer, iterate_batches, load_text, sliding_windows, train_val_split
from gpt_core.tokenizer import ASSETS

# Expected values from the seed notebooks (shared/data/README.md), not computed by this code.
HELLO = "Hello, do you like tea? <|endoftext|> In the sunlit terracesof someknownPlace."
HELLO_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 1659, 617,
             4002, 27271, 13]


def test_gpt2_tokenizer_reproduces_seed_ids():
    enc = get_tokenizer("gpt2")
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode(HELLO, allowed_special={"<|endoftext|>"}) == HELLO_IDS
    assert enc.decode(HELLO_IDS) == HELLO
    assert enc.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert enc.encode("Hello, I am") == [15496, 11, 314, 716]


def test_shipped_files_are_the_published_ones():
    digest = hashlib.sha256((ASSETS / "gpt2.tiktoken").read_bytes()).hexdigest()
    assert digest == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base
    text = load_text()
    assert len(text) == 20_479
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f")


def test_unknown_encoding_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown encoding 'not-an-encoding'"):
        get_tokenizer("not-an-encoding")


def test_unshipped_encoding_offline_says_why(monkeypatch, tmp_path):
    # Force tiktoken to fetch (empty cache dir) from an unreachable address: the error must say so.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    import tiktoken.load

    def offline(url):
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    get_tokenizer.cache_clear()
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # drop encodings tiktoken already built
    with pytest.raises(RuntimeError, match="offline"):
        get_tokenizer("p50k_base")


def test_verdict_windows_match_the_seed():
    ids = get_tokenizer("gpt2").encode(load_text())
    assert len(ids) == 5145
    inputs, targets = sliding_windows(ids, max_length=4, stride=4)
    assert inputs.dtype == np.int64 and inputs.shape == (1286, 4)
    assert inputs[:3].tolist() == [[40, 367, 2885, 1464], [1807, 3619, 402, 271], [10899, 2138, 257, 7026]]
    assert targets[:3].tolist() == [[367, 2885, 1464, 1807], [3619, 402, 271, 10899], [2138, 257, 7026, 15632]]


def test_sliding_windows_semantics():
    ids = list(range(10))
    x, y = sliding_windows(ids, max_length=3, stride=2)
    # GPTDatasetV1: for i in range(0, len - max_length, stride)
    assert x.tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8]]
    assert (y == x + 1).all()
    x, _ = sliding_windows(ids, max_length=9, stride=1)
    assert x.tolist() == [list(range(9))]  # exactly one window fits


@pytest.mark.parametrize("kwargs, match", [
    ({"token_ids": list(range(5)), "max_length": 5, "stride": 1}, "too short"),
    ({"token_ids": list(range(50)), "max_length": 4, "stride": 0}, "stride"),
    ({"token_ids": list(range(50)), "max_length": 0, "stride": 1}, "max_length"),
    ({"token_ids": np.zeros((2, 20)), "max_length": 4, "stride": 1}, "1-D"),
])
def test_sliding_windows_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sliding_windows(**kwargs)


def test_batches_are_seeded_and_drop_last():
    x, y = sliding_windows(np.arange(100), max_length=4, stride=4)  # 24 windows
    a = list(iterate_batches(x, y, 5, seed=1))
    b = list(iterate_batches(x, y, 5, seed=1))
    c = list(iterate_batches(x, y, 5, seed=2))
    assert len(a) == 4 and all(bx.shape == (5, 4) for bx, _ in a)
    assert all((p[0] == q[0]).all() for p, q in zip(a, b, strict=True))
    assert not all((p[0] == q[0]).all() for p, q in zip(a, c, strict=True))
    resumed = list(iterate_batches(x, y, 5, seed=1, start=2))  # mid-epoch: the same order, from batch 2
    assert len(resumed) == 2 and all((p[0] == q[0]).all() for p, q in zip(resumed, a[2:], strict=True))
    seen = np.concatenate([bx[:, 0] for bx, _ in a])
    assert len(set(seen.tolist())) == 20  # no window twice in an epoch
    assert all((by == bx + 1).all() for bx, by in a)  # pairs stay together
    tail = list(iterate_batches(x, y, 5, shuffle=False, drop_last=False))
    assert len(tail) == 5 and tail[-1][0].shape == (4, 4) and tail[0][0][0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="larger than"):
        next(iterate_batches(x, y, 25))


def test_train_val_split():
    train, val = train_val_split(np.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(np.arange(10), 1.0)


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(tmp_path / "nope.txt")
