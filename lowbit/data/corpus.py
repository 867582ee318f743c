"""Text corpora and token windows: the always-present stdlib pydoc topics, the licence texts bundled
with jaxlib (an out-of-domain evaluation text) or any text file, a deterministic calibration /
evaluation split of the token stream, fixed-length windows, and calibration mixtures of several
sources (texts, or windows the model generates itself, supplied by the caller).
"""

from __future__ import annotations

from pathlib import Path

import re

import numpy as np

PYDOC = "pydoc"
LICENSES = "licenses"
CORPORA = (PYDOC, LICENSES)
GENERATED = "generated"  # a calibration source: windows sampled from the model being quantized
SPLITS = ("all", "calibration", "evaluation")
LICENSES_PACKAGE = "jaxlib"


def _is_rule(paragraph: str) -> bool:
    """A paragraph of separator lines only (----, ====)."""
    return not re.sub(r"[-=_*~\s]", "", paragraph)


def licenses_text() -> str:
    """The third-party licence texts bundled in jaxlib's wheel (its dist-info LICENSE.txt):
    English legal prose, unlike pydoc's Python reference. Paragraphs (split at blank lines)
    are kept once, in order, by their whitespace-normalized text, and separator-only
    paragraphs are dropped, so the many verbatim copies of the Apache licence count once;
    joined by a blank line. Always present offline (jax needs jaxlib); about 29.6K SmolLM2
    tokens for jaxlib 0.10.2."""
    import importlib.metadata

    try:
        distribution = importlib.metadata.distribution(LICENSES_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the {LICENSES!r} corpus needs the {LICENSES_PACKAGE} package "
                                "installed (it comes with jax)") from None
    files = [f for f in distribution.files or () if f.name == "LICENSE.txt" and
             "dist-info" in str(f)]
    if not files:
        raise FileNotFoundError(f"{LICENSES_PACKAGE} {distribution.version} ships no "
                                "dist-info LICENSE.txt; the licenses corpus cannot be built")
    text = Path(files[0].locate()).read_text(encoding="utf-8")
    seen, kept = set(), []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip("\n")
        key = " ".join(paragraph.split())
        if not key or key in seen or _is_rule(paragraph):
            continue
        seen.add(key)
        kept.append(paragraph)
    return "\n\n".join(kept)


def load_text(source: str | Path = PYDOC) -> str:
    """The text of a corpus.

    "pydoc": the values of `pydoc_data.topics.topics` joined in sorted key order, separated
    by a blank line ("\\n\\n"). "licenses": `licenses_text()`. Anything else is read as a
    UTF-8 text file.
    """
    if str(source) == PYDOC:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    if str(source) == LICENSES:
        return licenses_text()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path} (or use one of {CORPORA})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus file {path} is not UTF-8 text: {error}") from None
    if not text.strip():
        raise ValueError(f"corpus file {path} is empty")
    return text


def _as_tokens(tokens) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of ids, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {array.dtype}")
    return array.astype(np.int32)


