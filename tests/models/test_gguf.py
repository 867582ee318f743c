"""Tests of GGUF reading: dequantization of every supported type against the gguf package,
file validation errors, the llama name/layout mapping (including the Q/K row permutation)
and exact QArray exposure, on synthetic files and on the real SmolLM2 file.
"""

import struct
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize as reference_quantize

from lowbit.models.gguf.blocks import BLOCK_LAYOUTS, dequantize_ggml, ggml_type, qarray_parts
from lowbit.models.gguf.llama_names import (iter_llama_weights, llama_config, permute_rope_rows,
                                     tensor_qarray, unpermute_rope_rows)
from lowbit.models.gguf.reader import list_tensors, open_gguf, read_tensor

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ1_0, T.TQ2_0]
BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
               T.TQ1_0, T.TQ2_0]
# byte offsets of the fp16 fields (d, m/dmin) inside one block of each type
FP16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
               T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
               T.TQ1_0: [52], T.TQ2_0: [64]}


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _random_blocks(qtype, rows, row_length, seed):
    """Random bytes for [rows, row_length] elements with finite fp16 scales planted."""
    block, type_size = BLOCK_LAYOUTS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * row_length // block, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scales = (rng.standard_normal(raw.shape[0]) * 0.05).astype("<f2")
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


# ---- dequantization against gguf.quants ----------------------------------------------------
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_quantized_data(qtype):
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0, :64] = 0.0  # an all-zero block (d = 0)
    x[1, 5] = 40.0   # an outlier
    data = reference_quantize(x, qtype)
    ours = dequantize_ggml(data, qtype, x.shape)
    assert ours.dtype == np.float32
    assert _same_bits(ours, reference_dequantize(data, qtype))
    assert np.abs(ours - x).max() > 0 or qtype == T.F32  # really quantized, not an identity


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_blocks(qtype):
    raw = _random_blocks(qtype, 4, 768, seed=int(qtype) + 100)
    ours = dequantize_ggml(raw, qtype, (4, 768))
    assert np.isfinite(ours).all()
    assert _same_bits(ours, reference_dequantize(raw, qtype))


def test_dequantize_accepts_bytes_and_higher_rank_shapes():
    raw = _random_blocks(T.Q6_K, 6, 256, seed=3)
    expected = reference_dequantize(raw, T.Q6_K).reshape(2, 3, 256)
    assert _same_bits(dequantize_ggml(raw.tobytes(), T.Q6_K, (2, 3, 256)), expected)
    assert _same_bits(dequantize_ggml(raw, "q6_k", [2, 3, 256]), expected)
    assert _same_bits(dequantize_ggml(raw, int(T.Q6_K), (2, 3, 256)), expected)


def test_q4_1_block_layout_by_hand():
    # d = 0.5, m = -1; byte j holds element j (low nibble) and element j + 16 (high nibble)
    low, high = np.arange(16, dtype=np.uint8), (15 - np.arange(16)).astype(np.uint8)
    block = np.concatenate([np.array([0.5, -1.0], "<f2").view(np.uint8), low | (high << 4)])
    values = dequantize_ggml(block, T.Q4_1, (32,))
    assert values.tolist() == (np.concatenate([low, high]) * 0.5 - 1.0).tolist()


def test_bf16_and_f16_are_exact():
    x = np.array([1.0, -2.5, 3.140625, 65504.0, -0.0, 1e-3], np.float32)
    assert dequantize_ggml(x.astype(np.float16), T.F16, (6,)).tolist() == \
        x.astype(np.float16).astype(np.float32).tolist()
    y = np.array([1.0, -2.5, 3.140625, 65536.0, -0.0, 2.0 ** -130], np.float32)  # exact in bf16
    bf16 = (y.view(np.uint32) >> 16).astype("<u2")
    assert dequantize_ggml(bf16, T.BF16, (6,)).tolist() == y.tolist()


def test_dequantize_rejects_bad_input():
    raw = _random_blocks(T.Q4_1, 1, 64, seed=0)
    with pytest.raises(ValueError, match="must be 40 bytes, got 39"):
        dequantize_ggml(raw.reshape(-1)[:39], T.Q4_1, (64,))
    with pytest.raises(ValueError, match="multiple of the Q4_1 block size 32"):
        dequantize_ggml(raw, T.Q4_1, (2, 48))
    with pytest.raises(ValueError, match="IQ2_XXS, which lowbit cannot dequantize"):
        dequantize_ggml(raw, T.IQ2_XXS, (64,))
    with pytest.raises(ValueError, match="unknown ggml type name 'Q9_9'"):
        ggml_type("Q9_9")
    with pytest.raises(ValueError, match="unknown ggml type 77"):
        ggml_type(77)


