"""Byte-level BPE tokenizer rebuilt from a GGUF file's vocabulary and merges (GPT-2 style,
with the "smollm" pre-tokenizer: digits split one by one, then the GPT-2 regex).
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

# GGUF token types (llama.cpp's llama_token_type): 1 normal, 2 unknown, 3 control,
# 4 user defined, 5 unused, 6 byte. Control and user-defined tokens are matched whole.
_SPECIAL_TOKEN_TYPES = (3, 4)
# llama.cpp pre-tokenizer names this module reproduces, and whether digits are isolated first.
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False}


def _pre_tokenizer(split_digits: bool):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not split_digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


class Tokenizer:
    """Text <-> token ids for a GPT-2 style byte-level BPE vocabulary. No BOS is added."""

    def __init__(self, backend: BackendTokenizer, bos_id: int | None, eos_id: int | None):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id

    @classmethod
    def from_gguf(cls, source: str | Path | GGUFReader) -> "Tokenizer":
        """Build from tokenizer.ggml.* metadata (model gpt2, pre smollm or gpt2)."""
        from lowbit.models.gguf.reader import metadata_value, open_gguf

        reader = source if isinstance(source, GGUFReader) else open_gguf(source)
        where = reader.data.filename
        kind = metadata_value(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{where}: tokenizer model {kind!r} is not supported (only 'gpt2')")
        pre = metadata_value(reader, "tokenizer.ggml.pre", "gpt2")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"{where}: pre-tokenizer {pre!r} is not supported "
                             f"(supported: {', '.join(_PRE_TOKENIZERS)})")
        tokens = metadata_value(reader, "tokenizer.ggml.tokens")
        merges = metadata_value(reader, "tokenizer.ggml.merges")
        types = metadata_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
        bos = metadata_value(reader, "tokenizer.ggml.bos_token_id", None)
        eos = metadata_value(reader, "tokenizer.ggml.eos_token_id", None)
        return cls.from_vocab(tokens, merges, types, pre=pre, bos_id=bos, eos_id=eos)

    @classmethod
    def from_vocab(cls, tokens: list[str], merges: list[str], token_types: list[int],
                   pre: str = "smollm", bos_id: int | None = None,
                   eos_id: int | None = None) -> "Tokenizer":
        """Build from byte-level token strings, "left right" merge strings and token types."""
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"pre must be one of {sorted(_PRE_TOKENIZERS)}, got {pre!r}")
        vocab: dict[str, int] = {}
        for index, token in enumerate(tokens):
            if token in vocab:
                raise ValueError(f"token {token!r} appears twice (ids {vocab[token]} and {index})")
            vocab[token] = index
        pairs = []
        for merge in merges:
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"merge {merge!r} is not two tokens separated by one space")
            pairs.append((parts[0], parts[1]))
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None and not 0 <= value < len(tokens):
                raise ValueError(f"{name} {value} is outside the vocabulary of {len(tokens)}")
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                              byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(_PRE_TOKENIZERS[pre])
        backend.decoder = decoders.ByteLevel()
        special = [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False)
                   for token, kind in zip(tokens, token_types) if kind in _SPECIAL_TOKEN_TYPES]
        backend.add_special_tokens(special)
        return cls(backend, None if bos_id is None else int(bos_id),
                   None if eos_id is None else int(eos_id))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text become single ids."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids` (special tokens included as written)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string in byte-level form (e.g. "Ġthe"), None if absent."""
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """The byte-level token string of an id."""
        return self.backend.id_to_token(int(index))
