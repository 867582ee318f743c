"""llama.cpp's quantizer as a reference point (the optional `ref` extra): the types it writes are
accounted exactly, the loaded weights lie on its grid, and a failed run leaves no file."""

import numpy as np
import pytest

pytest.importorskip("llama_cpp")


from lowbit.models.loader import load_gguf_model  # noqa: E402
from lowbit.ptq.llamacpp import (linear_storage, llamacpp_quantize,  # noqa: E402
                                 llamacpp_quantize_model)

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def q4_0(smollm2_path, tmp_path_factory):
    return llamacpp_quantize(smollm2_path, tmp_path_factory.mktemp("q4_0") / "m.gguf", "Q4_0")


def test_q4_0_storage_is_4_5_bits_and_its_grid(q4_0, smollm2_path):
    bits, weights, types = linear_storage(q4_0)
    assert types == {"Q4_0": 210}
    assert bits / weights == 4.5
    assert linear_storage(smollm2_path)[0] / weights == 5.0  # the Q4_1 source
    model, _ = load_gguf_model(q4_0)
    kernel = np.asarray(model.layers[3].mlp.w_down.kernel[...])  # [in, out], blocks along in
    blocks = kernel.T.reshape(kernel.shape[1], -1, 32)
    distinct = max(len(np.unique(block)) for block in blocks[:64].reshape(-1, 32))
    assert distinct <= 16


def test_quantize_model_in_place_matches_loading_the_file(q4_0, smollm2_path, tmp_path):
    model, _ = load_gguf_model(smollm2_path)
    before = np.asarray(model.layers[0].attn.wq.kernel[...])
    result = llamacpp_quantize_model(model, smollm2_path, "Q4_0", tmp_path)
    expected, _ = load_gguf_model(q4_0)
    after = np.asarray(model.layers[0].attn.wq.kernel[...])
    np.testing.assert_array_equal(after, np.asarray(expected.layers[0].attn.wq.kernel[...]))
    assert not np.array_equal(after, before)
    assert result.bits_per_weight == 4.5
    tokens = np.arange(8, dtype=np.int32)[None]
    np.testing.assert_allclose(model(tokens), expected(tokens), atol=1e-5)


def test_bad_input_and_no_half_written_file(q4_0, smollm2_path, tmp_path):
    with pytest.raises(ValueError, match="gguf_type"):
        llamacpp_quantize(smollm2_path, tmp_path / "x.gguf", "Q9_9")
    with pytest.raises(ValueError, match="already exists"):
        llamacpp_quantize(smollm2_path, q4_0, "Q4_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_path.read_bytes()[:1_000_000])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="failed"):
        llamacpp_quantize(truncated, out / "y.gguf", "Q4_0")
    assert list(out.iterdir()) == []