# ---- exact QArrays ---------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", list(BLOCK_TYPES[:2]) + [T.Q8_0], ids=lambda t: t.name)
def test_qarray_parts_reproduce_the_float_values(qtype):
    raw = _random_blocks(qtype, 3, 96, seed=int(qtype))
    codes, scale, zero, spec = qarray_parts(raw, qtype, (3, 96))
    groups = np.repeat(scale.astype(np.float32), 32, axis=1)
    values = codes.astype(np.float32) * groups
    if zero is not None:
        values = values + np.repeat(zero.astype(np.float32), 32, axis=1)
    assert _same_bits(values, dequantize_ggml(raw, qtype, (3, 96)))
    expected = {T.Q4_0: ("int4:g32", np.int8, -8, 7), T.Q4_1: ("int4:g32:asym", np.uint8, 0, 15),
                T.Q8_0: ("int8:g32", np.int8, -128, 127)}[qtype]
    assert spec == expected[0] and codes.dtype == expected[1]
    assert expected[2] <= codes.min() and codes.max() <= expected[3]
    assert (zero is None) == (qtype != T.Q4_1)
    with pytest.raises(ValueError, match="Q6_K has no exact QArray form"):
        qarray_parts(_random_blocks(T.Q6_K, 1, 256, 0), T.Q6_K, (256,))


# ---- synthetic files -------------------------------------------------------------------------
TINY = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            ffn_dim=96, rope_base=50000.0, norm_eps=1e-5, max_seq_len=256)


def _hf_weights(seed=0, tied=True):
    """Random HF-layout ([out, in]) weights of the TINY llama."""
    rng = np.random.default_rng(seed)
    c = TINY
    q_dim, kv_dim = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]

    def mat(out, inp):
        return (rng.standard_normal((out, inp)) * 0.1).astype(np.float32)

    w = {"embed": mat(c["vocab_size"], c["d_model"]),
         "final_norm": (1 + 0.1 * rng.standard_normal(c["d_model"])).astype(np.float32)}
    for i in range(c["n_layers"]):
        w[f"{i}.attn_norm"] = (1 + 0.1 * rng.standard_normal(c["d_model"])).astype(np.float32)
        w[f"{i}.ffn_norm"] = (1 + 0.1 * rng.standard_normal(c["d_model"])).astype(np.float32)
        w[f"{i}.q"], w[f"{i}.k"] = mat(q_dim, c["d_model"]), mat(kv_dim, c["d_model"])
        w[f"{i}.v"], w[f"{i}.o"] = mat(kv_dim, c["d_model"]), mat(c["d_model"], q_dim)
        w[f"{i}.gate"] = mat(c["ffn_dim"], c["d_model"])
        w[f"{i}.up"] = mat(c["ffn_dim"], c["d_model"])
        w[f"{i}.down"] = mat(c["d_model"], c["ffn_dim"])
    if not tied:
        w["output"] = mat(c["vocab_size"], c["d_model"])
    return w


def _converter_permute(w, n_heads):
    """What the HF -> GGUF converter does to q/k rows."""
    grouped = w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
    return grouped.swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama(path, hf, linear_type=T.F32, embed_type=T.F32, arch="llama", extra=None):
    c = TINY
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c["n_layers"])
    writer.add_context_length(c["max_seq_len"])
    writer.add_embedding_length(c["d_model"])
    writer.add_feed_forward_length(c["ffn_dim"])
    writer.add_head_count(c["n_heads"])
    writer.add_head_count_kv(c["n_kv_heads"])
    writer.add_rope_freq_base(c["rope_base"])
    writer.add_layer_norm_rms_eps(c["norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    writer.add_rope_dimension_count(c["head_dim"])

    def add(name, array, qtype):
        if qtype == T.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, reference_quantize(array, qtype), raw_dtype=qtype)

    add("token_embd.weight", hf["embed"], embed_type)
    for i in range(c["n_layers"]):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", hf[f"{i}.attn_norm"], T.F32)
        add(b + "attn_q.weight", _converter_permute(hf[f"{i}.q"], c["n_heads"]), linear_type)
        add(b + "attn_k.weight", _converter_permute(hf[f"{i}.k"], c["n_kv_heads"]), linear_type)
        add(b + "attn_v.weight", hf[f"{i}.v"], linear_type)
        add(b + "attn_output.weight", hf[f"{i}.o"], linear_type)
        add(b + "ffn_norm.weight", hf[f"{i}.ffn_norm"], T.F32)
        add(b + "ffn_gate.weight", hf[f"{i}.gate"], linear_type)
        add(b + "ffn_up.weight", hf[f"{i}.up"], linear_type)
        add(b + "ffn_down.weight", hf[f"{i}.down"], linear_type)
    add("output_norm.weight", hf["final_norm"], T.F32)
    if "output" in hf:
        add("output.weight", hf["output"], linear_type)
    for name, (array, qtype) in (extra or {}).items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _lowbit_expected(hf, qtype):
    """The lowbit-layout weights expected from a file written with `qtype` linears."""
    def stored(array):
        if qtype == T.F32:
            return array
        return reference_dequantize(reference_quantize(array, qtype), qtype)

    out = {"embed": hf["embed"], "final_norm": hf["final_norm"]}
    for i in range(TINY["n_layers"]):
        p = f"layers.{i}."
        out[p + "attn_norm"], out[p + "ffn_norm"] = hf[f"{i}.attn_norm"], hf[f"{i}.ffn_norm"]
        for ours, theirs in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o"),
                             ("w_gate", "gate"), ("w_up", "up"), ("w_down", "down")):
            out[p + ours] = stored(hf[f"{i}.{theirs}"]).T
    if "output" in hf:
        out["lm_head"] = stored(hf["output"]).T
    return out


