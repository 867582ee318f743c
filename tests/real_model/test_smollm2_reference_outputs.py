"""SmolLM2-135M greedy tokens (float and int8 caches, and the single-sequence generate) and
cache-quality numbers (int8, int4, KIVI-2, sinks), against values saved before generation moved onto the model's
own attention over a cache (fixtures/smollm2_reference.json; run this file to rewrite it)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit.data.corpus import load_text
from lowbit.decode import generate
from lowbit.decode.engine import BatchedGenerator, Request
from lowbit.decode.quality import cache_quality
from lowbit.models.loader import load_gguf_model
from lowbit.models.tokenizer import Tokenizer

pytestmark = [pytest.mark.model, pytest.mark.slow]
FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.json"
NEW = 12


def compute(path) -> dict:
    model = load_gguf_model(path)[0]
    tokens = np.asarray(Tokenizer.from_gguf(path).encode(load_text()[:8000]), np.int32)
    prompts = [tokens[s:s + n].tolist() for s, n in ((0, 40), (300, 25))]
    out = {"generate": [np.asarray(generate(model, p, NEW)).tolist() for p in prompts]}
    for layout in ("f32", "int8"):
        generator = BatchedGenerator(model, layout, slots=2, max_len=64)
        out[f"engine/{layout}"] = [c.tokens for c in generator.generate([Request(p, NEW) for p in prompts])]
    windows = tokens[1000:1000 + 64].reshape(1, 64)
    quality = cache_quality(model, windows, {"int8": ("int8", None), "int4": ("int4", None),
                                             "kivi2": ("kivi2", None), "sinks": ("f32", "sinks:4,window:28")})
    out["cache_quality"] = {name: [round(q.ppl, 5), round(q.ref_ppl, 5), round(q.kl, 7), q.top1, q.tokens]
                            for name, q in quality.items()}
    return out


def test_outputs_equal_the_saved_reference(smollm2_path):
    saved = json.loads(FIXTURE.read_text())
    now = json.loads(json.dumps(compute(smollm2_path)))
    for key, value in saved.items():
        if key == "cache_quality":
            for name, row in value.items():
                np.testing.assert_allclose(now[key][name][:3], row[:3], rtol=1e-4, atol=1e-6, err_msg=name)
        else:
            assert now[key] == value, key


if __name__ == "__main__":
    from lowbit.models.registry import fetch

    FIXTURE.write_text(json.dumps(compute(fetch("smollm2-135m"))) + "\n")
    sys.exit(0)
