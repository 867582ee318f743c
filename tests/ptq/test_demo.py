"""The demo's reference scorer agrees with lowbit.eval and is zero against itself."""

import numpy as np
import pytest

from lowbit.eval.perplexity import kl_divergence, perplexity
from lowbit.ptq.demo import ReferenceScorer, demo_runs, format_table
from lowbit.ptq.rtn import rtn_quantize


def test_scorer_matches_lowbit_eval(make_tiny):
    reference = make_tiny()
    tokens = np.random.default_rng(0).integers(0, 128, 80).astype(np.int32)
    scorer = ReferenceScorer(reference, tokens, ctx=16, windows=4)
    assert scorer.ref_ppl == pytest.approx(perplexity(reference, tokens, ctx=16, windows=4).ppl,
                                           rel=1e-5)
    itself = scorer.score(reference)
    assert itself["kl"] == pytest.approx(0.0, abs=1e-5) and itself["top1"] == 1.0
    quantized = make_tiny()
    rtn_quantize(quantized, "int2:g16:asym")
    got = scorer.score(quantized)
    expected = kl_divergence(quantized, reference, tokens, ctx=16, windows=4)
    assert got["kl"] == pytest.approx(expected.kl, rel=1e-3)
    assert got["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
    assert got["top1"] == pytest.approx(expected.top1)
    with pytest.raises(ValueError, match="windows"):
        ReferenceScorer(reference, tokens, ctx=16, windows=6)


def test_demo_runs_and_table():
    runs = demo_runs()
    assert [(r["method"], r["weights"]) for r in runs[:3]] == [
        ("rtn", "int4:g64:asym"), ("gptq", "int4:g64:asym"), ("awq", "int4:g64:asym")]
    assert len(runs) == 6
    table = format_table([{"method": "rtn", "weights": "int4", "ppl": 12.3456, "kl": 1234.5}],
                         ["method", "weights", "ppl", "kl"])
    assert table.splitlines()[2] == "| rtn | int4 | 12.3456 | 1234.5 |"
