"""KV caches: dense and paged storage (block tables, a block allocator, prefix sharing with copy on
write), quantized layouts (int8, int4, KIVI 2/4-bit) and policies (window, sinks, H2O)."""

from lowbit.kvcache.allocator import BlockAllocator, OutOfBlocksError
from lowbit.kvcache.attention import DecodeView, PrefillView, attend, decode_layer, prefill_layer
from lowbit.kvcache.cache import CacheMemory, DenseKVCache, PagedKVCache
from lowbit.kvcache.layout import LAYOUT_NAMES, KVLayout, TensorFormat, parse_layout
from lowbit.kvcache.memory import ServingReport, simulate_serving, synthetic_requests
from lowbit.kvcache.policy import FullPolicy, H2OPolicy, WindowPolicy, parse_policy
from lowbit.kvcache.store import CacheSpec, init_state

__all__ = [
    "BlockAllocator", "CacheMemory", "CacheSpec", "DecodeView", "DenseKVCache", "FullPolicy", "H2OPolicy", "KVLayout",
    "LAYOUT_NAMES", "OutOfBlocksError", "PagedKVCache", "PrefillView", "ServingReport", "TensorFormat", "WindowPolicy",
    "attend", "decode_layer", "init_state", "parse_layout", "parse_policy", "prefill_layer",
    "simulate_serving", "synthetic_requests",
]
