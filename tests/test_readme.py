"""The README's usage example runs as written and says what it claims."""

import pathlib
import re


def test_readme_usage_example_runs_and_packs_to_the_stated_bits(capsys):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Usage\s+```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["p"].bits_per_weight == 4.5
    assert float(namespace["grad"].min()) == float(namespace["grad"].max()) == 1.0


def test_readme_workflow_quantizes_saves_and_loads_a_model_the_reader_writes(tmp_path):
    """QAT (rules -> quantize_model -> freeze) and PTQ (rules -> ptq.quantize) on the reader's
    MLP, both saved and loaded back into fresh skeletons with equal outputs."""
    import numpy as np

    from lowbit.nn import PackedLayer

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Quantize your own model.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    x = namespace["x"]
    for name in ("qat", "ptq"):
        model, loaded = namespace[name], namespace[f"{name}_loaded"]
        assert isinstance(model.up, PackedLayer) and isinstance(loaded.down, PackedLayer)
        np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert namespace["result"].bits_per_weight == 4.5
