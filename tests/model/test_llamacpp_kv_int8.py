"""`lowbit generate --kv int8 --json` against llama.cpp (llama-cpp-python, the optional `ref` extra) on
an F32 copy of SmolLM2-135M with an F32 KV cache: the same first 24 greedy tokens on a held-apart
514-token prompt (pydoc tokens 100000..100513)."""

import json

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from test_llamacpp_reference import THREADS, _first_difference, _reference_next_tokens, _write_f32_copy  # noqa: E402

from lowbit.cli import main  # noqa: E402
from lowbit.data.corpus import load_text  # noqa: E402
from lowbit.models.tokenizer import Tokenizer  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]

FIRST, LENGTH, NEW = 100_000, 514, 24


def test_int8_kv_generate_matches_llamacpp_f32_greedy(smollm2_path, tmp_path, capsys):
    tokenizer = Tokenizer.from_gguf(smollm2_path)
    held_apart = tokenizer.encode(load_text())[FIRST:FIRST + LENGTH]
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(tokenizer.decode(held_apart), encoding="utf-8")
    main(["generate", "--model", "smollm2-135m", "--kv", "int8", "--json", "--quiet",
          "--prompt-file", str(prompt_file), "--max-new-tokens", str(NEW)])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours = info["results"][0]["tokens"]
    prompt = tokenizer.encode(prompt_file.read_text(encoding="utf-8"))
    assert info["results"][0]["prompt_tokens"] == len(prompt) and abs(len(prompt) - LENGTH) <= 2
    assert info["kv"].startswith("int8") and len(ours) == NEW

    path = tmp_path / "smollm2-f32.gguf"
    _write_f32_copy(smollm2_path, path)
    llm = llama_cpp.Llama(str(path), n_ctx=640, logits_all=True, n_threads=THREADS, n_threads_batch=THREADS,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    try:
        theirs, logits = _reference_next_tokens(llm, prompt, ours)
    finally:
        llm.close()
    print(f"lowbit --kv {info['kv']}: {ours}\nllama.cpp F32: {theirs.tolist()}")
    i = _first_difference(ours, theirs.tolist())
    if i is not None:
        top2 = np.sort(logits[i])[-2:]
        pytest.fail(f"greedy step {i}: lowbit --kv int8 chose {ours[i]}, llama.cpp F32 {theirs[i]} "
                    f"(its top-2 logit margin {top2[1] - top2[0]:.4g})")
