"""The three tokenizers of the seed notebooks, offline; expected values from shared/data/README.md."""

import random
import shutil
import subprocess
import sys

import pytest

from gpt_core import WordTokenizer, load_text
from gpt_core.tokenizer import ASSETS, check_vocab_size, encode_text, get_tokenizer, load_shipped

CHINESE = ("小沈阳江西演唱会邀请沈春，\n明星刀郎的歌火遍大江南北\n"
           "2002年的第一场雪比2001年来得\n大模型张老师的粉丝全是正能量")


def test_word_tokenizer_reproduces_the_seed():
    tok = WordTokenizer.from_text(load_text())
    assert tok.n_vocab == 1135 and tok.tokens[:3] == ["", "\n", " "]
    assert tok.vocab["<|endoftext|>"] == 1133 and tok.vocab["<|unk|>"] == 1134
    ids = tok.encode("Hello, do you like tea? <|endoftext|> Peace and Love.")
    assert ids == [1134, 8, 358, 1129, 631, 978, 13, 1133, 1134, 160, 1134, 10]
    assert tok.decode(ids) == " <|unk|>, do you like tea? <|endoftext|> <|unk|> and <|unk|>."
    assert tok.eot_token == 1133


def test_word_tokenizer_without_unk_names_the_word():
    tok = WordTokenizer.from_text("the cat sat", specials=("<|endoftext|>",))
    assert tok.encode("the cat") == [tok.vocab["the"], tok.vocab["cat"]]
    with pytest.raises(ValueError, match="'dog' is not in the vocabulary"):
        tok.encode("the dog")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([999])


def test_word_tokenizer_save_load_round_trip(tmp_path):
    tok = WordTokenizer.from_text(load_text())
    path = tok.save(tmp_path / "vocab.json")
    again = get_tokenizer(f"word:{path}")
    assert again.tokens == tok.tokens and again.specials == tok.specials
    text = "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough."
    assert again.encode(text) == tok.encode(text)
    (tmp_path / "bad.json").write_text('{"type": "bpe"}')
    with pytest.raises(ValueError, match="not a word vocabulary"):
        WordTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_tokenizer(f"word:{tmp_path / 'nope.json'}")


def test_cl100k_base_reproduces_the_seed():
    enc = get_tokenizer("cl100k_base")
    ids = enc.encode(CHINESE)
    assert len(CHINESE) == 60 and len(ids) == 69 and max(ids) == 92877
    assert enc.decode([83175]) == "阳"
    specials = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
    assert all(enc.encode(s, allowed_special="all") == [i] for s, i in specials.items())


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_bpe_round_trips_random_unicode(name):
    enc = get_tokenizer(name)
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), *range(0x4E00, 0x4E80), 0x1F600, 0x1F680]]
    for _ in range(200):
        text = "".join(rng.choice(alphabet + [" ", "\n", "\t"]) for _ in range(rng.randint(0, 60)))
        assert enc.decode(enc.encode(text)) == text


def test_a_corrupted_ranks_file_is_refused(tmp_path):
    shutil.copy(ASSETS / "gpt2.tiktoken", tmp_path / "gpt2.tiktoken")
    with open(tmp_path / "gpt2.tiktoken", "ab") as f:
        f.write(b"IQ== 50256\n")  # one extra merge: a different file
    with pytest.raises(ValueError, match="refusing .* sha256"):
        load_shipped("gpt2", assets=tmp_path)
    assert load_shipped("gpt2").encode("Hello, I am") == [15496, 11, 314, 716]  # the shipped file passes


def test_encode_text_and_vocab_check():
    assert encode_text(get_tokenizer("gpt2"), "a<|endoftext|>b") == [64, 50256, 65]
    check_vocab_size(50304, get_tokenizer("gpt2"))  # padded vocabularies are fine
    with pytest.raises(ValueError, match="vocab_size 50257 is smaller than the tokenizer's 100277"):
        check_vocab_size(50257, get_tokenizer("cl100k_base"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt_core.tokenizer", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_shows_ids_and_pieces():
    out = run_cli("--encoding", "gpt2", "Hello, do you like tea?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[15496, 11, 466, 345, 588, 8887, 30]", "Hello|,| do| you| like| tea|?"]


def test_cli_counts_a_file(tmp_path):
    out = run_cli("--count", str(ASSETS / "the-verdict.txt"))
    assert out.returncode == 0 and out.stdout.strip() == "5145"
    vocab = WordTokenizer.from_text(load_text()).save(tmp_path / "v.json")
    out = run_cli("--encoding", f"word:{vocab}", "Hello, do you")
    assert out.stdout.splitlines() == ["[1134, 8, 358, 1129]", "<|unk|>|,|do|you"]


def test_cli_errors():
    assert run_cli().returncode == 2  # neither text nor --count
    out = run_cli("--encoding", "nonsense", "x")
    assert out.returncode == 2 and "unknown encoding 'nonsense'" in out.stderr
    out = run_cli("--count", "/nonexistent/file.txt")
    assert out.returncode == 2 and "No such file" in out.stderr