def test_tiny_llama_f32_round_trips_to_hf_layout(tmp_path):
    hf = _hf_weights(seed=1, tied=True)
    path = _write_tiny_llama(tmp_path / "tiny.gguf", hf)
    config = llama_config(path)
    assert config == dict(TINY, tied_embeddings=True)
    expected = _lowbit_expected(hf, T.F32)
    got = dict(iter_llama_weights(path))
    assert sorted(got) == sorted(expected) and "lm_head" not in got  # tied: no lm_head
    assert list(got)[:3] == ["embed", "layers.0.attn_norm", "layers.0.wq"]
    for name, value in got.items():
        assert value.dtype == np.float32 and value.flags.c_contiguous, name
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_tiny_llama_quantized_untied(tmp_path, qtype):
    hf = _hf_weights(seed=2, tied=False)
    path = _write_tiny_llama(tmp_path / "tiny.gguf", hf, linear_type=qtype, embed_type=T.Q8_0)
    reader = open_gguf(path)
    assert llama_config(reader)["tied_embeddings"] is False
    expected = _lowbit_expected(hf, qtype)
    expected["embed"] = reference_dequantize(reference_quantize(hf["embed"], T.Q8_0), T.Q8_0)
    floats = dict(iter_llama_weights(reader))
    assert sorted(floats) == sorted(expected) and list(floats)[-1] == "lm_head"
    for name, value in floats.items():
        assert _same_bits(value, expected[name]), name
    # keep_quantized: every block tensor comes as a QArray equal bit for bit to the float form
    quantized = dict(iter_llama_weights(reader, keep_quantized=True))
    for name in ("embed", "layers.0.wq", "layers.1.wk", "layers.0.w_down", "lm_head"):
        q = quantized[name]
        assert q.shape == floats[name].shape, name
        assert q.axis == (1 if name == "embed" else 0)
        assert _same_bits(np.asarray(q.dequantize()), floats[name]), name
    assert isinstance(quantized["final_norm"], np.ndarray)


def test_tensor_qarray_transposes_to_in_out(tmp_path):
    hf = _hf_weights(seed=3)
    path = _write_tiny_llama(tmp_path / "tiny.gguf", hf, linear_type=T.Q4_1)
    q = tensor_qarray(path, "blk.0.ffn_down.weight")
    assert q.shape == (96, 64) and q.axis == 0 and q.scale.shape == (3, 64)
    assert q.scale.dtype == jnp.float16 and str(q.spec) == "int4:g32:asym"
    assert _same_bits(np.asarray(q.dequantize()), read_tensor(path, "blk.0.ffn_down.weight").T)


def _rope_interleaved(x, positions, base):
    """llama.cpp's normal RoPE: rotate adjacent pairs (2j, 2j+1) by pos * base^(-2j/d)."""
    d = x.shape[-1]
    angle = positions[:, None] * base ** (-np.arange(0, d, 2) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(angle) - b * np.sin(angle)
    out[..., 1::2] = a * np.sin(angle) + b * np.cos(angle)
    return out


def _rope_rotate_half(x, positions, base):
    """HF's RoPE: rotate pairs (j, j + d/2) by pos * base^(-2j/d)."""
    d = x.shape[-1]
    angle = positions[:, None] * base ** (-np.arange(0, d, 2) / d)
    a, b = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           a * np.sin(angle) + b * np.cos(angle)], axis=-1)


