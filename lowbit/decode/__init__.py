"""Generation over KV caches: jit-compiled prefill/decode steps, batched generation with continuous
batching from one paged pool and cache-quality evaluation."""

from lowbit.decode.engine import BatchedGenerator, Completion, GenerationStats, Request, generate_batch
from lowbit.decode.quality import CacheQuality, cache_quality, final_hidden, teacher_forced_decode_logits
from lowbit.decode.step import decode_step, prefill_step

__all__ = [
    "BatchedGenerator", "CacheQuality", "Completion", "GenerationStats", "Request",
    "cache_quality", "decode_step", "final_hidden", "generate_batch", "prefill_step",
    "teacher_forced_decode_logits",
]
