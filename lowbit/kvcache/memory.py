"""Paged vs contiguous KV allocation on a stream of requests: the share of allocated KV memory that
holds real tokens, and how many sequences run at once in a fixed budget (a host-side simulation of
continuous batching that uses the real block allocator for the paged scheme).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from lowbit.kvcache.allocator import BlockAllocator, OutOfBlocksError

SCHEMES = ("paged", "contiguous-max", "contiguous-pow2", "contiguous-oracle")


@dataclasses.dataclass(frozen=True)
class ServingReport:
    """utilization: real tokens / allocated token slots, averaged over steps; mean_running /
    peak_running: sequences decoding per step; steps: decode steps to finish every request."""

    scheme: str
    utilization: float
    mean_running: float
    peak_running: int
    steps: int
    preemptions: int


def synthetic_requests(count: int, *, seed: int = 0, max_len: int = 2048, prompt_mean: float = 160.0,
                       output_mean: float = 340.0, sigma: float = 0.9) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs with log-normal lengths of the given means (ShareGPT-like
    defaults), each total at most max_len."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    rng = np.random.default_rng(seed)

    def draw(mean):
        return rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, count)

    prompts = np.clip(np.round(draw(prompt_mean)), 1, max_len - 1).astype(int)
    outputs = np.clip(np.round(draw(output_mean)), 1, None).astype(int)
    outputs = np.minimum(outputs, max_len - prompts)
    return [(int(p), int(o)) for p, o in zip(prompts, outputs)]


def _reservation(scheme: str, prompt: int, output: int, max_len: int) -> int:
    if scheme == "contiguous-max":
        return max_len
    if scheme == "contiguous-pow2":
        return min(max_len, 1 << (prompt + output - 1).bit_length())
    return prompt + output


def simulate_serving(requests, budget_tokens: int, *, scheme: str = "paged", page_size: int = 16,
                     max_len: int = 2048, max_running: int | None = None) -> ServingReport:
    """Serve (prompt_len, output_len) requests first come first served with continuous batching in
    a KV budget of budget_tokens token slots. Contiguous schemes reserve max_len, the next power of
    two of the final length, or the exact final length (oracle) at admission; the paged scheme takes
    pages as tokens arrive and preempts the newest sequence when the pool runs dry."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    for name, value in (("budget_tokens", budget_tokens), ("page_size", page_size), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    requests = [(int(p), int(o)) for p, o in requests]
    if any(p < 1 or o < 1 or p + o > max_len for p, o in requests):
        raise ValueError(f"every request needs prompt >= 1, output >= 1 and prompt + output <= {max_len}")
    if any(_reservation(scheme, p, o, max_len) > budget_tokens for p, o in requests):
        raise ValueError(f"a request does not fit in budget_tokens={budget_tokens} under {scheme!r}")
    paged = scheme == "paged"
    allocator = BlockAllocator(budget_tokens // page_size) if paged else None
    pending = collections.deque(range(len(requests)))
    generated = [0] * len(requests)  # kept across a preemption: the sequence is recomputed
    running: dict[int, dict] = {}
    reserved_total = 0
    utilization, batch = [], []
    steps = preemptions = order = 0
    limit = max_running or len(requests)
    while pending or running:
        while pending and len(running) < limit:  # admission: the prompt (paged) or a reservation
            i = pending[0]
            prompt, output = requests[i]
            length = prompt + generated[i]
            if paged:
                need = math.ceil((length + 1) / page_size)
                if need > allocator.num_free:
                    break
                pages = allocator.allocate(need)
                running[i] = {"length": length, "pages": pages, "order": order}
            else:
                size = _reservation(scheme, prompt, output, max_len)
                if reserved_total + size > budget_tokens:
                    break
                reserved_total += size
                running[i] = {"length": length, "reserved": size, "order": order}
            order += 1
            pending.popleft()
        if not running:
            raise ValueError("a request cannot be admitted into an empty pool")
        if paged:  # room for this step's token, preempting the newest when short
            for i in sorted(running, key=lambda r: running[r]["order"]):
                while i in running and len(running[i]["pages"]) * page_size < running[i]["length"] + 1:
                    try:
                        running[i]["pages"] += allocator.allocate(1)
                    except OutOfBlocksError:
                        victim = max(running, key=lambda r: running[r]["order"])
                        for page in running.pop(victim)["pages"]:
                            allocator.release(page)
                        pending.appendleft(victim)
                        preemptions += 1
        allocated = (allocator.num_used * page_size) if paged else reserved_total
        held = sum(s["length"] + 1 for s in running.values())
        utilization.append(held / allocated)
        batch.append(len(running))
        steps += 1
        for i in list(running):
            state = running[i]
            state["length"] += 1
            generated[i] += 1
            if generated[i] >= requests[i][1]:
                if paged:
                    for page in state["pages"]:
                        allocator.release(page)
                else:
                    reserved_total -= state["reserved"]
                del running[i]
    return ServingReport(scheme, float(np.mean(utilization)), float(np.mean(batch)), int(max(batch)),
                         steps, preemptions)
