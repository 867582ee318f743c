"""GGUF export on tiny Llamas: read(write(model)) bit-exact for every type with lowbit's reader and
the gguf package's, packed grids written without a second rounding, the re-encoding error
reported, the ternary fallback, atomic writes, --force, the CLI and clear errors.
"""

import dataclasses
import json
import warnings

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as reference_dequantize

import lowbit
from lowbit.checkpoint import save
from lowbit.cli import main
from lowbit.export import EXPORT_TYPES, export_gguf
from lowbit.models.gguf.blocks import dequantize_ggml
from lowbit.models.gguf.encode import encode_codes, encode_values
from lowbit.models.gguf.llama_names import iter_llama_weights, llama_config
from lowbit.models.gguf.reader import metadata_value, open_gguf
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.models.loader import load_gguf_model
from lowbit.nn.packed_layer import PackedLayer, layer_from_state, layer_state
from lowbit.ptq.rotation import rotate_model, rotation_plan
from lowbit.ptq.rtn import rtn_quantize

# Rows of 256 (q, k, v, gate, up) and 512 (down) fit every block type, the ternary ones too.
WIDE = dict(d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512)
# The spec whose grid maps exactly onto each quantized type.
EXACT_SPECS = {"Q4_0": "int4:g32", "Q4_1": "int4:g32:asym", "Q8_0": "int8:g32",
               "TQ1_0": "ternary", "TQ2_0": "ternary"}
LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _model(seed=0, **overrides):
    return Llama(LlamaConfig.tiny(**{**WIDE, **overrides}), rngs=nnx.Rngs(seed))


def _layer(model, name):
    _, index, leaf = name.split(".")
    block = model.layers[int(index)]
    return getattr(block.attn if leaf in ("wq", "wk", "wv", "wo") else block.mlp, leaf)


def _model_weights(model):
    """{lowbit name: the f32 weight the model computes with} ([in, out] for linears)."""
    out = {"embed": np.asarray(model.embed.embedding[...], np.float32),
           "final_norm": np.asarray(model.final_norm.weight[...], np.float32)}
    for i, block in enumerate(model.layers):
        out[f"layers.{i}.attn_norm"] = np.asarray(block.attn_norm.weight[...], np.float32)
        out[f"layers.{i}.ffn_norm"] = np.asarray(block.ffn_norm.weight[...], np.float32)
        for leaf in LINEARS:
            layer = _layer(model, f"layers.{i}.{leaf}")
            value = (layer.dequantized_matrix() if isinstance(layer, PackedLayer)
                     else layer.kernel[...])
            out[f"layers.{i}.{leaf}"] = np.asarray(value, np.float32)
    return out


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _readers_agree(path):
    """Every tensor decodes bit-identically with lowbit's decoder and the gguf package's."""
    for tensor in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        ours = dequantize_ggml(tensor.data, tensor.tensor_type, shape)
        theirs = reference_dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        assert _same_bits(ours, theirs), tensor.name


@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q4_1", "Q8_0", "TQ1_0", "TQ2_0"])
def test_packed_results_on_the_type_grid_are_written_without_a_second_rounding(tmp_path,
                                                                             gguf_type):
    model = _model()
    rtn_quantize(model, EXACT_SPECS[gguf_type])
    expected = _model_weights(model)
    report = export_gguf(model, tmp_path / "m.gguf", gguf_type)
    linears = [r for r in report["tensors"] if r["lowbit_name"].split(".")[-1] in LINEARS]
    assert len(linears) == 14 and all(r["type"] == gguf_type for r in linears)
    assert all(r["from_codes"] and r["exact"] and r["mse"] == 0 for r in linears)
    read_back = dict(iter_llama_weights(tmp_path / "m.gguf"))
    for name, weight in expected.items():
        if name == "embed":  # a float embedding is written as Q8_0 in quantized exports
            assert np.abs(read_back[name] - weight).max() <= np.abs(weight).max() / 127
        else:
            assert _same_bits(read_back[name], weight), name
    _readers_agree(tmp_path / "m.gguf")