def split_tokens(tokens, calibration_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into (calibration, evaluation), both int32 [n].

    The split is on the token stream, not on documents: calibration is the first
    round(calibration_fraction * len(tokens)) tokens and evaluation is the rest, so the parts
    are disjoint and the same for the same input.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    array = _as_tokens(tokens)
    cut = int(round(calibration_fraction * array.size))
    return array[:cut], array[cut:]


def _check_length(length: int) -> None:
    if not isinstance(length, (int, np.integer)) or length <= 0:
        raise ValueError(f"length must be a positive integer, got {length!r}")


def token_windows(tokens, length: int, count: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows from the start of `tokens`: int32 [n, length].

    n is `count`, or every full window when count is None (a partial tail is dropped).
    """
    _check_length(length)
    array = _as_tokens(tokens)
    available = array.size // length
    if available == 0:
        raise ValueError(f"{array.size} tokens available, but one window needs {length}")
    if count is None:
        count = available
    elif not isinstance(count, (int, np.integer)) or count <= 0:
        raise ValueError(f"count must be a positive integer or None, got {count!r}")
    elif count > available:
        raise ValueError(f"{count} windows of {length} tokens need {count * length} tokens, "
                         f"but only {array.size} are available ({available} windows)")
    return array[:count * length].reshape(count, length)


def calibration_samples(tokens, n_samples: int, length: int, seed: int = 0,
                        calibration_fraction: float = 0.5) -> np.ndarray:
    """n_samples windows at random (seeded) offsets inside the calibration part: int32 [n, length].

    tokens: the whole token stream; the windows come only from
    split_tokens(tokens, calibration_fraction)[0], so they never touch the evaluation part.
    Windows may overlap one another.
    """
    _check_length(length)
    if not isinstance(n_samples, (int, np.integer)) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    calibration, _ = split_tokens(tokens, calibration_fraction)
    if calibration.size < length:
        raise ValueError(f"{calibration.size} calibration tokens available, but one window "
                         f"needs {length}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, calibration.size - length + 1, size=n_samples)
    return calibration[starts[:, None] + np.arange(length)[None, :]]


def default_split(source: str | Path) -> str:
    """The split scored by default: the evaluation half of the embedded pydoc corpus (its other
    half calibrates the PTQ methods), and the whole of any other text ("licenses", a file) from
    its first token."""
    return "evaluation" if str(source) == PYDOC else "all"


def corpus_tokens(tokenizer, source: str | Path = PYDOC,
                  split: str | None = None) -> tuple[np.ndarray, int]:
    """(tokens int32 [n], first): the tokens of one split of a corpus and the index of the first
    of them in the whole text's token stream.

    split: "all" (the whole text), "calibration" or "evaluation" (the halves of split_tokens);
    None picks default_split(source).
    """
    split = default_split(source) if split is None else split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    tokens = np.asarray(tokenizer.encode(load_text(source)), np.int32)
    if split == "all":
        return tokens, 0
    calibration, evaluation = split_tokens(tokens)
    return (calibration, 0) if split == "calibration" else (evaluation, calibration.size)


def evaluation_tokens(tokenizer, source: str | Path = PYDOC) -> np.ndarray:
    """The evaluation half of a corpus ('pydoc' or a text file), tokenized; never calibrated on."""
    return corpus_tokens(tokenizer, source, "evaluation")[0]


def _check_calibration_size(samples: int, length: int) -> None:
    for name, value in (("calibration samples", samples), ("calibration length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if length < 2:
        raise ValueError(f"calibration length must be at least 2 tokens, got {length}")


def _refuse_licenses(source) -> None:
    if str(source) == LICENSES:
        raise ValueError(f"{LICENSES!r} is the held-apart out-of-domain evaluation text; it is "
                         "never a calibration source (a method calibrated on it would close the "
                         "out-of-domain gap by construction)")


def calibration_tokens(tokenizer, source: str | Path, samples: int, length: int,
                       seed: int = 0) -> np.ndarray:
    """[samples, length] int32 windows at seeded offsets from the calibration half of a
    corpus ('pydoc' or a file); the evaluation half is never touched. 'licenses' is refused."""
    _check_calibration_size(samples, length)
    _refuse_licenses(source)
    tokens = np.asarray(tokenizer.encode(load_text(source)), np.int32)
    return calibration_samples(tokens, samples, length, seed=seed)


def calibration_sources(spec: str) -> tuple[str, ...]:
    """The sources of a calibration SPEC (`lowbit quantize --calib`): 'pydoc', 'generated' (windows
    the model samples itself), a UTF-8 text file, or several of these joined by '+' (e.g.
    'pydoc+generated'); a SPEC that names an existing file is that one file, '+' or not.
    'licenses' is refused (calibration_tokens), as is an unknown name or a repeated source."""
    spec = str(spec)
    if Path(spec).expanduser().is_file():
        return (spec,)
    sources = tuple(part.strip() for part in spec.split("+"))
    for source in sources:
        if not source:
            raise ValueError(f"calibration spec {spec!r} has an empty part; join sources with "
                             f"'+', e.g. '{PYDOC}+{GENERATED}'")
        _refuse_licenses(source)
        if source not in (PYDOC, GENERATED) and not Path(source).expanduser().is_file():
            raise ValueError(f"unknown calibration source {source!r} in {spec!r}: not "
                             f"{PYDOC!r}, {GENERATED!r} nor an existing text file")
    repeated = sorted({s for s in sources if sources.count(s) > 1})
    if repeated:
        raise ValueError(f"calibration spec {spec!r} lists {', '.join(repeated)} more than once")
    return sources


def calibration_shares(spec: str, samples: int) -> dict[str, int]:
    """Windows per source of a calibration mixture: the sources of `spec` in order, each
    samples // k windows and the first samples % k one more (k sources); every source needs one."""
    sources = calibration_sources(spec)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < len(sources):
        raise ValueError(f"calibration spec {spec!r} mixes {len(sources)} sources, so it needs at "
                         f"least {len(sources)} samples (one window each), got {samples!r}")
    k = len(sources)
    return {source: samples // k + (j < samples % k) for j, source in enumerate(sources)}


def calibration_windows(tokenizer, spec: str, samples: int, length: int, seed: int = 0,
                        generated=None) -> np.ndarray:
    """[samples, length] int32 calibration windows of a mixture (calibration_shares): row i is the
    (i // k)-th window of source i % k, so the k sources alternate and every batch mixes them.
    A text source gives calibration_tokens(tokenizer, source, n, length, seed); 'generated' gives
    generated(n, length, seed), a callable the caller supplies (the data layer does not run
    models; lowbit.decode.calibration.generated_windows samples them)."""
    _check_calibration_size(samples, length)
    shares = calibration_shares(spec, samples)
    if GENERATED in shares and generated is None:
        raise ValueError(f"calibration spec {spec!r} includes {GENERATED!r}, which needs a "
                         "generator of the model's own windows (generated=)")
    windows = np.empty((samples, length), np.int32)
    for j, (source, count) in enumerate(shares.items()):
        part = (generated(count, length, seed) if source == GENERATED else
                calibration_tokens(tokenizer, source, count, length, seed))
        part = np.asarray(part)
        if part.shape != (count, length):
            raise ValueError(f"calibration source {source!r} gave windows of shape {part.shape}, "
                             f"expected {(count, length)}")
        windows[j::len(shares)] = part
    return windows
