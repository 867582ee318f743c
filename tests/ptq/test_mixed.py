"""Mixed precision: the allocator against a brute-force search, the budget, and the sensitivity
measurement on a tiny model (which leaves the model unchanged)."""

import itertools

import numpy as np
import pytest

from lowbit.core.packing import pack
from lowbit.core.quantize import quantize
from lowbit.ptq.driver import linear_paths, module_at
from lowbit.ptq.mixed import (_lower_hull, allocate, layer_sensitivity, mixed_quantize,
                              predicted_kl, uniform_allocation)

SPECS = ("a", "b", "c")


def _table(costs, bits=(2, 3, 4), weights=1):
    return {"candidates": list(SPECS), "layers": {
        f"l{i}": {"weights": weights, "bits": dict(zip(SPECS, bits)),
                  "kl": dict(zip(SPECS, row))} for i, row in enumerate(costs)}}


def test_lower_hull_drops_dominated_and_concave_points():
    options = [(2, 10.0, "a"), (3, 9.5, "b"), (4, 1.0, "c"), (5, 1.0, "d")]
    # b lies above the segment a-c; d costs more bits for no gain
    assert [o[2] for o in _lower_hull(options)] == ["a", "c"]
    assert [o[2] for o in _lower_hull([(2, 10.0, "a"), (3, 3.0, "b"), (4, 1.0, "c")])] == \
        ["a", "b", "c"]


@pytest.mark.parametrize("budget", [2.0, 2.4, 2.6, 3.0, 3.2, 3.8, 4.0])
def test_allocation_equals_brute_force_on_convex_costs(budget):
    rng = np.random.default_rng(int(budget * 10))
    costs = []
    for _ in range(5):  # convex decreasing costs: each upgrade gains less than the one before
        high = rng.uniform(0.01, 0.1)
        costs.append([high + rng.uniform(2, 5) + rng.uniform(0.5, 2), high + rng.uniform(0.2, 0.5),
                      high])
        costs[-1][0] = max(costs[-1][0], 2 * costs[-1][1] - costs[-1][2] + 0.01)
    table = _table(costs)
    allocation = allocate(table, budget)
    bits = {s: b for s, b in zip(SPECS, (2, 3, 4))}
    assert sum(bits[s] for s in allocation.values()) <= budget * 5
    best = min(sum(costs[i][SPECS.index(s)] for i, s in enumerate(choice))
               for choice in itertools.product(SPECS, repeat=5)
               if sum(bits[s] for s in choice) <= budget * 5)
    assert predicted_kl(table, allocation) == pytest.approx(best)


def test_budget_limits():
    table = _table([[3.0, 1.0, 0.5]] * 4)
    assert set(allocate(table, 4.0).values()) == {"c"}
    assert set(allocate(table, 100.0).values()) == {"c"}
    assert set(allocate(table, 2.0).values()) == {"a"}
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(table, 1.9)
    with pytest.raises(ValueError, match="not one of the measured"):
        uniform_allocation(table, "int8")


def test_sensitivity_on_a_tiny_model_and_mixed_meets_its_budget(make_tiny, calibration,
                                                                test_tokens):
    model = make_tiny()
    before = np.asarray(model(test_tokens))
    candidates = ("int2:g32:asym", "int4:g32:asym")
    table = layer_sensitivity(model, calibration, candidates, tokens=32, progress=False)
    np.testing.assert_array_equal(np.asarray(model(test_tokens)), before)  # restored
    paths = linear_paths(len(model.layers))
    assert list(table["layers"]) == paths
    low, high = (np.array([table["layers"][p]["kl"][c] for p in paths]) for c in candidates)
    assert (low >= 0).all() and np.mean(low > high) >= 0.9
    kernel = np.asarray(module_at(model, paths[0]).kernel[...])
    assert table["layers"][paths[0]]["bits"]["int2:g32:asym"] == \
        8 * pack(quantize(kernel, "int2:g32:asym", axis=0)).nbytes

    uniform_bits = {c: sum(table["layers"][p]["bits"][c] for p in paths) /
                    sum(table["layers"][p]["weights"] for p in paths) for c in candidates}
    budget = (uniform_bits[candidates[0]] + uniform_bits[candidates[1]]) / 2
    result = mixed_quantize(model, calibration, budget, candidates, progress=False,
                            sensitivity_file=None)
    assert result.bits_per_weight <= budget + 1e-9
    assert set(result.settings["spec_counts"]) == set(candidates)
    with pytest.raises(ValueError, match="budget"):
        mixed_quantize(model, calibration, -1.0, candidates)
    with pytest.raises(ValueError, match="candidate"):
        layer_sensitivity(model, calibration, ("int4:token",))


