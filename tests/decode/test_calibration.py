"""Generated calibration windows: the model's own temperature-1 samples from a start token, the same
tokens as lowbit.decode.generate gives row by row, fixed by the seed whatever the batching."""

import jax
import numpy as np
import pytest

from lowbit.decode import generate
from lowbit.decode.calibration import generated_windows


def test_windows_are_the_models_own_samples_fixed_by_the_seed(tiny_model):
    windows = generated_windows(tiny_model, 5, 24, start_id=3, seed=11, slots=2)
    assert windows.dtype == np.int32 and windows.shape == (5, 24)
    assert (windows[:, 0] == 3).all()
    key = jax.random.key(11)
    for i, row in enumerate(windows):  # row i: generate's sample of one prompt with fold_in(key, i)
        expected = generate(tiny_model, np.asarray([3]), 23, temperature=1.0,
                            key=jax.random.fold_in(key, i))
        assert row[1:].tolist() == expected.tolist()
    assert len({tuple(row) for row in windows.tolist()}) == 5  # distinct samples, not greedy
    again = generated_windows(tiny_model, 5, 24, start_id=3, seed=11, slots=5)
    assert again.tolist() == windows.tolist()  # the seed fixes them; slots do not matter
    other = generated_windows(tiny_model, 5, 24, start_id=3, seed=12, slots=2)
    assert other[:, 1:].tolist() != windows[:, 1:].tolist()


def test_bad_requests_name_the_problem(tiny_model):
    vocab = tiny_model.config.vocab_size
    for kwargs, message in [(dict(samples=0), "samples must be a positive integer, got 0"),
                            (dict(length=1), "length must be at least 2 tokens"),
                            (dict(slots=0), "slots must be a positive integer"),
                            (dict(start_id=None), rf"start token id in \[0, {vocab}\), got None"),
                            (dict(start_id=vocab), rf"got {vocab}")]:
        arguments = dict(samples=2, length=8, start_id=1) | kwargs
        with pytest.raises(ValueError, match=message):
            generated_windows(tiny_model, arguments.pop("samples"), arguments.pop("length"),
                              **arguments)
