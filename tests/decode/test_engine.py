"""Batched generation: several prompts of different lengths from one paged pool equal greedy decoding
with the full forward, through continuous batching, preemption and prefix sharing; sampling is
reproducible; a request that can never fit is a clear error; the CLI options work end to end."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.cli.generate import add_arguments as add_generate_arguments, run_generate_kv, wants_kv_generation
from lowbit.decode.engine import BatchedGenerator, Request, generate_batch

NEW = 8
OPTIONS = dict(slots=3, max_len=32, page_size=4)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    rng = np.random.default_rng(2)
    shared = rng.integers(1, tiny_model.config.vocab_size, 9).tolist()
    out = [rng.integers(1, tiny_model.config.vocab_size, int(n)).tolist() for n in (3, 16, 7, 11, 1)]
    return out[:1] + [shared + [5], shared + [6, 7, 8]] + out[1:]  # two prompts sharing two pages


@pytest.fixture(scope="module")
def greedy_reference(tiny_model, prompts):
    """Greedy continuations from the full forward over right-padded rows (one compilation)."""
    rows = [list(p) for p in prompts]
    forward = jax.jit(lambda x: tiny_model(x))
    for _ in range(NEW):
        padded = np.zeros((len(rows), 32), np.int32)
        for i, r in enumerate(rows):
            padded[i, :len(r)] = r
        logits = np.asarray(forward(jnp.asarray(padded)))
        for i, r in enumerate(rows):
            r.append(int(logits[i, len(r) - 1].argmax()))
    return [r[len(p):] for r, p in zip(rows, prompts)]


def test_batched_greedy_generation_equals_full_forward(tiny_model, prompts, greedy_reference):
    generator = BatchedGenerator(tiny_model, "f32", num_pages=24, **OPTIONS)
    out = generator.generate([Request(p, NEW) for p in prompts])
    assert [c.tokens for c in out] == greedy_reference
    stats = generator.stats
    assert stats.shared_prefix_tokens >= 8  # the second shared-prefix prompt reused the first's pages
    assert stats.generated_tokens == NEW * len(prompts) and stats.mean_batch > 1.5
    assert generator.cache.allocator.num_free == 24  # every page came back


def test_a_small_pool_preempts_and_recomputes_without_changing_results(tiny_model, prompts, greedy_reference):
    generator = BatchedGenerator(tiny_model, "f32", num_pages=7, share_prefixes=False, **OPTIONS)
    out = generator.generate([Request(p, NEW) for p in prompts])
    assert [c.tokens for c in out] == greedy_reference
    assert generator.stats.preemptions > 0 and generator.stats.peak_pages <= 7
    generator.cache.allocator.check()
    assert generator.cache.allocator.num_free == 7


def test_contiguous_cache_gives_the_same_tokens(tiny_model, prompts, greedy_reference):
    generator = BatchedGenerator(tiny_model, "f32", contiguous=True, **OPTIONS)
    out = generator.generate([Request(p, NEW) for p in prompts])
    assert [c.tokens for c in out] == greedy_reference
    assert generator.stats.mean_utilization < 0.75  # a max_len region per sequence, mostly empty


def test_sampling_is_reproducible_across_pool_sizes(tiny_model, prompts):
    key = jax.random.key(7)
    requests = [Request(p, NEW, temperature=1.0, key=jax.random.fold_in(key, i)) for i, p in enumerate(prompts)]
    a = BatchedGenerator(tiny_model, "f32", num_pages=24, **OPTIONS).generate(requests)
    b = BatchedGenerator(tiny_model, "f32", num_pages=7, share_prefixes=False, **OPTIONS).generate(requests)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    greedy = generate_batch(tiny_model, prompts, NEW, num_pages=24, **OPTIONS)
    assert [c.tokens for c in a] != greedy
    with pytest.raises(ValueError, match="key"):
        Request(prompts[0], NEW, temperature=0.5)


def test_requests_that_cannot_fit_fail_clearly(tiny_model, prompts):
    with pytest.raises(ValueError, match="needs 5 KV pages .* the pool holds num_pages=2"):
        BatchedGenerator(tiny_model, "f32", num_pages=2, **OPTIONS).generate([Request(prompts[1], NEW)])
    with pytest.raises(ValueError, match="pool holds num_pages=1 pages of 4 tokens"):
        BatchedGenerator(tiny_model, "int8", "window:16", slots=1, max_len=32, num_pages=1,
                         page_size=4).generate([Request(prompts[1], NEW)])
    generator = BatchedGenerator(tiny_model, "f32", "window:16", slots=1, max_len=1000,
                                 page_size=4)
    with pytest.raises(ValueError, match="prompt of 257 tokens exceeds the model's context length"):
        generator.generate([Request([1] * 257, NEW)])
    assert generator.cache.allocator.num_free == generator.cache.allocator.num_blocks
    with pytest.raises(ValueError, match="max_len"):
        BatchedGenerator(tiny_model, "f32", num_pages=24, **OPTIONS).generate([Request(prompts[1], 40)])
    with pytest.raises(ValueError, match="prompt"):
        Request([], NEW)


def test_eos_stops_a_request_early(tiny_model, prompts, greedy_reference):
    ref = greedy_reference[3]
    stop = next(i for i in range(1, NEW) if ref[i] not in ref[:i])
    out = BatchedGenerator(tiny_model, "f32", num_pages=24, **OPTIONS).generate(
        [Request(prompts[3], NEW, eos_id=ref[stop]), Request(prompts[4], NEW)])
    assert out[0].tokens == ref[:stop + 1] and out[0].finish_reason == "eos"
    assert out[1].tokens == greedy_reference[4] and out[1].finish_reason == "length"


def test_several_decode_steps_per_call_give_the_tokens_of_one_step_per_call(tiny_model, prompts, monkeypatch):
    """With no request waiting, one call runs as many steps as every row still needs (greedy and
    sampled rows, a row stopping at EOS inside a call): the tokens equal one step per call's, in
    fewer calls."""
    import lowbit.decode.engine as engine

    calls = []
    counted = lambda *args, **kwargs: calls.append(1) or engine_steps(*args, **kwargs)  # noqa: E731
    engine_steps = engine.decode_steps
    monkeypatch.setattr(engine, "decode_steps", counted)
    key = jax.random.key(3)
    greedy_eos = generate_batch(tiny_model, prompts[3:4], NEW, num_pages=24, **OPTIONS)[0][2]
    requests = [Request(prompts[3], NEW, eos_id=greedy_eos), Request(prompts[4], NEW),
                Request(prompts[0], NEW, temperature=1.0, key=key)]

    def run(max_steps):
        monkeypatch.setattr(engine, "MAX_DECODE_STEPS", max_steps)
        calls.clear()
        generator = BatchedGenerator(tiny_model, "f32", num_pages=24, **OPTIONS)
        out = [(c.tokens, c.finish_reason) for c in generator.generate(requests)]
        assert generator.cache.allocator.num_free == 24
        return out, len(calls), generator.stats.decode_steps

    one, one_calls, one_steps = run(1)
    several, several_calls, several_steps = run(16)
    assert several == one and one[0][1] == "eos" and len(one[0][0]) == 3
    assert one_calls == one_steps == NEW - 1 and several_calls == 1 and several_steps == NEW - 1


class _ByteTokenizer:
    eos_id = None

    def encode(self, text):
        return [b % 128 for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(32 + i % 90) for i in ids)


def test_cli_serves_a_batch_file(tiny_model, tmp_path, capsys):
    batch = tmp_path / "prompts.txt"
    batch.write_text("hello there\n\nsecond prompt, longer\nthird\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    add_generate_arguments(parser)
    args = parser.parse_args(["--max-new-tokens", "4", "--kv", "int8", "--kv-policy", "window:24", "--batch-file", str(batch),
                              "--slots", "2", "--page-size", "4", "--json"])
    assert wants_kv_generation(args)
    info = run_generate_kv(args, tiny_model, _ByteTokenizer())
    assert [len(r["tokens"]) for r in info["results"]] == [4, 4, 4]
    assert info["kv"] == "int8" and info["policy"] == "window:24"
    assert '"kv": "int8"' in capsys.readouterr().out
    assert not wants_kv_generation(parser.parse_args([]))
    with pytest.raises(ValueError, match="policy"):
        run_generate_kv(parser.parse_args(["--kv-policy", "windo:3", "--batch-file", str(batch)]),
                        tiny_model, _ByteTokenizer())
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("x" * 300)  # 300 tokens, more than max_seq_len = 256
    with pytest.raises(ValueError, match="context length max_seq_len=256"):
        run_generate_kv(parser.parse_args(["--kv", "int8", "--prompt-file", str(long_prompt)]),
                        tiny_model, _ByteTokenizer())
    with pytest.raises(ValueError, match="context length max_seq_len=256"):
        run_generate_kv(parser.parse_args(["--kv-policy", "window:99999999999999999999",
                                           "--prompt-file", str(long_prompt)]),
                        tiny_model, _ByteTokenizer())


@pytest.mark.parametrize("layout", ["f32", "int8"])
def test_continuous_batching_equals_single_sequence_greedy(tiny_model, prompts, layout):
    """Mixed-length prompts joining and leaving 3 slots produce, token for token, what each prompt
    gets alone (one slot; for f32 also the model's own single-sequence generate()), with one
    compiled decode step for the whole batch run."""
    from lowbit.decode.step import decode_step
    from lowbit.decode import generate

    alone = [BatchedGenerator(tiny_model, layout, slots=1, max_len=32, page_size=4)
             .generate([Request(p, NEW)])[0].tokens for p in prompts]
    if layout == "f32":
        assert alone == [generate(tiny_model, p, NEW).tolist() for p in prompts]
    generator = BatchedGenerator(tiny_model, layout, num_pages=24, **OPTIONS)
    before = decode_step.compiled_count()
    together = generator.generate([Request(p, NEW) for p in prompts])
    assert [c.tokens for c in together] == alone
    assert generator.stats.mean_batch > 1.5 and decode_step.compiled_count() - before <= 1