@pytest.mark.parametrize("gguf_type", ["F32", "F16"])
def test_float_exports_read_back_bit_exact(tmp_path, gguf_type):
    model = _model(seed=1)
    expected = _model_weights(model)
    report = export_gguf(model, tmp_path / "m.gguf", gguf_type)
    read_back = dict(iter_llama_weights(tmp_path / "m.gguf"))
    for name, weight in expected.items():
        stored = weight if gguf_type == "F32" or name.endswith("norm") else \
            weight.astype(np.float16).astype(np.float32)
        assert _same_bits(read_back[name], stored), name
    assert (report["weight_mse"] == 0) == (gguf_type == "F32")
    _readers_agree(tmp_path / "m.gguf")
    reloaded, _ = load_gguf_model(tmp_path / "m.gguf")
    tokens = jnp.arange(12)[None]
    if gguf_type == "F32":
        assert np.array_equal(np.asarray(reloaded(tokens)), np.asarray(model(tokens)))


def test_every_type_round_trips_through_both_readers(tmp_path):
    """read(write(model)) for every type: lowbit's reader and gguf's give identical bits, and the
    values lowbit loads are those the report's error was measured against."""
    for spec in ("int4:g64:asym", "int4:g32"):
        model = _model(seed=2)
        rtn_quantize(model, spec)
        weights = _model_weights(model)
        for gguf_type in EXPORT_TYPES:
            path = tmp_path / f"{spec}-{gguf_type}.gguf"
            report = export_gguf(model, path, gguf_type)
            _readers_agree(path)
            assert report["bytes"] == path.stat().st_size
            read_back = dict(iter_llama_weights(path))
            for entry in report["tensors"]:
                name = entry["lowbit_name"]
                error = np.sum((read_back[name].astype(np.float64) - weights[name]) ** 2)
                assert error == pytest.approx(entry["squared_error"], rel=1e-6, abs=1e-12), name
                assert entry["exact"] or gguf_type != "F32", name


def test_a_grid_that_maps_exactly_is_found_from_the_data(tmp_path):
    # g64 scales are constant within blocks of 32, so int4:g64:asym is exact in Q4_1 and
    # symmetric int4 (codes -7..7) exact in Q4_1 (q + 8, m = -8 d) and Q8_0.
    for spec, gguf_type in [("int4:g64:asym", "Q4_1"), ("int4:g32", "Q4_1"),
                            ("int4:g32", "Q8_0"), ("ternary", "Q4_0")]:
        model = _model(seed=3)
        rtn_quantize(model, spec)
        report = export_gguf(model, tmp_path / f"{spec}-{gguf_type}.gguf", gguf_type)
        linears = [r for r in report["tensors"] if r["weights"].startswith("packed")]
        assert linears and all(r["from_codes"] and r["exact"] for r in linears), (spec, gguf_type)


def test_other_grids_are_reencoded_and_the_added_error_reported(tmp_path):
    model = _model(seed=4)
    rtn_quantize(model, "int4:g32:asym")
    report = export_gguf(model, tmp_path / "m.gguf", "Q4_0")
    linears = [r for r in report["tensors"] if r["weights"].startswith("packed")]
    assert all(not r["from_codes"] and "asymmetric" in r["reencoded_because"] for r in linears)
    assert all(r["mse"] > 0 for r in linears) and report["weight_mse"] > 0
    weights = _model_weights(model)
    read_back = dict(iter_llama_weights(tmp_path / "m.gguf"))
    for entry in linears:
        name = entry["lowbit_name"]
        assert np.mean((read_back[name] - weights[name]) ** 2) == pytest.approx(entry["mse"],
                                                                               rel=1e-5)
    model = _model(seed=4)
    rtn_quantize(model, "nf4:g32")
    report = export_gguf(model, tmp_path / "nf4.gguf", "Q4_0")
    assert all("not integer levels" in r["reencoded_because"] for r in report["tensors"]
               if r["weights"].startswith("packed"))


