"""Tests of corpus loading, the calibration / evaluation split and token windows."""

import numpy as np
import pytest
from pydoc_data.topics import topics

from lowbit.data.corpus import calibration_samples, load_text, split_tokens, token_windows


def test_pydoc_corpus_is_the_sorted_topics():
    text = load_text("pydoc")
    keys = sorted(topics)
    assert text == "\n\n".join(topics[k] for k in keys)
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert len(text) > 400_000 and load_text() == text


def test_text_files(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(path) == "héllo\nworld\n" and load_text(str(path)) == "héllo\nworld\n"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_text(empty)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="blob.bin is not UTF-8"):
        load_text(binary)


def test_split_is_disjoint_ordered_and_deterministic():
    tokens = np.arange(1001)
    calibration, evaluation = split_tokens(tokens)
    assert calibration.dtype == np.int32 and evaluation.dtype == np.int32
    assert calibration.tolist() == list(range(500))
    assert evaluation.tolist() == list(range(500, 1001))
    calibration, evaluation = split_tokens(list(range(10)), calibration_fraction=0.3)
    assert calibration.tolist() == [0, 1, 2] and evaluation.tolist() == list(range(3, 10))
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="calibration_fraction must be in"):
            split_tokens(tokens, calibration_fraction=bad)
    with pytest.raises(ValueError, match="1-D sequence"):
        split_tokens(np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="must be integers"):
        split_tokens(np.zeros(4, float))


def test_token_windows():
    tokens = np.arange(23)
    windows = token_windows(tokens, 5)
    assert windows.dtype == np.int32 and windows.shape == (4, 5)
    assert windows.tolist() == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert token_windows(tokens, 5, count=2).tolist() == windows[:2].tolist()
    with pytest.raises(ValueError, match="5 windows of 5 tokens need 25 tokens, but only 23 are"):
        token_windows(tokens, 5, count=5)
    with pytest.raises(ValueError, match="3 tokens available, but one window needs 8"):
        token_windows([1, 2, 3], 8)
    with pytest.raises(ValueError, match="length must be a positive integer"):
        token_windows(tokens, 0)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        token_windows(tokens, 5, count=0)


def test_calibration_samples_stay_in_the_calibration_part():
    tokens = np.arange(1000)
    samples = calibration_samples(tokens, n_samples=64, length=16, seed=3)
    assert samples.dtype == np.int32 and samples.shape == (64, 16)
    assert (np.diff(samples, axis=1) == 1).all()  # each sample is a contiguous window
    assert samples.max() < 500  # never reaches the evaluation half
    assert np.array_equal(samples, calibration_samples(tokens, 64, 16, seed=3))
    assert not np.array_equal(samples, calibration_samples(tokens, 64, 16, seed=4))
    assert len(set(samples[:, 0].tolist())) > 32  # offsets are spread out
    fractioned = calibration_samples(tokens, 64, 16, seed=3, calibration_fraction=0.2)
    assert fractioned.max() < 200
    message = "10 calibration tokens available, but one window needs 16"
    with pytest.raises(ValueError, match=message):
        calibration_samples(np.arange(20), 4, 16)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        calibration_samples(tokens, 0, 16)


class BytesAsIds:
    def encode(self, text):
        return list(text.encode())


def test_corpus_tokens_split_and_first_token(tmp_path):
    from lowbit.data.corpus import corpus_tokens, default_split, evaluation_tokens

    path = tmp_path / "file.txt"
    path.write_text("abcdefghij")
    whole, first = corpus_tokens(BytesAsIds(), path)  # a file: all of it, from its first token
    assert first == 0 and whole.tolist() == list(b"abcdefghij") and whole.dtype == np.int32
    evaluation, first = corpus_tokens(BytesAsIds(), path, "evaluation")
    assert first == 5 and evaluation.tolist() == list(b"fghij")
    assert evaluation_tokens(BytesAsIds(), path).tolist() == list(b"fghij")
    calibration, first = corpus_tokens(BytesAsIds(), path, "calibration")
    assert first == 0 and calibration.tolist() == list(b"abcde")
    assert (default_split("pydoc"), default_split(path)) == ("evaluation", "all")
    with pytest.raises(ValueError, match="split must be one of all, calibration, evaluation"):
        corpus_tokens(BytesAsIds(), path, "test")


def test_calibration_tokens_come_from_the_calibration_half(tmp_path):
    from lowbit.data.corpus import calibration_tokens

    path = tmp_path / "file.txt"
    path.write_text("".join(chr(65 + i % 26) for i in range(200)))
    windows = calibration_tokens(BytesAsIds(), path, samples=6, length=8, seed=1)
    stream = np.asarray(list(path.read_bytes()))
    assert windows.shape == (6, 8)
    for window in windows:  # each window is a run of the first 100 tokens
        starts = [s for s in range(100 - 8 + 1) if (stream[s:s + 8] == window).all()]
        assert starts
    with pytest.raises(ValueError, match="calibration length must be at least 2"):
        calibration_tokens(BytesAsIds(), path, samples=2, length=1)