def test_unpermuted_rows_with_rotate_half_match_gguf_rows_with_interleaved_rope():
    rng = np.random.default_rng(4)
    n_heads, head_dim, d, seq = 3, 8, 12, 5
    hf_q = rng.standard_normal((n_heads * head_dim, d))
    hf_k = rng.standard_normal((n_heads * head_dim, d))
    gguf_q, gguf_k = _converter_permute(hf_q, n_heads), _converter_permute(hf_k, n_heads)
    np.testing.assert_array_equal(unpermute_rope_rows(gguf_q, n_heads), hf_q)
    x, pos = rng.standard_normal((seq, d)), np.arange(seq, dtype=np.float64) * 7

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(seq, n_heads, head_dim).transpose(1, 0, 2), pos, 1000.0)
        k = rope((x @ wk.T).reshape(seq, n_heads, head_dim).transpose(1, 0, 2), pos, 1000.0)
        return q @ k.transpose(0, 2, 1)

    reference = scores(gguf_q, gguf_k, _rope_interleaved)  # what llama.cpp computes
    ours = scores(unpermute_rope_rows(gguf_q, n_heads), unpermute_rope_rows(gguf_k, n_heads),
                  _rope_rotate_half)
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)
    wrong = scores(gguf_q, gguf_k, _rope_rotate_half)  # forgetting to unpermute is detectable
    assert np.abs(wrong - reference).max() > 1e-3


def test_unpermute_rejects_odd_heads():
    with pytest.raises(ValueError, match="cannot be split into 4 heads"):
        unpermute_rope_rows(np.zeros((12, 3)), 4)
    with pytest.raises(ValueError, match="cannot be split into 4 heads"):
        permute_rope_rows(np.zeros((12, 3)), 4)


@pytest.mark.parametrize("n_heads, head_dim", [(3, 8), (9, 64), (1, 2)])
def test_permute_rope_rows_is_the_converters_permutation_and_unpermute_inverts_it(n_heads,
                                                                                head_dim):
    rng = np.random.default_rng(n_heads)
    hf = rng.standard_normal((n_heads * head_dim, 5))
    permuted = permute_rope_rows(hf, n_heads)
    np.testing.assert_array_equal(permuted, _converter_permute(hf, n_heads))
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_heads), hf)
    np.testing.assert_array_equal(permute_rope_rows(unpermute_rope_rows(hf, n_heads), n_heads),
                                  hf)
    if head_dim > 2:
        assert not np.array_equal(permuted, hf)


# ---- file errors ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return _write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", _hf_weights(seed=5))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        open_gguf(tmp_path / "nope.gguf")


def test_bad_magic_and_too_short(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="bad.gguf.*bad magic"):
        open_gguf(bad)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="short.gguf.*too short"):
        open_gguf(short)


def test_truncated_file_names_the_tensor(tmp_path, tiny_file):
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="cut.gguf.*truncated: tensor 'output_norm.weight'"):
        open_gguf(cut)
    header_cut = tmp_path / "header_cut.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(ValueError, match="header_cut.gguf.*truncated"):
        open_gguf(header_cut)


def test_unknown_tensor_type_id_names_the_tensor(tmp_path, tiny_file):
    data = bytearray(tiny_file.read_bytes())
    name = b"blk.1.attn_v.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)
    patched = tmp_path / "patched.gguf"
    patched.write_bytes(bytes(data))
    message = "tensor 'blk.1.attn_v.weight' has unknown ggml type id 99"
    with pytest.raises(ValueError, match=message):
        open_gguf(patched)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    extra = {"extra.weight": (np.zeros((2, 18), np.uint8), T.IQ4_NL)}
    path = _write_tiny_llama(tmp_path / "iq.gguf", _hf_weights(seed=6), extra=extra)
    listed = {t.name: t for t in list_tensors(path)}
    assert listed["extra.weight"].type_name == "IQ4_NL" and listed["extra.weight"].shape == (2, 32)
    with pytest.raises(ValueError, match="tensor 'extra.weight' has ggml type IQ4_NL"):
        read_tensor(path, "extra.weight")
    with pytest.raises(ValueError, match="does not use: extra.weight"):
        next(iter_llama_weights(path))


def test_other_architecture_is_rejected(tmp_path):
    path = _write_tiny_llama(tmp_path / "gpt2.gguf", _hf_weights(seed=7), arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        llama_config(path)
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        next(iter_llama_weights(path))


def test_missing_tensor_is_reported(tmp_path):
    hf = _hf_weights(seed=8)
    path = _write_tiny_llama(tmp_path / "t.gguf", hf)
    with pytest.raises(ValueError, match="no tensor named 'blk.9.attn_q.weight'"):
        read_tensor(path, "blk.9.attn_q.weight")


# ---- the real SmolLM2 file -----------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path):
    return open_gguf(smollm2_path)


SMOLLM2_CONFIG = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                      head_dim=64, ffn_dim=1536, rope_base=100000.0, norm_eps=1e-5,
                      max_seq_len=8192, tied_embeddings=True)


@pytest.mark.model
def test_smollm2_tensor_list_and_config(smollm2_reader):
    tensors = list_tensors(smollm2_reader)
    assert len(tensors) == 272
    kinds = {}
    for t in tensors:
        kinds[t.type_name] = kinds.get(t.type_name, 0) + 1
    assert kinds == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    by_name = {t.name: t for t in tensors}
    assert by_name["token_embd.weight"].shape == (49152, 576)
    assert by_name["token_embd.weight"].n_bytes == 49152 * 576 // 32 * 34
    assert by_name["blk.0.ffn_down.weight"].shape == (576, 1536)
    assert llama_config(smollm2_reader) == SMOLLM2_CONFIG