def test_float_weights_encode_to_the_nearest_level_of_each_block():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    # Q4_0's levels run from -8 d to 7 d with the largest magnitude at -8 d: values of the
    # other sign beyond 7 d are clipped by up to one step, all others round to half a step.
    for qtype, levels, bound in [(T.Q4_0, 16, 1.0), (T.Q4_1, 15, 0.5), (T.Q8_0, 254, 0.5)]:
        decoded = dequantize_ggml(encode_values(x, qtype), qtype, x.shape).reshape(8, -1, 32)
        blocks = x.reshape(8, -1, 32)
        step = (blocks.max(-1) - blocks.min(-1)) / levels if qtype == T.Q4_1 else \
            2 * np.abs(blocks).max(-1) / levels
        assert np.all(np.abs(decoded - blocks) <= step[..., None] * bound * 1.01 + 1e-6), qtype
    ternary = dequantize_ggml(encode_values(x, T.TQ2_0), T.TQ2_0, x.shape)
    assert np.array_equal(ternary, dequantize_ggml(encode_values(x, T.TQ1_0), T.TQ1_0, x.shape))


def test_codes_and_scales_encode_exactly_and_bad_ones_are_refused():
    rng = np.random.default_rng(6)
    codes = rng.integers(-1, 2, (3, 512))
    scale = rng.uniform(0.01, 1, (3, 2)).astype(np.float16)
    for qtype in (T.TQ1_0, T.TQ2_0):
        data = encode_codes(codes, scale, None, qtype)
        expected = codes * np.repeat(scale.astype(np.float32), 256, axis=1)
        assert _same_bits(dequantize_ggml(data, qtype, codes.shape), expected)
        assert _same_bits(reference_dequantize(data, qtype).reshape(codes.shape), expected)
    with pytest.raises(ValueError, match="-8..7"):
        encode_codes(np.full((1, 32), 8), np.ones((1, 1)), None, T.Q4_0)
    with pytest.raises(ValueError, match="float16"):
        encode_codes(np.zeros((1, 32)), np.full((1, 1), 0.1), None, T.Q8_0)
    with pytest.raises(ValueError, match="multiple of 32"):
        encode_values(np.zeros((2, 48)), T.Q4_0)
    with pytest.raises(ValueError, match="supported: F32, F16, Q4_0"):
        encode_values(np.zeros((2, 256)), "Q4_K")


def test_ternary_rows_not_a_multiple_of_256_fall_back_to_q4_0_exactly(tmp_path):
    model = _model(seed=7, d_model=64, head_dim=16, ffn_dim=256)  # rows of 64, w_down's of 256
    rtn_quantize(model, "ternary")
    with pytest.warns(UserWarning, match="not a multiple of 256"):
        report = export_gguf(model, tmp_path / "m.gguf", "TQ1_0")
    types = {r["lowbit_name"].split(".")[-1]: r["type"] for r in report["tensors"]
             if r["weights"].startswith("packed")}
    assert types == {"wq": "Q4_0", "wk": "Q4_0", "wv": "Q4_0", "wo": "Q4_0", "w_gate": "Q4_0",
                     "w_up": "Q4_0", "w_down": "TQ1_0"}
    assert all(r["exact"] for r in report["tensors"] if r["weights"].startswith("packed"))
    assert "multiple of 256" in report["tensors"][2]["note"]


