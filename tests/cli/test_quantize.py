"""`lowbit quantize` arguments and runs on a tiny GGUF file written here."""

import gguf
import numpy as np
import pytest

from lowbit.models.llama import LlamaConfig
from lowbit.models.loader import load_gguf_model
from lowbit.checkpoint import layer_bytes, load, quantized_layers, read_info
from lowbit.cli import build_parser
from lowbit.cli.quantize import (_check_method_options, calibration_source, method_options,
                                  rotate_and_quantize)
from lowbit.cli.quantize import quantize_to_checkpoint as run_quantize
from lowbit.nn import QuantRule
from lowbit.ptq import quantize
from lowbit.ptq.driver import LLAMA_BLOCK_LINEARS
from lowbit.ptq.rtn import rtn_quantize


def _parse(argv):
    """`lowbit quantize ARGV`'s arguments, parsed by the lowbit parser."""
    return build_parser().parse_args(["quantize", *argv])


def _tiny_gguf(path):
    """A llama GGUF of LlamaConfig.tiny() with random f32 weights (HF [out, in] layout)."""
    c = LlamaConfig.tiny()
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_freq_base(c.rope_base)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    writer.add_tensor("token_embd.weight", mat(c.vocab_size, c.d_model))
    for i in range(c.n_layers):
        b = f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", np.ones(c.d_model, np.float32))
        writer.add_tensor(b + "attn_q.weight", mat(q_dim, c.d_model))
        writer.add_tensor(b + "attn_k.weight", mat(kv_dim, c.d_model))
        writer.add_tensor(b + "attn_v.weight", mat(kv_dim, c.d_model))
        writer.add_tensor(b + "attn_output.weight", mat(c.d_model, q_dim))
        writer.add_tensor(b + "ffn_norm.weight", np.ones(c.d_model, np.float32))
        writer.add_tensor(b + "ffn_gate.weight", mat(c.ffn_dim, c.d_model))
        writer.add_tensor(b + "ffn_up.weight", mat(c.ffn_dim, c.d_model))
        writer.add_tensor(b + "ffn_down.weight", mat(c.d_model, c.ffn_dim))
    writer.add_tensor("output_norm.weight", np.ones(c.d_model, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_rtn_run_writes_a_checkpoint_that_reloads(tmp_path, test_tokens):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "q"
    args = _parse(["--model", str(path), "--method", "rtn", "--weights",
                                 "int4:g16:asym", "--out", str(out), "--quiet"])
    summary = run_quantize(args)
    assert summary["bits_per_weight"] == pytest.approx(4 + 32 / 16)
    assert summary["out"] == str(out) and summary["method"] == "rtn"
    loaded = load(out)
    info = read_info(out)
    assert info["source"]["path"] == str(path.resolve())
    assert info["method"] == "rtn" and info["settings"]["weights"] == "int4:g16:asym"
    layers = quantized_layers(loaded)
    assert len(layers) == 14 and set(layer_bytes(out)) == set(layers)
    expected, _ = load_gguf_model(path)
    rtn_quantize(expected, "int4:g16:asym")
    np.testing.assert_array_equal(np.asarray(loaded(test_tokens)),
                                  np.asarray(expected(test_tokens)))
    dequantized = load(out, runtime="dequant")  # float layers, same codes
    assert not quantized_layers(dequantized)
    np.testing.assert_allclose(np.asarray(dequantized(test_tokens)),
                               np.asarray(expected(test_tokens)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already exists"):
        run_quantize(args)


def test_defaults_and_parsing():
    args = _parse(["--model", "m", "--method", "gptq", "--out", "o"])
    assert (calibration_source(args), args.calib_samples, args.calib_len) == ("pydoc", 128, 512)
    recipe = _parse(["--model", "m", "--recipe", "w4", "--out", "o"])
    assert calibration_source(recipe) == "pydoc+generated"  # the recipe's own
    assert calibration_source(_parse(["--model", "m", "--recipe", "w4", "--calib", "pydoc",
                                      "--out", "o"])) == "pydoc"
    assert args.weights is None and not args.json
    with pytest.raises(SystemExit):
        _parse(["--model", "m", "--method", "int3", "--out", "o"])


@pytest.mark.parametrize("extra, message", [
    (["--method", "gptq", "--act", "int8:token"], "--act"),
    (["--method", "rtn", "--alpha", "0.5"], "--alpha"),
    (["--method", "awq", "--act-order"], "--act-order"),
    (["--method", "smoothquant", "--no-smoothing", "--alpha", "0.5"], "exclude"),
    (["--method", "llm_int8", "--no-smoothing"], "--no-smoothing"),
    (["--method", "gptq", "--smooth-down"], "--smooth-down"),
])
def test_options_that_do_not_apply(tmp_path, extra, message):
    args = _parse(["--model", "m", "--out", str(tmp_path / "o"), *extra])
    with pytest.raises(ValueError, match=message):
        run_quantize(args)


@pytest.mark.parametrize("weights, message", [
    ("", "--weights must be a quantization spec .* got ''"),
    ("int4:asym:asym", "--weights: spec 'int4:asym:asym' sets symmetry twice"),
    ("int9:g64", "--weights: .*2..8"),
])
def test_bad_weights_fail_before_the_model_loads(tmp_path, monkeypatch, weights, message):
    import lowbit.models.loader

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lowbit.models.loader, "load_gguf_model", no_loading)
    args = _parse(["--model", "smollm2-135m", "--method", "rtn", "--weights", weights,
                                 "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=message):
        run_quantize(args)


def test_impossible_out_fails_before_the_model_loads(tmp_path, monkeypatch):
    import os

    import lowbit.models.loader

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lowbit.models.loader, "load_gguf_model", no_loading)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(a_file / "sub" / "ckpt", "is a file, not a directory"),
             (a_file, "already exists")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((locked / "ckpt", "cannot write"))
    for out, message in cases:
        args = _parse(["--model", "smollm2-135m", "--method", "rtn", "--out", str(out)])
        with pytest.raises(ValueError, match=message):
            run_quantize(args)
    args = _parse(["--model", "smollm2-135m", "--method", "gptq", "--calib",
                                 str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--calib: unknown calibration source .*missing.txt"):
        run_quantize(args)


def test_rotate_option_is_checked_and_runs_the_rotated_quantization(make_tiny, calibration, test_tokens):
    args = _parse(["--model", "m", "--method", "gptq", "--rotate", "--out", "o"])
    assert args.rotate
    _check_method_options(args)
    with pytest.raises(ValueError, match="--rotate applies to --method rtn / gptq / awq"):
        _check_method_options(_parse(["--model", "m", "--method", "smoothquant", "--rotate", "--out", "o"]))
    model, expected = make_tiny(), make_tiny()
    result = rotate_and_quantize(model, "gptq", "int4:g16:asym", calibration, batch_size=2, progress=False)
    batches = [calibration[i:i + 2] for i in range(0, len(calibration), 2)]
    quantize(expected, QuantRule(path=LLAMA_BLOCK_LINEARS, weight_spec="int4:g16:asym"), "gptq", batches,
             rotate=True)
    assert result.settings["rotate"] == {"seed": 0} and result.method == "gptq"
    np.testing.assert_array_equal(np.asarray(model(test_tokens)), np.asarray(expected(test_tokens)))
    mixed_args = _parse(["--model", "m", "--method", "mixed", "--budget", "4.5", "--candidates",
                         "int3:g16,int4:g16", "--rotate", "--out", "o"])
    _check_method_options(mixed_args)
    rotated = make_tiny()
    mixed = rotate_and_quantize(rotated, "mixed", None, calibration, batch_size=2,
                                progress=False, options=method_options(mixed_args))
    assert mixed.method == "mixed" and mixed.settings["rotate"] == {"seed": 0}
    assert all(block.mlp.w_down.input_transform == "hadamard" for block in rotated.layers)


def test_embed_q8_0_stores_the_embedding_in_blocks_and_keeps_the_linear_accounting(tmp_path, test_tokens):
    from lowbit.nn import GgufEmbed

    path = _tiny_gguf(tmp_path / "tiny.gguf")
    assert _parse(["--model", "m", "--method", "rtn", "--out", "o"]).embed == "f32"  # the default
    with pytest.raises(SystemExit):
        _parse(["--model", "m", "--method", "rtn", "--out", "o", "--embed", "q4_0"])
    summaries = {}
    for embed in ("f32", "q8_0"):
        summaries[embed] = run_quantize(_parse(["--model", str(path), "--method", "rtn", "--weights", "int4:g16",
                                                "--out", str(tmp_path / embed), "--embed", embed, "--quiet"]))
    f32, q8 = summaries["f32"], summaries["q8_0"]
    assert f32["bits_per_weight"] == q8["bits_per_weight"] and f32["linear_weights"] == q8["linear_weights"]
    c = LlamaConfig.tiny()
    assert f32["embedding_bytes"] == c.vocab_size * c.d_model * 4
    assert q8["embedding_bytes"] == c.vocab_size * c.d_model // 32 * 34 == layer_bytes(tmp_path / "q8_0")["embed"]
    assert read_info(tmp_path / "q8_0")["embed"] == "q8_0"
    loaded, floats = load(tmp_path / "q8_0"), load(tmp_path / "f32")
    assert isinstance(loaded.embed, GgufEmbed) and not isinstance(floats.embed, GgufEmbed)
    # same linears; the logits differ only by the Q8_0 rounding of the table (bounded in tests/nn)
    got, want = np.asarray(loaded(test_tokens)), np.asarray(floats(test_tokens))
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize("argv, message", [
    (["--method", "gptq", "--recipe", "w4"], "give one of --method"),
    ([], "give one of --method"),
    (["--recipe", "w3", "--weights", "int4:g64"], "drop --weights"),
    (["--recipe", "w3", "--rotate", "--calib-samples", "4"], "drop --rotate --calib-samples"),
    (["--recipe", "w2", "--batch-size", "4"], "drop --batch-size"),
    (["--method", "gptq", "--steps", "5"], "--steps only apply to --method blockap"),
    (["--method", "rtn", "--workdir", "w"], "--workdir only applies"),
    (["--method", "mixed"], "needs --budget"),
    (["--method", "mixed", "--budget", "3", "--weights", "int4:g64"], "--candidates, not --weights"),
    (["--method", "gptq", "--budget", "3"], "only apply to --method mixed"),
])
def test_recipe_blockap_and_mixed_options_are_checked(tmp_path, argv, message):
    args = _parse(["--model", "m", "--out", str(tmp_path / "o"), *argv])
    with pytest.raises(ValueError, match=message):
        run_quantize(args)


def test_recipes_are_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("w4", "w3", "w2", "ternary"):
        assert f"{name}: rotate + gptq" in text
    with pytest.raises(SystemExit):
        _parse(["--model", "m", "--recipe", "w5", "--out", "o"])


def test_blockap_and_mixed_flags_reach_the_methods(make_tiny, calibration, tmp_path):
    from lowbit.cli.quantize import method_options, quantize_model

    args = _parse(["--model", "m", "--method", "blockap", "--weights", "int4:g16", "--steps", "2",
                   "--learn", "scales", "--scale-lr", "0.01", "--workdir", str(tmp_path / "w"),
                   "--out", "o"])
    _check_method_options(args)
    options = method_options(args)
    assert options == {"steps": 2, "learn": "scales", "scale_lr": 0.01,
                       "workdir": str(tmp_path / "w")}
    result = quantize_model(make_tiny(), "blockap", "int4:g16", calibration, batch_size=2,
                            progress=False, options=options)
    assert result.method == "blockap" and result.settings["steps"] == 2
    assert result.settings["learn"] == "scales" and len(result.block_reports) == 2
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "block-0000.npz", "block-0001.npz", "settings.json"]

    args = _parse(["--model", "m", "--method", "mixed", "--budget", "5", "--candidates",
                   "int2:g16:asym, int4:g16:asym", "--out", "o"])
    _check_method_options(args)
    options = method_options(args)
    assert options == {"budget": 5.0, "candidates": ("int2:g16:asym", "int4:g16:asym"),
                       "base": "rtn"}
    result = quantize_model(make_tiny(), "mixed", None, calibration, progress=False,
                            options=options)
    assert result.method == "mixed" and 4.0 < result.bits_per_weight <= 5.0
    assert set(result.settings["spec_counts"]) == {"int2:g16:asym", "int4:g16:asym"}


def test_a_recipe_runs_through_the_cli_and_saves_a_packed_checkpoint(tmp_path, monkeypatch,
                                                                      test_tokens):
    import dataclasses

    import lowbit.cli.quantize as cli_quantize
    import lowbit.models.tokenizer
    import lowbit.ptq.recipes as recipes

    small = dataclasses.replace(recipes.RECIPES["w4"], weights="int4:g16", calib_samples=4,
                                calib_len=16, e2e_steps=2, e2e_samples=4, e2e_len=16,
                                calib="pydoc")  # no --calib below: the recipe's own source
    monkeypatch.setitem(recipes.RECIPES, "w4", small)
    monkeypatch.setattr(lowbit.models.tokenizer.Tokenizer, "from_gguf", staticmethod(lambda p: None))
    windows = []

    def tokens(tokenizer, source, samples, length, seed, generated):
        windows.append((source, samples, length, seed))
        return np.random.default_rng(seed).integers(0, 128, (samples, length)).astype(np.int32)

    monkeypatch.setattr(cli_quantize, "calibration_windows", tokens)
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "w4"
    summary = run_quantize(_parse(["--model", str(path), "--recipe", "w4", "--out", str(out),
                                   "--quiet"]))
    assert windows == [("pydoc", 4, 16, 0), ("pydoc", 4, 16, 1)]
    assert summary["method"] == "recipe:w4" and summary["weights"] == "int4:g16"
    assert summary["bits_per_weight"] == pytest.approx(4 + 16 / 16)
    assert summary["e2e"]["steps"] == 2
    info = read_info(out)
    assert info["e2e"]["steps"] == 2 and info["settings"]["recipe"]["name"] == "w4"
    loaded = load(out)
    assert len(quantized_layers(loaded)) == 14
    assert np.isfinite(np.asarray(loaded(test_tokens))).all()


@pytest.mark.parametrize("calib, samples, message", [
    ("licenses", 4, "--calib: 'licenses' is the held-apart out-of-domain evaluation text"),
    ("pydoc+wiki", 4, "--calib: unknown calibration source 'wiki'"),
    ("pydoc+generated", 1, "--calib: .*mixes 2 sources, so it needs at least 2 samples"),
])
def test_bad_calibration_sources_fail_before_the_model_loads(tmp_path, monkeypatch, calib, samples,
                                                             message):
    import lowbit.models.loader

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lowbit.models.loader, "load_gguf_model", no_loading)
    args = _parse(["--model", "smollm2-135m", "--method", "gptq", "--calib", calib,
                   "--calib-samples", str(samples), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=message):
        run_quantize(args)


def test_generated_calibration_comes_from_the_model_before_quantization(tmp_path, monkeypatch,
                                                                        test_tokens):
    """--calib pydoc+generated: GPTQ sees the pydoc windows and the float model's own samples
    alternating (3 + 3 of 6), the same checkpoint as the API given those windows."""
    import lowbit.models.tokenizer
    from lowbit.cli.quantize import quantize_model
    from lowbit.data.corpus import calibration_tokens
    from lowbit.decode.calibration import generated_windows

    class Tokens:  # the tiny GGUF has no tokenizer: bytes folded into its 128 ids, BOS 1
        bos_id = 1

        def encode(self, text):
            return [b % 128 for b in text.encode()]

    monkeypatch.setattr(lowbit.models.tokenizer.Tokenizer, "from_gguf", staticmethod(lambda p: Tokens()))
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "mix"
    summary = run_quantize(_parse(["--model", str(path), "--method", "gptq", "--weights", "int4:g16",
                                   "--calib", "pydoc+generated", "--calib-samples", "6",
                                   "--calib-len", "16", "--seed", "5", "--batch-size", "2",
                                   "--out", str(out), "--quiet"]))
    assert summary["settings"]["calibration"] == {
        "source": "pydoc+generated", "seed": 5, "windows": {"pydoc": 3, "generated": 3},
        "generated": {"temperature": 1.0, "start_id": 1}}
    model, _ = load_gguf_model(path)
    windows = np.empty((6, 16), np.int32)
    windows[0::2] = calibration_tokens(Tokens(), "pydoc", 3, 16, seed=5)
    windows[1::2] = generated_windows(model, 3, 16, start_id=1, seed=5)
    assert (windows[1::2, 0] == 1).all()
    quantize_model(model, "gptq", "int4:g16", windows, batch_size=2, progress=False)
    np.testing.assert_array_equal(np.asarray(load(out)(test_tokens)), np.asarray(model(test_tokens)))
    other = tmp_path / "pydoc"  # and the calibration made a difference
    run_quantize(_parse(["--model", str(path), "--method", "gptq", "--weights", "int4:g16",
                         "--calib-samples", "6", "--calib-len", "16", "--seed", "5",
                         "--batch-size", "2", "--out", str(other), "--quiet"]))
    assert not np.array_equal(np.asarray(load(other)(test_tokens)), np.asarray(model(test_tokens)))
