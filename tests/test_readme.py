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