@pytest.mark.model
def test_smollm2_tensors_match_gguf_dequantize(smollm2_reader):
    names = ["token_embd.weight", "output_norm.weight"] + [
        t.name for t in smollm2_reader.tensors if t.name.startswith(("blk.0.", "blk.29."))]
    tensors = {t.name: t for t in smollm2_reader.tensors}
    for name in names:
        t = tensors[name]
        expected = reference_dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))
        assert _same_bits(read_tensor(smollm2_reader, name), expected), name


@pytest.mark.model
def test_smollm2_llama_weights(smollm2_reader):
    shapes = {}
    first = {}
    for name, value in iter_llama_weights(smollm2_reader):
        shapes[name] = value.shape
        assert value.dtype == np.float32 and np.isfinite(value).all(), name
        if name in ("layers.0.wq", "layers.0.wk", "layers.0.w_down"):
            first[name] = value
    assert len(shapes) == 1 + 30 * 9 + 1 and "lm_head" not in shapes
    assert shapes["embed"] == (49152, 576) and shapes["final_norm"] == (576,)
    assert shapes["layers.7.wq"] == (576, 576) and shapes["layers.7.wk"] == (576, 192)
    assert shapes["layers.7.wv"] == (576, 192) and shapes["layers.7.wo"] == (576, 576)
    assert shapes["layers.7.w_gate"] == (576, 1536) and shapes["layers.7.w_down"] == (1536, 576)
    q = read_tensor(smollm2_reader, "blk.0.attn_q.weight")
    k = read_tensor(smollm2_reader, "blk.0.attn_k.weight")
    np.testing.assert_array_equal(first["layers.0.wq"], unpermute_rope_rows(q, 9).T)
    np.testing.assert_array_equal(first["layers.0.wk"], unpermute_rope_rows(k, 3).T)
    np.testing.assert_array_equal(first["layers.0.w_down"],
                                  read_tensor(smollm2_reader, "blk.0.ffn_down.weight").T)


@pytest.mark.model
def test_smollm2_qarrays_are_lossless(smollm2_reader):
    wanted = {"embed", "layers.0.wq", "layers.0.wk", "layers.0.w_up"}
    floats = {}
    for name, value in iter_llama_weights(smollm2_reader):
        if name in wanted:
            floats[name] = value
        if len(floats) == len(wanted):
            break
    quantized = {}
    for name, value in iter_llama_weights(smollm2_reader, keep_quantized=True):
        if name in wanted:
            quantized[name] = value
        if len(quantized) == len(wanted):
            break
    assert str(quantized["embed"].spec) == "int8:g32" and quantized["embed"].axis == 1
    assert str(quantized["layers.0.wq"].spec) == "int4:g32:asym"
    for name in wanted:
        assert _same_bits(np.asarray(quantized[name].dequantize()), floats[name]), name


