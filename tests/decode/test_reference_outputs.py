"""Greedy tokens, cache-emulated perplexities and teacher-forced decode logits of a tiny random
Llama, against values saved before generation moved onto the model's own attention over a cache
(tests/decode/fixtures/tiny_reference.json; `python tests/decode/test_reference_outputs.py`
rewrites it)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from lowbit.decode import generate
from lowbit.decode.engine import BatchedGenerator, Request
from lowbit.decode.quality import cache_quality, final_hidden, teacher_forced_decode_logits
from lowbit.models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.slow  # about 2.5 min: a dozen cache configurations each compile their steps
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_reference.json"
LAYOUTS = ("f32", "bf16", "int8", "int8:g32", "int4", "kivi2", "kivi4")
POLICIES = ("window:24", "sinks:4,window:20", "h2o:0.5")
QUALITY = {"int8": ("int8", None), "int4": ("int4", None), "kivi2": ("kivi2", None),
           "sinks": ("f32", "sinks:4,window:20"), "window": ("int8", "window:24")}
NEW = 12


def _model():
    return Llama(LlamaConfig.tiny(head_dim=32, max_seq_len=256), rngs=nnx.Rngs(0))


def _prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 128, n).tolist() for n in (5, 17, 40)]


def compute() -> dict:
    model = _model()
    prompts = _prompts()
    out = {"generate": [np.asarray(generate(model, p, NEW)).tolist() for p in prompts]}
    for layout in LAYOUTS:
        generator = BatchedGenerator(model, layout, slots=2, max_len=64, page_size=32)
        out[f"engine/{layout}"] = [c.tokens for c in generator.generate([Request(p, NEW) for p in prompts])]
    for policy in POLICIES:
        generator = BatchedGenerator(model, "f32", policy, slots=2, max_len=64, page_size=32)
        out[f"engine/f32/{policy}"] = [c.tokens for c in generator.generate([Request(p, NEW) for p in prompts])]
    generator = BatchedGenerator(model, "int8", slots=2, max_len=64, page_size=32, contiguous=True)
    out["engine/int8/contiguous"] = [c.tokens for c in generator.generate([Request(p, NEW) for p in prompts])]
    rows = np.random.default_rng(4).integers(0, 128, (2, 32)).astype(np.int32)
    for layout, policy in (("f32", None), ("int8", None), ("kivi2", None), ("f32", "h2o:0.5"),
                           ("int4", "sinks:4,window:20")):
        logits = teacher_forced_decode_logits(model, rows, layout, policy, page_size=32)
        out[f"decode_logits/{layout}/{policy}"] = np.round(logits[:, ::7, ::9].astype(np.float64), 5).tolist()
    for layout, policy in (("int8", None), ("kivi2", None), ("f32", "sinks:4,window:20")):
        hidden = np.asarray(final_hidden(model, rows, layout, policy))
        out[f"final_hidden/{layout}/{policy}"] = np.round(hidden[:, ::5, ::7].astype(np.float64), 5).tolist()
    quality = cache_quality(model, rows, QUALITY)
    out["cache_quality"] = {name: [round(q.ppl, 6), round(q.ref_ppl, 6), round(q.kl, 8), q.top1, q.tokens]
                            for name, q in quality.items()}
    return out


def test_outputs_equal_the_saved_reference():
    saved = json.loads(FIXTURE.read_text())
    now = json.loads(json.dumps(compute()))
    assert now.keys() == saved.keys()
    for key, value in saved.items():
        if key.startswith(("generate", "engine")):
            assert now[key] == value, key
        elif key == "cache_quality":
            for name, row in value.items():
                np.testing.assert_allclose(now[key][name][:3], row[:3], rtol=1e-5, atol=1e-7, err_msg=name)
                assert now[key][name][3:] == row[3:], name
        else:
            np.testing.assert_allclose(np.asarray(now[key]), np.asarray(value), rtol=1e-4, atol=1e-4,
                                       err_msg=key)


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(compute(), indent=None) + "\n")
    sys.exit(0)