def test_licenses_corpus_is_deduplicated_legal_prose():
    from lowbit.data.corpus import LICENSES, default_split, licenses_text

    text = load_text(LICENSES)
    assert text == licenses_text() == load_text("licenses")  # deterministic
    paragraphs = text.split("\n\n")
    keys = [" ".join(p.split()) for p in paragraphs]
    assert len(keys) == len(set(keys)) and all(keys)  # each paragraph once, none empty
    assert text.count("TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION") == 1
    assert "Apache License" in text and "Mozilla Public License" in text
    assert len(text) > 80_000 and topics["if"][:200] not in text  # not pydoc's text
    assert default_split(LICENSES) == "all" and default_split("pydoc") == "evaluation"


def test_calibration_specs_name_their_sources_and_refuse_the_evaluation_text(tmp_path):
    from lowbit.data.corpus import calibration_shares, calibration_sources, calibration_tokens

    notes = tmp_path / "notes.txt"
    notes.write_text("some text " * 50)
    plus = tmp_path / "a+b.txt"  # a file whose name holds '+' is that file
    plus.write_text("more text " * 50)
    assert calibration_sources("pydoc") == ("pydoc",)
    assert calibration_sources("generated") == ("generated",)
    assert calibration_sources(f"pydoc+generated+{notes}") == ("pydoc", "generated", str(notes))
    assert calibration_sources(" pydoc + generated ") == ("pydoc", "generated")
    assert calibration_sources(str(plus)) == (str(plus),)
    for spec, message in [("licenses", "held-apart out-of-domain"),
                          ("pydoc+licenses", "held-apart out-of-domain"),
                          ("wikitext", "unknown calibration source 'wikitext'"),
                          (f"pydoc+{tmp_path / 'missing.txt'}", "unknown .*missing.txt"),
                          ("pydoc+", "empty part"),
                          ("pydoc+generated+pydoc", "lists pydoc more than once")]:
        with pytest.raises(ValueError, match=message):
            calibration_sources(spec)
    with pytest.raises(ValueError, match="held-apart"):  # the text API refuses it too
        calibration_tokens(BytesAsIds(), "licenses", samples=2, length=8)
    # equal shares, the first sources take the remainder; every source needs a window
    assert calibration_shares("pydoc+generated", 32) == {"pydoc": 16, "generated": 16}
    assert calibration_shares(f"pydoc+generated+{notes}", 8) == {
        "pydoc": 3, "generated": 3, str(notes): 2}
    for samples in (1, 0, True):
        with pytest.raises(ValueError, match="mixes 2 sources, so it needs at least 2 samples"):
            calibration_shares("pydoc+generated", samples)


def test_a_mixture_alternates_its_sources_in_the_stated_shares(tmp_path):
    from lowbit.data.corpus import calibration_tokens, calibration_windows

    path = tmp_path / "file.txt"
    path.write_text("".join(chr(65 + i % 26) for i in range(400)))  # ids 65..90
    calls = []

    def generated(count, length, seed):  # stands in for the model: ids 200 + row
        calls.append((count, length, seed))
        return 200 + np.repeat(np.arange(count)[:, None], length, axis=1)

    windows = calibration_windows(BytesAsIds(), f"generated+{path}", 7, 16, seed=3,
                                  generated=generated)
    assert windows.dtype == np.int32 and windows.shape == (7, 16)
    assert calls == [(4, 16, 3)]  # 7 = 4 generated + 3 from the file, same seed
    assert windows[0::2].tolist() == (200 + np.repeat(np.arange(4)[:, None], 16, axis=1)).tolist()
    assert windows[1::2].tolist() == calibration_tokens(BytesAsIds(), path, 3, 16, seed=3).tolist()
    # one text source: exactly calibration_tokens; deterministic
    alone = calibration_windows(BytesAsIds(), str(path), 5, 16, seed=1)
    assert alone.tolist() == calibration_tokens(BytesAsIds(), path, 5, 16, seed=1).tolist()
    with pytest.raises(ValueError, match="includes 'generated', which needs a generator"):
        calibration_windows(BytesAsIds(), "pydoc+generated", 4, 16)
    with pytest.raises(ValueError, match=r"gave windows of shape \(2, 15\), expected \(2, 16\)"):
        calibration_windows(BytesAsIds(), "generated", 2, 16,
                            generated=lambda n, length, seed: np.zeros((n, length - 1)))
    with pytest.raises(ValueError, match="calibration samples must be a positive integer, got 0"):
        calibration_windows(BytesAsIds(), "generated", 0, 16, generated=generated)