def test_query_and_key_rows_are_in_llamacpp_order_in_the_file(tmp_path):
    model = _model(seed=8)
    export_gguf(model, tmp_path / "m.gguf", "F32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    wq = np.asarray(model.layers[0].attn.wq.kernel[...]).T  # [out, in], HF rotate_half order
    head = 64
    # llama.cpp's row 2j (2j+1) of a head is HF's row j (j + head_dim/2)
    assert np.array_equal(stored["blk.0.attn_q.weight"][0:head:2], wq[:head // 2])
    assert np.array_equal(stored["blk.0.attn_q.weight"][1:head:2], wq[head // 2:head])
    interleaved = Llama(LlamaConfig.tiny(**WIDE, rope_layout="interleaved"), rngs=nnx.Rngs(8))
    export_gguf(interleaved, tmp_path / "i.gguf", "F32")
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "i.gguf")).tensors}
    assert np.array_equal(stored["blk.0.attn_k.weight"],
                          np.asarray(interleaved.layers[0].attn.wk.kernel[...]).T)


def _tiny_source(path, vocab_size=128):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny source")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab_size)])
    writer.add_token_merges(["t 1", "t 2"])
    writer.add_bos_token_id(1)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    writer.add_tensor("token_embd.weight", np.zeros((vocab_size, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_metadata_comes_from_the_config_and_the_tokenizer_from_the_source(tmp_path):
    model = _model(seed=9)
    source = _tiny_source(tmp_path / "source.gguf")
    export_gguf(model, tmp_path / "m.gguf", "Q8_0", source=source)
    reader = open_gguf(tmp_path / "m.gguf")
    config = llama_config(reader)
    assert config == {k: v for k, v in model.config.to_dict().items() if k != "rope_layout"}
    assert metadata_value(reader, "tokenizer.ggml.tokens") == [f"t{i}" for i in range(128)]
    assert metadata_value(reader, "tokenizer.ggml.merges") == ["t 1", "t 2"]
    assert metadata_value(reader, "tokenizer.ggml.bos_token_id") == 1
    assert metadata_value(reader, "general.name") == "tiny source"
    assert metadata_value(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    with pytest.raises(ValueError, match="vocabulary of 100 tokens"):
        export_gguf(model, tmp_path / "bad.gguf", "Q8_0",
                    source=_tiny_source(tmp_path / "s100.gguf", vocab_size=100))
    assert not (tmp_path / "bad.gguf").exists()


def test_existing_files_need_force_and_failed_writes_leave_nothing(tmp_path, monkeypatch):
    model = _model(seed=10)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="already exists.*force"):
        export_gguf(model, out, "F16")
    assert out.read_bytes() == b"keep me"
    import lowbit.export as export_module

    def failing(values, qtype):
        raise RuntimeError("disk full")
    monkeypatch.setattr(export_module, "encode_values", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, out, "F16", force=True)
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no partial file left
    monkeypatch.undo()
    export_gguf(model, out, "F16", force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_bad_requests_are_clear_errors(tmp_path):
    model = _model(seed=11)
    with pytest.raises(ValueError, match="type must be one of Q4_0, Q4_1, Q8_0, TQ1_0, TQ2_0, "
                                         "F16, F32"):
        export_gguf(model, tmp_path / "m.gguf", "Q4_K")
    with pytest.raises(ValueError, match="lowbit Llama.*llama architecture"):
        export_gguf(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), tmp_path / "m.gguf", "F32")
    narrow = _model(seed=11, d_model=48, head_dim=12, ffn_dim=96)
    with pytest.raises(ValueError, match="rows of 48, not a multiple of Q8_0's block size 32.*F16 or F32"):
        export_gguf(narrow, tmp_path / "m.gguf", "Q4_0")
    rtn_quantize(model, "int4:g32")
    layer = model.layers[0].attn.wq
    model.layers[0].attn.wq = PackedLayer(layer.contraction, layer.packed, act_spec="int8:token")
    with pytest.raises(ValueError, match="quantizes its input as int8:token .*not do for Q4_0"):
        export_gguf(model, tmp_path / "m.gguf", "Q4_0")
    model.layers[0].attn.wq = PackedLayer(layer.contraction, layer.packed, input_norm=True)
    with pytest.raises(ValueError, match="RMS-normalizes its input at run time"):
        export_gguf(model, tmp_path / "m.gguf", "Q4_0")
    assert not (tmp_path / "m.gguf").exists()


def test_ternary_layers_with_q8_k_inputs_export_to_tq_types_only(tmp_path):
    """int8 inputs with one scale per 256 (llama.cpp's Q8_K, what TQ1_0 / TQ2_0 multiply) are the
    types' own input rounding: such layers export to them exactly, and to no other type."""
    model = _model(seed=16)
    rtn_quantize(model, "ternary")
    for block in model.layers:
        for leaf in LINEARS:
            parent = block.attn if leaf in ("wq", "wk", "wv", "wo") else block.mlp
            layer = getattr(parent, leaf)
            setattr(parent, leaf, PackedLayer(layer.contraction, layer.packed,
                                              act_spec="int8:g256:f32"))
    for gguf_type in ("TQ1_0", "TQ2_0"):
        report = export_gguf(model, tmp_path / f"{gguf_type}.gguf", gguf_type)
        linears = [r for r in report["tensors"] if r["name"].startswith("blk.")
                   and not r["name"].endswith("norm.weight")]
        assert {r["type"] for r in linears} == {gguf_type}
        assert all(r["exact"] and r["from_codes"] for r in linears)
    for gguf_type in ("F32", "Q4_0"):
        with pytest.raises(ValueError, match=f"int8:g256:f32 .*not do for {gguf_type} weights"):
            export_gguf(model, tmp_path / "m.gguf", gguf_type)
    layer = model.layers[0].mlp.w_down
    model.layers[0].mlp.w_down = PackedLayer(layer.contraction, layer.packed,
                                             act_spec="int8:token:f32")
    with pytest.raises(ValueError, match="int8:token:f32 .*not do for TQ2_0"):
        export_gguf(model, tmp_path / "m.gguf", "TQ2_0")
    assert not (tmp_path / "m.gguf").exists()


def test_public_name_and_the_cli(tmp_path, capsys):
    assert lowbit.export_gguf is export_gguf
    model = _model(seed=12)
    rtn_quantize(model, "int4:g32")
    save(model, tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    argv = ["export", "--model", str(tmp_path / "ckpt"), "--format", "gguf", "--type", "q4_0",
            "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["type"] == "Q4_0" and report["weight_mse"] > 0  # only the float embedding
    assert all(r["exact"] for r in report["tensors"] if r["name"] != "token_embd.weight")
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    capsys.readouterr()
    assert main(argv[:-1] + ["--force"]) == 0
    assert "tensors exact" in capsys.readouterr().out
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--format", "onnx", "--type",
                 "Q4_0", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "--format must be gguf" in capsys.readouterr().err


def test_warnings_are_recorded_in_the_cli_report(tmp_path, capsys):
    model = _model(seed=13, d_model=64, head_dim=16, ffn_dim=256)
    rtn_quantize(model, "ternary")
    save(model, tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["export", "--model", str(tmp_path / "ckpt"), "--type", "TQ2_0", "--out",
                     str(tmp_path / "t.gguf"), "--json"]) == 0
    captured = capsys.readouterr()
    assert any("Q4_0 instead of TQ2_0" in w for w in json.loads(captured.out)["warnings"])
    assert "warning" in captured.err


def test_an_untied_float_head_is_q8_0_and_reads_back_as_lm_head(tmp_path):
    model = _model(seed=14, tied_embeddings=False)
    rtn_quantize(model, "ternary")
    report = export_gguf(model, tmp_path / "m.gguf", "TQ2_0")
    types = {r["name"]: r["type"] for r in report["tensors"]}
    assert types["output.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "TQ2_0"
    read_back = dict(iter_llama_weights(tmp_path / "m.gguf"))
    head = np.asarray(model.lm_head.kernel[...])
    assert read_back["lm_head"].shape == head.shape
    assert np.abs(read_back["lm_head"] - head).max() <= np.abs(head).max() / 127


def test_ternary_rows_that_fit_no_block_are_refused(tmp_path):
    model = _model(seed=15, d_model=48, head_dim=12, ffn_dim=256)
    rtn_quantize(model, "ternary")
    with pytest.raises(ValueError, match="rows of 48, not a multiple of .*block size 32"):
        export_gguf(model, tmp_path / "m.gguf", "TQ1_0")
    assert not (tmp_path / "m.gguf").exists()


def test_a_rotated_model_exports_its_folded_rotations_and_refuses_an_online_one(tmp_path):
    tokens = jnp.arange(12)[None]
    folded = _model(seed=16)
    rotate_model(folded, plan=dataclasses.replace(rotation_plan(folded), online=()))
    rtn_quantize(folded, "int4:g32")
    report = export_gguf(folded, tmp_path / "folded.gguf", "Q4_0")
    linears = [r for r in report["tensors"] if r["lowbit_name"].split(".")[-1] in LINEARS]
    assert len(linears) == 14 and all(r["from_codes"] and r["mse"] == 0 for r in linears)
    # The rotated embedding and the untied head are float, written as Q8_0: the logits move by
    # that rounding only.
    reloaded, _ = load_gguf_model(tmp_path / "folded.gguf", runtime="dequant")
    got, want = np.asarray(reloaded(tokens)), np.asarray(folded(tokens))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
    online = _model(seed=16)
    rotate_model(online)
    rtn_quantize(online, "int4:g32")
    with pytest.raises(ValueError, match="layers.0.mlp is a HadamardMLP .an online Hadamard"):
        export_gguf(online, tmp_path / "online.gguf", "Q4_0")
    # A rotated checkpoint loads into a plain Llama whose packed w_down carries the transform.
    loaded = _model(seed=16)
    rtn_quantize(loaded, "int4:g32")
    loaded.layers[1].mlp.w_down.set_input_transform("hadamard")
    with pytest.raises(ValueError, match="layers.1.w_down.*online hadamard transform"):
        export_gguf(loaded, tmp_path / "online.gguf", "Q4_0")
    assert not (tmp_path / "online.gguf").exists()


def test_an_unfolded_input_scale_is_refused(tmp_path):
    model = _model(seed=17)
    rtn_quantize(model, "int4:g32")
    meta, arrays = layer_state(model.layers[0].mlp.w_down)
    arrays["input_scale"] = np.full(WIDE["ffn_dim"], 2.0, np.float32)
    model.layers[0].mlp.w_down = layer_from_state(meta, arrays)
    with pytest.raises(ValueError, match="w_down.*per-feature scale"):
        export_gguf(model, tmp_path / "m.gguf", "Q4_0")


def test_a_q8_0_embedding_is_written_as_its_own_blocks(tmp_path):
    """A checkpoint made with --embed q8_0 (lowbit.ptq.quantize_embeddings) exports its table's
    blocks unchanged: re-encoding the Q8_0 values to Q8_0 is exact."""
    from lowbit.nn.gguf_layers import GgufEmbed
    from lowbit.ptq.embeddings import quantize_embeddings

    model = _model(seed=15)
    rtn_quantize(model, EXACT_SPECS["Q4_0"])
    quantize_embeddings(model, "Q8_0")
    assert isinstance(model.embed, GgufEmbed)
    report = export_gguf(model, tmp_path / "m.gguf", "Q4_0")
    embedding = next(r for r in report["tensors"] if r["name"] == "token_embd.weight")
    assert embedding["type"] == "Q8_0" and embedding["exact"] and embedding["mse"] == 0
    reader = open_gguf(tmp_path / "m.gguf")
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(-1), np.asarray(model.embed.blocks[...]).reshape(-1))
