"""Tests of the GGUF byte-level BPE tokenizer: a toy vocabulary (no model needed) and the real
SmolLM2 vocabulary (round trips, digit splitting, special tokens, known ids).
"""

import pytest

from lowbit.data.corpus import load_text
from lowbit.models.tokenizer import Tokenizer

TRICKY = [
    "",
    "1234567",
    "Pi is 3.14159, e is 2.71828; 1,000,000 + 42 = 1000042",
    "spaces:   three, then\ttab,\t\ttwo tabs\nnewline\n\n\nthree newlines \r\n crlf   ",
    "   leading and trailing   ",
    "unicode: café naïve Zürich — “quotes” … ½ ³ ٣ ४",
    "CJK: 你好，世界！ こんにちは 안녕하세요",
    "emoji: 🤗🚀👩‍💻 🇫🇷",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    "<|im_start|>user\nWhat is 12*34?<|im_end|>\n<|im_start|>assistant\n",
    "not special: <|im_start without end, <|unknown|>",
]


def _byte_symbols():
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


@pytest.fixture(scope="module")
def toy():
    """A toy vocabulary: 2 specials, the 256 byte symbols, and merges for ' the' and '12'."""
    tokens = ["<s>", "</s>"] + _byte_symbols() + ["Ġt", "Ġth", "Ġthe", "12"]
    merges = ["Ġ t", "Ġt h", "Ġth e", "1 2"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return Tokenizer.from_vocab(tokens, merges, types, pre="smollm", bos_id=0, eos_id=1)


def test_toy_merges_specials_and_digits(toy):
    the = toy.token_to_id("Ġthe")
    assert toy.encode(" the") == [the]
    assert toy.encode("<s> the</s>") == [0, the, 1]
    # smollm isolates digits, so the "1 2" merge never applies
    assert toy.encode("12") == [toy.token_to_id("1"), toy.token_to_id("2")]
    assert toy.vocab_size == 262 and toy.bos_id == 0 and toy.eos_id == 1
    for text in TRICKY:
        assert toy.decode(toy.encode(text)) == text


def test_toy_gpt2_pre_tokenizer_keeps_digit_runs():
    tokens = ["<s>"] + _byte_symbols() + ["12"]
    gpt2 = Tokenizer.from_vocab(tokens, ["1 2"], [3] + [1] * 257, pre="gpt2")
    assert gpt2.encode("12") == [gpt2.token_to_id("12")]


def test_bad_vocabularies_are_rejected():
    symbols = _byte_symbols()
    with pytest.raises(ValueError, match="token 'a' appears twice"):
        Tokenizer.from_vocab(symbols + ["a"], [], [1] * 257)
    with pytest.raises(ValueError, match="merge 'abc' is not two tokens"):
        Tokenizer.from_vocab(symbols, ["abc"], [1] * 256)
    with pytest.raises(ValueError, match="pre must be one of"):
        Tokenizer.from_vocab(symbols, [], [1] * 256, pre="llama3")
    with pytest.raises(ValueError, match="eos_id 999 is outside the vocabulary of 256"):
        Tokenizer.from_vocab(symbols, [], [1] * 256, eos_id=999)


def test_decode_rejects_out_of_range_ids(toy):
    with pytest.raises(ValueError, match=r"token ids \[5000\] are outside the vocabulary of 262"):
        toy.decode([3, 5000])
    with pytest.raises(ValueError, match="encode expects a str"):
        toy.encode(b"bytes")


# ---- the real SmolLM2 vocabulary -------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.mark.model
def test_smollm2_basics(smollm2):
    assert smollm2.vocab_size == 49152 and smollm2.bos_id == 1 and smollm2.eos_id == 2
    assert smollm2.encode("Hello world") == [19556, 905]
    assert [smollm2.id_to_token(i) for i in (19556, 905)] == ["Hello", "Ġworld"]
    assert smollm2.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert smollm2.encode("<|endoftext|>") == [0]
    assert smollm2.encode("Hi")[0] != smollm2.bos_id  # no BOS is added


@pytest.mark.model
def test_smollm2_digits_are_split_one_per_token(smollm2):
    ids = smollm2.encode("1234567")
    assert ids == [smollm2.token_to_id(str(d)) for d in range(1, 8)]
    assert [smollm2.decode([i]) for i in smollm2.encode("x 2024 y")] == ["x", " ", "2", "0", "2",
                                                                          "4", " y"]
    # digits are cut out before the GPT-2 regex runs, so the two spaces stay one piece
    # (the GPT-2 regex alone splits " 2" off and gives ["x", "Ġ", "Ġ", "2"])
    assert smollm2.encode("x  2") == [smollm2.token_to_id(t) for t in ("x", "ĠĠ", "2")]


@pytest.mark.model
@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_smollm2_round_trips_tricky_strings(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


@pytest.mark.model
def test_smollm2_round_trips_the_pydoc_corpus(smollm2):
    text = load_text("pydoc")
    ids = smollm2.encode(text)
    assert len(ids) == 112955
    assert smollm2.decode(ids) == text


@pytest.mark.model
def test_smollm2_special_tokens_are_single_tokens(smollm2):
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<jupyter_code>"):
        ids = smollm2.encode(f"a{name}b")
        assert len(ids) == 3 and smollm2.decode([ids[1]]) == name