# ---- header and extent validation (corrupt files) ------------------------------------------
def _header_fields(data: bytes):
    """Positions of the header's numeric fields, from an independent walk of a GGUF file:
    (kind, position, struct format, tensor name or None) for the counts, lengths, tensor dims,
    types and offsets."""
    fields, pos = [], 8

    def take(kind, fmt, name=None):
        nonlocal pos
        fields.append((kind, pos, fmt, name))
        value = struct.unpack_from("<" + fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    n_tensors, n_kv = take("tensor_count", "Q"), take("kv_count", "Q")
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    for _ in range(n_kv):
        length = take("key_length", "Q")
        pos += length
        value_type = take("value_type", "I")
        if value_type == 8:
            length = take("string_length", "Q")
            pos += length
        elif value_type == 9:
            item_type, count = take("array_type", "I"), take("array_length", "Q")
            if item_type == 8:
                for _ in range(count):
                    length = take("string_length", "Q")
                    pos += length
            else:
                pos += count * sizes[item_type]
        else:
            pos += sizes[value_type]
    for _ in range(n_tensors):
        length = take("name_length", "Q")
        name = data[pos:pos + length].decode()
        pos += length
        for _ in range(take("n_dims", "I", name)):
            take("dim", "Q", name)
        take("type", "I", name)
        take("offset", "Q", name)
    return fields


def _patched(tmp_path, source: bytes, kind: str, value: int, tensor: str | None = None,
             nth: int = 0, name: str = "patched.gguf"):
    data = bytearray(source)
    matches = [(pos, fmt) for k, pos, fmt, t in _header_fields(source)
               if k == kind and (tensor is None or t == tensor)]
    pos, fmt = matches[nth]
    struct.pack_into("<" + fmt, data, pos, value)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    """The tiny llama with a Q8_0 embedding (as SmolLM2 has) and Q4_1 linears."""
    return _write_tiny_llama(tmp_path_factory.mktemp("gguf") / "q8.gguf", _hf_weights(seed=9),
                             linear_type=T.Q4_1, embed_type=T.Q8_0)


def test_a_type_changed_to_another_valid_type_is_refused_naming_the_tensor(tmp_path, q8_file):
    source = q8_file.read_bytes()
    for new_type in (T.F16, T.Q4_0, T.F32):  # larger, smaller and much larger extents
        path = _patched(tmp_path, source, "type", int(new_type), tensor="token_embd.weight")
        with pytest.raises(ValueError, match=f"corrupt header: tensor 'token_embd.weight' "
                                             f"\\({new_type.name}.*type or shape"):
            open_gguf(path)


def test_misaligned_overlapping_and_zero_sized_extents_are_refused(tmp_path, tiny_file):
    source = tiny_file.read_bytes()
    fields = _header_fields(source)
    offsets = {t: struct.unpack_from("<Q", source, pos)[0]
               for k, pos, _, t in fields if k == "offset"}
    cases = [
        (("offset", offsets["blk.0.attn_q.weight"] + 4, "blk.0.attn_q.weight"),
         "tensor 'blk.0.attn_q.weight' has data offset .* not a multiple of the alignment 32"),
        (("offset", offsets["blk.0.attn_q.weight"], "blk.0.attn_k.weight"),
         "overlaps tensor"),
        (("dim", 0, "blk.0.attn_norm.weight"), "tensor 'blk.0.attn_norm.weight' has a dimension of 0"),
        (("offset", 2**62, "output_norm.weight"),
         "corrupt header: tensor 'output_norm.weight'.*beyond the"),
        (("dim", 2**40, "blk.1.ffn_up.weight"), "corrupt header: tensor 'blk.1.ffn_up.weight'"),
    ]
    for (kind, value, tensor), message in cases:
        with pytest.raises(ValueError, match=message):
            open_gguf(_patched(tmp_path, source, kind, value, tensor))


def _small_gguf(path):
    """A small GGUF with string, string-array and int-array metadata and three tensors of
    different types (F32, Q8_0, Q4_1), written by the gguf package."""
    rng = np.random.default_rng(11)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "fuzz")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc", ""])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 1, 3])
    writer.add_uint32("llama.context_length", 64)
    writer.add_tensor("norm.weight", (1 + 0.1 * rng.standard_normal(64)).astype(np.float32))
    for name, qtype in (("embed.weight", T.Q8_0), ("linear.weight", T.Q4_1)):
        x = (0.1 * rng.standard_normal((4, 64))).astype(np.float32)
        writer.add_tensor(name, reference_quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    return _small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


@pytest.mark.parametrize("kind, nth", [("tensor_count", 0), ("kv_count", 0), ("key_length", 2),
                                       ("string_length", 0), ("string_length", 3),
                                       ("array_length", 0), ("array_length", 1),
                                       ("name_length", 1)])
def test_huge_declared_counts_are_corrupt_and_fail_at_once(tmp_path, small_file, kind, nth):
    import time

    path = _patched(tmp_path, small_file.read_bytes(), kind, 2**40, nth=nth)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="corrupt header"):
        open_gguf(path)
    assert time.perf_counter() - start < 0.5


def test_a_string_array_count_that_fits_the_file_is_still_walked_quickly(tmp_path):
    """A count checked against the bytes left bounds the loop by the file size (8 bytes per
    string at least): 2**17 empty strings in a 1 MiB file take well under a second."""
    import time

    writer = gguf.GGUFWriter(str(tmp_path / "many.gguf"), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a"])
    writer.add_tensor("w", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray((tmp_path / "many.gguf").read_bytes()) + bytes(2**20)
    path = _patched(tmp_path, bytes(data), "array_length", 2**17)
    start = time.perf_counter()
    with pytest.raises(ValueError):
        open_gguf(path)
    assert time.perf_counter() - start < 1.0


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    hf = _hf_weights(seed=10)
    path = _write_tiny_llama(tmp_path / "nan.gguf", hf, linear_type=T.Q8_0, embed_type=T.Q8_0)
    data = bytearray(path.read_bytes())
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    del reader
    # the fp16 scale of the first block of blk.1.attn_v.weight becomes NaN; one F32 norm gets inf
    struct.pack_into("<e", data, int(tensors["blk.1.attn_v.weight"].data_offset), float("nan"))
    bad = tmp_path / "bad_scale.gguf"
    bad.write_bytes(bytes(data))
    for keep_quantized in (False, True):
        with pytest.raises(ValueError, match="tensor 'blk.1.attn_v.weight' decodes to [0-9]+ non-finite"):
            list(iter_llama_weights(bad, keep_quantized=keep_quantized))
    with pytest.raises(ValueError, match="'blk.1.attn_v.weight' decodes to [0-9]+ non-finite"):
        read_tensor(bad, "blk.1.attn_v.weight")
    with pytest.raises(ValueError, match="'blk.1.attn_v.weight' decodes to"):
        tensor_qarray(bad, "blk.1.attn_v.weight")
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, int(tensors["blk.0.ffn_norm.weight"].data_offset) + 8,
                     float("inf"))
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="tensor 'blk.0.ffn_norm.weight' decodes to 1 non-finite"):
        list(iter_llama_weights(bad))


