"""The serving simulation: paged allocation wastes under one block per sequence and runs more
sequences at once than contiguous reservations in the same budget."""

import pytest

from lowbit.kvcache.memory import SCHEMES, simulate_serving, synthetic_requests


def test_paged_beats_contiguous_reservations():
    requests = synthetic_requests(120, seed=3, max_len=512, prompt_mean=60, output_mean=100)
    reports = {s: simulate_serving(requests, 8192, scheme=s, max_len=512, max_running=64) for s in SCHEMES}
    paged = reports["paged"]
    assert paged.utilization > 0.9
    mean_length = sum(p + o / 2 for p, o in requests) / len(requests)
    assert paged.utilization > mean_length / (mean_length + 16)  # under one 16-token page wasted each
    assert reports["contiguous-max"].utilization < reports["contiguous-pow2"].utilization < paged.utilization
    assert reports["contiguous-oracle"].utilization < paged.utilization
    assert paged.mean_running > 1.5 * reports["contiguous-max"].mean_running
    assert paged.peak_running >= 4 * reports["contiguous-max"].peak_running
    assert paged.steps < reports["contiguous-max"].steps


def test_simulation_rejects_requests_that_cannot_fit():
    with pytest.raises(ValueError, match="prompt"):
        simulate_serving([(10, 600)], 8192, max_len=512)
    with pytest.raises(ValueError, match="budget"):
        simulate_serving([(10, 20)], 256, scheme="contiguous-max", max_len=512)
    with pytest.raises(ValueError, match="scheme"):
        simulate_serving([(10, 20)], 4096, scheme="buddy")
