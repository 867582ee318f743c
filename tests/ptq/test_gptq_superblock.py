"""GPTQ with super-block scales (ssN): equal to RTN for H = I, rounded and compensated on the
final grid (6-bit group scales), and better than RTN on the layer output error."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.packing import pack, storage_bits
from lowbit.core.quantize import expand_groups, quantize
from lowbit.ptq.gptq import check_gptq_spec, gptq_quantize_weight


def _layer(n_in=320, n_out=24, tokens=1024, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, (n_in, n_out)) * 0.02).astype(np.float32)
    x = (rng.normal(size=(tokens, n_in)) * np.exp(rng.normal(0, 0.8, n_in))).astype(np.float32)
    return w, 2.0 * x.T @ x / tokens


@pytest.mark.parametrize("spec", ["int4:g32:ss128", "int3:g32:ss128:asym", "int4:g16:ss64"])
def test_identity_hessian_equals_rtn(spec):
    w, _ = _layer()  # 320 inputs: a partial last super-block
    q, _ = gptq_quantize_weight(w, np.eye(w.shape[0], dtype=np.float32), spec)
    reference = quantize(w, spec, axis=0)
    np.testing.assert_array_equal(q.codes, reference.codes)
    np.testing.assert_array_equal(q.scale.codes, reference.scale.codes)
    np.testing.assert_array_equal(q.scale.scale, reference.scale.scale)
    np.testing.assert_array_equal(q.dequantize(), reference.dequantize())


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"act_order": True,
                                                                "static_groups": True}])
@pytest.mark.parametrize("spec", ["int3:g32:ss128", "int4:g32:ss128:asym"])
def test_output_error_below_rtn_on_the_quantized_grid(spec, options):
    w, h = _layer(seed=1)
    q, _ = gptq_quantize_weight(w, h, spec, block_size=64, **options)
    rtn = quantize(w, spec, axis=0)

    def error(d):
        d = np.asarray(d) - w
        return float(np.trace(d.T @ h @ d))

    assert error(q.dequantize()) < 0.9 * error(rtn.dequantize())
    assert int(q.scale.codes.max()) <= 63 and q.scale.codes.dtype == jnp.uint8
    # the codes sit on the grid the QArray stores: codes x (6-bit code x super-scale)
    grid = expand_groups(q.scale_values(), q.spec, 0, w.shape[0])
    zero = 0.0 if q.zero is None else expand_groups(q.zero_values(), q.spec, 0, w.shape[0])
    np.testing.assert_allclose(q.dequantize(), q.codes.astype(np.float32) * grid + zero,
                               atol=1e-7)
    assert 8 * pack(q).nbytes == storage_bits(q.spec, w.shape)


def test_gptq_refuses_clip_with_super_blocks():
    with pytest.raises(ValueError, match="clip"):
        check_gptq_spec("int4:g32:ss256:clip0.9")
