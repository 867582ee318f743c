"""Cache limits: the window, the kept tokens and the full-policy length are capped by the model's
context length with a clear error, before anything is allocated."""

import pytest

from lowbit.kvcache.cache import DenseKVCache, PagedKVCache
from lowbit.models.llama import LlamaConfig

CONFIG = LlamaConfig.tiny(n_layers=1, head_dim=16, max_seq_len=256)


@pytest.mark.parametrize("cache_type", [PagedKVCache, DenseKVCache])
@pytest.mark.parametrize("policy", ["window:99999999999999999999", "window:1000000000",
                                    "sinks:4,window:253", "heavy:200,recent:57", "h2o:0.5"])
def test_a_policy_keeping_more_than_the_context_length_is_refused(cache_type, policy):
    with pytest.raises(ValueError, match="context length max_seq_len=256"):
        cache_type(CONFIG, "int8", policy, slots=2, max_len=1024, page_size=4)


def test_the_full_policy_cannot_exceed_the_context_length():
    with pytest.raises(ValueError, match="max_len=257 .*context length max_seq_len=256"):
        PagedKVCache(CONFIG, "int8", slots=2, max_len=257)
    assert PagedKVCache(CONFIG, "int8", slots=2, max_len=256).max_len == 256
    assert PagedKVCache(CONFIG, "int8", slots=2).max_len == 256


def test_bounded_policies_within_the_context_length_may_stream_past_it():
    cache = PagedKVCache(CONFIG, "int8", "sinks:4,window:252", slots=2, max_len=10_000, page_size=4)
    assert cache.policy.capacity == 256 and cache.table_width == 64