# ---- fuzzing: every corrupt file is a ValueError or decodes to finite values -----------------
_INTERESTING = (0, 1, 2, 3, 31, 32, 33, 64, 255, 2**16, 2**31 - 1, 2**32 - 1, 2**32, 2**63 - 1,
                2**64 - 1)


def _mutate(source: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation of a GGUF file: a header field set to an interesting or nearby value
    (counts, lengths, dims, types, offsets), a few random bytes of the header changed, two
    tensors' offsets swapped, or the file cut short."""
    data = bytearray(source)
    fields = _header_fields(source)
    header_end = fields[-1][1] + 8
    choice = rng.integers(0, 5)
    if choice <= 1:  # one field, or (choice 1) two fields at once
        for _ in range(choice + 1):
            kind, pos, fmt, _ = fields[rng.integers(0, len(fields))]
            old = struct.unpack_from("<" + fmt, data, pos)[0]
            limit = 2 ** (8 * struct.calcsize(fmt))
            if kind == "type" and rng.random() < 0.6:
                value = int(rng.choice([int(t) for t in T]))
            else:
                value = int(rng.choice([*_INTERESTING, old + 1, old - 1, old * 2, old + 32,
                                        int(rng.integers(0, 2**32))]))
            struct.pack_into("<" + fmt, data, pos, value % limit)
    elif choice == 2:  # random bytes in the header
        for pos in rng.integers(8, header_end, rng.integers(1, 5)):
            data[pos] = int(rng.integers(0, 256))
    elif choice == 3:  # two tensors trade offsets
        offsets = [pos for kind, pos, _, _ in fields if kind == "offset"]
        a, b = rng.choice(len(offsets), 2, replace=False)
        first, second = data[offsets[a]:offsets[a] + 8], data[offsets[b]:offsets[b] + 8]
        data[offsets[a]:offsets[a] + 8], data[offsets[b]:offsets[b] + 8] = second, first
    else:  # cut short
        data = data[:rng.integers(0, len(data))]
    return bytes(data)


def _load_every_tensor(path) -> str:
    """'refused' (a ValueError naming the file) or 'loaded' (every tensor decoded, all finite)."""
    try:
        reader = open_gguf(path)
        for tensor in reader.tensors:
            values = read_tensor(reader, tensor.name)
            assert np.isfinite(values).all(), tensor.name
    except ValueError as error:
        assert str(path) in str(error), error
        return "refused"
    return "loaded"


def _fuzz(tmp_path, source: bytes, cases: int, seed: int) -> dict:
    import time

    rng = np.random.default_rng(seed)
    outcomes = {"refused": 0, "loaded": 0}
    path = tmp_path / "fuzzed.gguf"
    for case in range(cases):
        path.write_bytes(_mutate(source, rng))
        start = time.perf_counter()
        outcomes[_load_every_tensor(path)] += 1
        seconds = time.perf_counter() - start
        assert seconds < 1.0, f"case {case} (seed {seed}) took {seconds:.2f} s"
    return outcomes


def test_fuzzed_headers_are_refused_or_load_finite_tensors(tmp_path, small_file):
    outcomes = _fuzz(tmp_path, small_file.read_bytes(), cases=300, seed=0)
    assert outcomes["refused"] > 200 and outcomes["loaded"] > 0, outcomes


@pytest.mark.slow
def test_fuzzed_headers_many_cases(tmp_path, small_file):
    for seed in range(1, 21):
        outcomes = _fuzz(tmp_path, small_file.read_bytes(), cases=1000, seed=seed)
        assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes


@pytest.mark.model
def test_smollm2_with_its_embedding_type_flipped_is_refused(tmp_path, smollm2_path):
    source = Path(smollm2_path).read_bytes()
    path = _patched(tmp_path, source, "type", int(T.F16), tensor="token_embd.weight")
    with pytest.raises(ValueError, match="tensor 'token_embd.weight' \\(F16.*overlaps"):
        open_gguf(path)


# ---- runtime "packed": the model computes from the file's own blocks -------------------------
def _linears(model):
    from flax import nnx

    return [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]


@pytest.mark.parametrize("linear_type, tied", [(T.Q4_1, True), (T.Q4_0, False), (T.Q8_0, True)],
                         ids=["Q4_1-tied", "Q4_0-untied", "Q8_0-tied"])
def test_packed_runtime_keeps_the_file_blocks_and_matches_the_float_load(tmp_path, linear_type, tied):
    from lowbit.nn.gguf_layers import GgufEmbed, GgufLinear
    from lowbit.models.llama import Llama
    from lowbit.decode import generate
    from lowbit.models.loader import load_gguf_model

    hf = _hf_weights(seed=4, tied=tied)
    path = _write_tiny_llama(tmp_path / "tiny.gguf", hf, linear_type=linear_type, embed_type=T.Q8_0)
    packed, config = load_gguf_model(path, runtime="packed")
    floats, _ = load_gguf_model(path, runtime="dequant")
    assert type(packed) is Llama and isinstance(packed.embed, GgufEmbed)
    assert not _linears(packed)  # no float copy of any quantized matrix
    reader = open_gguf(path)
    file_bytes = {t.name: np.asarray(t.data).reshape(-1) for t in reader.tensors}
    layer = packed.layers[1]
    # wv / w_down hold the file's bytes as they are; wq / wk the same rows in HF order
    assert np.array_equal(np.asarray(layer.attn.wv.blocks[...]).reshape(-1), file_bytes["blk.1.attn_v.weight"])
    assert np.array_equal(np.asarray(layer.mlp.w_down.blocks[...]).reshape(-1), file_bytes["blk.1.ffn_down.weight"])
    assert isinstance(layer.attn.wq, GgufLinear) and layer.attn.wq.ggml_type == linear_type.name
    for ours, theirs in ((packed.layers[0].attn.wq, floats.layers[0].attn.wq),
                         (packed.layers[0].attn.wk, floats.layers[0].attn.wk)):
        np.testing.assert_array_equal(np.asarray(ours.dequantized_matrix()), np.asarray(theirs.kernel[...]))
    assert isinstance(packed.lm_head, GgufLinear) if not tied else not hasattr(packed, "lm_head")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 40)), jnp.int32)
    for rows in (tokens[:, :5], tokens):  # native GEMV rows (<= 32) and the XLA prefill path
        got, want = np.asarray(packed(rows)), np.asarray(floats(rows))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    prompt = [int(t) for t in tokens[0, :6]]
    assert generate(packed, prompt, 6).tolist() == generate(floats, prompt, 6).tolist()


