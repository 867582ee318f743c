"""Generation through the model's own blocks over KV caches: generate (one prompt or an equal-length
batch), batched generation with continuous batching from one paged pool, the compiled prefill/decode
steps, cache-quality evaluation and speculative decoding."""

from lowbit.decode.engine import (BatchedGenerator, Completion, GenerationStats, Request, generate, generate_batch,
                                  prompt_bucket)
from lowbit.decode.quality import CacheQuality, cache_quality, final_hidden, teacher_forced_decode_logits
from lowbit.decode.speculative import (SpeculativeDecoder, SpeculativeStats, expected_tokens_per_call, layer_draft,
                                       predicted_speedup, speculative_accept)
from lowbit.decode.step import decode_step, prefill_step

__all__ = [
    "BatchedGenerator", "CacheQuality", "Completion", "GenerationStats", "Request",
    "cache_quality", "decode_step", "final_hidden", "generate", "generate_batch", "prefill_step",
    "prompt_bucket", "teacher_forced_decode_logits", "SpeculativeDecoder", "SpeculativeStats",
    "expected_tokens_per_call", "layer_draft", "predicted_speedup", "speculative_accept",
]
