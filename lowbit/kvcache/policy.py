"""Which tokens a bounded KV cache keeps: the full history, a sliding window, attention sinks plus a
window (StreamingLLM, positions re-assigned inside the cache), or H2O heavy hitters plus recent tokens.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class FullPolicy:
    """Keep every token (the cache grows with the sequence)."""

    name = "full"

    @property
    def capacity(self) -> int | None:
        return None

    def resolve(self, max_len: int) -> FullPolicy:
        return self

    def __str__(self) -> str:
        return "full"


@dataclasses.dataclass(frozen=True)
class WindowPolicy:
    """Keep the first `sinks` tokens and the most recent `window` tokens (the new one included).

    With sinks > 0 this is StreamingLLM: positions are re-assigned inside the cache, so the query
    sits at position min(t, capacity - 1) and sink i at i, while window tokens keep their distance
    to the query. Logical slot of position p: p below the capacity, else sinks + (p - sinks) % window.
    """

    window: int
    sinks: int = 0
    name = "window"

    def __post_init__(self):
        for field in ("window", "sinks"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def resolve(self, max_len: int) -> WindowPolicy:
        return self

    def slot(self, position: int) -> int:
        """Logical cache slot of a position (host-side twin of the traced formula)."""
        if position < self.capacity:
            return position
        return self.sinks + (position - self.sinks) % self.window

    def __str__(self) -> str:
        return f"sinks:{self.sinks},window:{self.window}" if self.sinks else f"window:{self.window}"


@dataclasses.dataclass(frozen=True)
class H2OPolicy:
    """Heavy-Hitter Oracle: keep `recent` most recent tokens plus the `heavy` tokens with the largest
    attention accumulated so far, chosen per layer and per KV head (scores summed over the query
    heads of a group). `ratio` (a share of max_len split evenly) is resolved into heavy/recent."""

    heavy: int | None = None
    recent: int | None = None
    ratio: float | None = None
    name = "h2o"

    def __post_init__(self):
        if self.ratio is not None:
            if self.heavy is not None or self.recent is not None:
                raise ValueError("give either ratio or heavy and recent, not both")
            if isinstance(self.ratio, bool) or not 0 < float(self.ratio) <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
            return
        for field in ("heavy", "recent"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")

    @property
    def capacity(self) -> int:
        if self.ratio is not None:
            raise ValueError("an H2O ratio must be resolved against max_len first (policy.resolve)")
        return self.heavy + self.recent

    def resolve(self, max_len: int) -> H2OPolicy:
        if self.ratio is None:
            return self
        budget = max(2, round(self.ratio * max_len))
        heavy = max(1, budget // 2)
        return H2OPolicy(heavy=heavy, recent=max(1, budget - heavy))

    def __str__(self) -> str:
        if self.ratio is not None:
            return f"h2o:{self.ratio:g}"
        return f"heavy:{self.heavy},recent:{self.recent}"


Policy = FullPolicy | WindowPolicy | H2OPolicy


def parse_policy(text: str | Policy | None) -> Policy:
    """Parse `full`, `window:N`, `sinks:S,window:N`, `h2o:RATIO` or `heavy:H,recent:R`."""
    if text is None:
        return FullPolicy()
    if isinstance(text, (FullPolicy, WindowPolicy, H2OPolicy)):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"policy must be a string like 'window:1024', got {text!r}")
    source = text.strip().lower()
    if source in ("full", "none"):
        return FullPolicy()
    items: dict[str, str] = {}
    for item in source.split(","):
        m = re.fullmatch(r"\s*(sinks|window|h2o|heavy|recent)\s*[:=]\s*([0-9.]+)\s*", item)
        if not m:
            raise ValueError(f"bad policy item {item!r} in {text!r}; expected sinks:N, window:N, "
                             "h2o:RATIO, heavy:N, recent:N")
        if m.group(1) in items:
            raise ValueError(f"policy item {m.group(1)!r} given twice in {text!r}")
        items[m.group(1)] = m.group(2)
    keys = set(items)

    def integer(key):
        if not re.fullmatch(r"\d+", items[key]):
            raise ValueError(f"{key} must be an integer in policy {text!r}, got {items[key]!r}")
        return int(items[key])

    if keys in ({"window"}, {"sinks", "window"}):
        return WindowPolicy(window=integer("window"), sinks=integer("sinks") if "sinks" in keys else 0)
    if keys == {"h2o"}:
        try:
            ratio = float(items["h2o"])
        except ValueError:
            raise ValueError(f"h2o ratio must be a number in (0, 1], got {items['h2o']!r}") from None
        return H2OPolicy(ratio=ratio)
    if keys == {"heavy", "recent"}:
        return H2OPolicy(heavy=integer("heavy"), recent=integer("recent"))
    raise ValueError(f"policy {text!r} mixes items {sorted(keys)}; allowed: window, sinks+window, "
                     "h2o, heavy+recent")