def test_packed_runtime_dequantizes_other_types_and_rejects_bad_runtime(tmp_path):
    from lowbit.models.loader import load_gguf_model

    hf = _hf_weights(seed=5, tied=True)
    path = _write_tiny_llama(tmp_path / "tiny.gguf", hf, linear_type=T.F16, embed_type=T.F32)
    packed, _ = load_gguf_model(path, runtime="packed")
    floats, _ = load_gguf_model(path)
    assert len(_linears(packed)) == 7 * TINY["n_layers"]  # F16 matrices: float layers as before
    tokens = jnp.arange(12, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(np.asarray(packed(tokens)), np.asarray(floats(tokens)))
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_gguf_model(path, runtime="blocks")
    with pytest.raises(ValueError, match="activations must be one of"):
        load_gguf_model(path, runtime="packed", activations="int4")


def test_packed_runtime_with_int8_activations(tmp_path):
    """activations="int8" (ggml's rounding of x per 32-block) runs every block layer, and the tied
    head, on int8 activations: logits move by the rounding of x only."""
    from lowbit.models.loader import load_gguf_model

    path = _write_tiny_llama(tmp_path / "tiny.gguf", _hf_weights(seed=6), linear_type=T.Q4_1, embed_type=T.Q8_0)
    int8, _ = load_gguf_model(path, runtime="packed", activations="int8")
    f32, _ = load_gguf_model(path, runtime="packed")
    assert int8.embed.activations == "int8" and int8.layers[0].mlp.w_up.activations == "int8"
    tokens = jnp.arange(3, 9, dtype=jnp.int32)[None]
    got, want = np.asarray(int8(tokens)), np.asarray(f32(tokens))
    gap = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-5 < gap < 3e-2, gap


@pytest.mark.model
def test_smollm2_packed_runtime_holds_the_blocks_and_matches_the_float_load(smollm2_path):
    from flax import nnx

    from lowbit.models.loader import load_gguf_model

    packed, _ = load_gguf_model(smollm2_path, runtime="packed")
    held = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(nnx.state(packed)))
    assert held < 100 * 2**20  # the file is 93.8 MiB; f32 weights would be 513 MiB
    tokens = jnp.asarray([[1, 504, 3458, 314, 2830, 28, 260, 1000, 7, 33]], jnp.int32)
    got = np.asarray(packed(tokens))
    del packed
    floats, _ = load_gguf_model(smollm2_path)
    want = np.asarray(floats(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