def test_sensitivity_file_is_written_once_and_checked(make_tiny, calibration, tmp_path):
    candidates = ("int2:g32:asym", "int4:g32:asym")
    path = tmp_path / "sensitivity.json"
    first = mixed_quantize(make_tiny(), calibration, 3.5, candidates, sensitivity_file=path,
                           progress=False)
    written = path.read_text()
    second = mixed_quantize(make_tiny(), calibration, 3.5, candidates, sensitivity_file=path,
                            progress=False)
    assert path.read_text() == written
    assert second.settings["allocation"] == first.settings["allocation"]
    with pytest.raises(ValueError, match="holds candidates"):
        mixed_quantize(make_tiny(), calibration, 3.5, ("int3:g32:asym",), sensitivity_file=path)
    with pytest.raises(ValueError, match="other calibration tokens"):
        mixed_quantize(make_tiny(), calibration[::-1], 3.5, candidates, sensitivity_file=path)
    with pytest.raises(ValueError, match="other layers"):
        mixed_quantize(make_tiny(n_layers=1), calibration, 3.5, candidates,
                       sensitivity_file=path)


def test_leftover_budget_goes_to_options_off_the_hull():
    # b lies above the segment a-c, so the hull skips it, but it is the only upgrade that fits
    table = {"candidates": list(SPECS), "layers": {"l0": {
        "weights": 100, "bits": {"a": 220, "b": 320, "c": 420},
        "kl": {"a": 1.0, "b": 0.9, "c": 0.0}}}}
    assert allocate(table, 3.2) == {"l0": "b"}
    assert allocate(table, 4.2) == {"l0": "c"}


def test_mixed_over_gptq_with_super_block_candidates_meets_the_budget(make_tiny, calibration,
                                                                       test_tokens):
    from lowbit.core.packing import storage_bits
    from lowbit.ptq.mixed import candidate_weights

    model = make_tiny()
    before = np.asarray(model(test_tokens))
    candidates = ("int3:g16:ss64", "int4:g16:ss64:asym")
    weights = candidate_weights(model, calibration, candidates, progress=False)
    np.testing.assert_array_equal(np.asarray(model(test_tokens)), before)  # float again
    paths = linear_paths(len(model.layers))
    table = layer_sensitivity(model, calibration, candidates, tokens=32, progress=False,
                              weights=weights, base="gptq")
    assert table["base"] == "gptq"
    kernel = np.asarray(module_at(model, paths[0]).kernel[...])
    assert table["layers"][paths[0]]["bits"]["int3:g16:ss64"] == \
        storage_bits(weights["int3:g16:ss64"][paths[0]].spec, kernel.shape)
    # the GPTQ weights differ from RTN's: the sensitivities are those of the GPTQ weights
    rtn_table = layer_sensitivity(model, calibration, candidates, tokens=32, progress=False)
    assert any(table["layers"][p]["kl"] != rtn_table["layers"][p]["kl"] for p in paths)

    total = sum(table["layers"][p]["weights"] for p in paths)
    low, high = (sum(table["layers"][p]["bits"][c] for p in paths) / total for c in candidates)
    budget = (low + high) / 2
    result = mixed_quantize(model, calibration, budget, candidates, base="gptq", progress=False)
    assert result.bits_per_weight <= budget
    assert set(result.settings["spec_counts"]) == set(candidates)
    assert result.settings["base"] == "gptq"
    for path, spec in result.settings["allocation"].items():  # the installed GPTQ weights
        np.testing.assert_array_equal(module_at(model, path).dequantized_matrix(),
                                      weights[spec][path].dequantize())
    with pytest.raises(ValueError, match="base must be one of"):
        mixed_quantize(make_tiny(), calibration, budget, candidates, base="awq")
