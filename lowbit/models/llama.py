"""Llama-family decoder in Flax NNX (RMSNorm, RoPE attention with grouped KV heads, SwiGLU MLP),
whose attention runs causally or over any KV cache through one small interface (AttentionCache),
and a streaming weight loader that never holds two copies of the weights.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROPE_LAYOUTS = ("half", "interleaved")

_INT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
               "ffn_dim", "max_seq_len")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    rope_layout: "half" rotates the pairs (j, j + head_dim/2) (Hugging Face rotate_half);
    "interleaved" rotates adjacent pairs (2j, 2j + 1) (GPT-J / llama.cpp order).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tied_embeddings: bool = True
    rope_layout: str = "half"

    def __post_init__(self):
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            try:
                value = operator.index(value)
            except TypeError:
                raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, value)
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            value = float(value)
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            object.__setattr__(self, name, value)
        if not isinstance(self.tied_embeddings, (bool, np.bool_)):
            raise ValueError(f"tied_embeddings must be True or False, got {self.tied_embeddings!r}")
        object.__setattr__(self, "tied_embeddings", bool(self.tied_embeddings))
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from a mapping whose keys are exactly this class's field names."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"config keys {unknown} are unknown; allowed keys: {allowed}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"config is missing required keys {missing}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A small config for tests: 2 blocks, d_model 64, 4 query heads sharing 2 KV heads."""
        fields = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, ffn_dim=128, max_seq_len=128)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        """SmolLM2-135M: 30 blocks, d_model 576, 9 query heads over 3 KV heads, tied head."""
        return cls(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                   head_dim=64, ffn_dim=1536, max_seq_len=8192, rope_base=100000.0,
                   norm_eps=1e-5, tied_embeddings=True, rope_layout="half")

    @property
    def n_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.d_model * self.ffn_dim + 2 * self.d_model
        head = 0 if self.tied_embeddings else self.d_model * self.vocab_size
        return self.vocab_size * self.d_model + self.n_layers * block + self.d_model + head


def rope_angles(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of the rotation angles: positions [...] -> two arrays [..., head_dim/2] in f32.

    Pair j rotates by position * base^(-2j/head_dim) in either layout.
    """
    inv_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """Rotates x: [batch, seq, heads, head_dim] by cos/sin: [batch, seq, head_dim/2]."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if layout == "half":
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif layout == "interleaved":
        pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    return out.astype(x.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped attention. q: [b, s, kv_heads, group, hd] (already scaled);
    k, v: [b, t, kv_heads, hd]; mask: [b or 1, s, t] (True = may attend).
    Returns [b, s, kv_heads, group, hd].

    Heads go in front and the group joins the query rows ([b, kv_heads, s*group, hd]) so both
    products are plain batched matmuls (about twice as fast on XLA:CPU as a 5-D einsum).
    """
    b, s, n_kv, group, hd = q.shape
    t = k.shape[1]
    rows = q.transpose(0, 2, 1, 3, 4).reshape(b, n_kv, s * group, hd)
    keys = k.transpose(0, 2, 1, 3)
    values = v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkmd,bktd->bkmt", rows, keys, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, n_kv, s, group, t)
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, n_kv, s * group, t)
    out = jnp.einsum("bkmt,bktd->bkmd", probs, values).reshape(b, n_kv, s, group, hd)
    return out.transpose(0, 2, 1, 3, 4)


class AttentionCache(Protocol):
    """What a block's attention needs from a KV cache (kvcache/ and decode/ implement it: dense,
    paged, quantized, windowed, H2O, and the one-pass emulation of decode/quality.py).

    attend(layer, q, k, v, rotate_query) stores block `layer`'s keys/values of the new tokens
    where the cache puts them, and attends for their queries over what the cache holds;
    q: [batch, seq, n_heads, head_dim] and k: [batch, seq, n_kv_heads, head_dim] after RoPE
    (q unscaled), v like k; rotate_query(positions [batch, seq]) -> q rotated at other
    positions (for caches that re-assign positions, e.g. attention sinks). Returns the attention
    output [batch, seq, n_heads, head_dim] and the updated cache. Without a cache (None),
    attention is causal over the tokens themselves (training, scoring, calibration).
    """

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
               rotate_query: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, AttentionCache]:
        ...


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in f32 and returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, *, param_dtype: Any = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _linear(n_in: int, n_out: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(stddev=n_in ** -0.5), rngs=rngs)


class Attention(nnx.Module):
    """Causal self-attention with RoPE and grouped KV heads (wq, wk, wv, wo, no biases)."""

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.wq = _linear(c.d_model, c.n_heads * c.head_dim, dtype, param_dtype, rngs)
        self.wk = _linear(c.d_model, c.n_kv_heads * c.head_dim, dtype, param_dtype, rngs)
        self.wv = _linear(c.d_model, c.n_kv_heads * c.head_dim, dtype, param_dtype, rngs)
        self.wo = _linear(c.n_heads * c.head_dim, c.d_model, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: AttentionCache | None = None,
                 layer: int = 0) -> jax.Array | tuple[jax.Array, AttentionCache]:
        """x: [batch, seq, d_model] at RoPE positions [batch, seq] or [seq].

        Without a cache: causal attention in sequence order over x itself; returns
        [batch, seq, d_model]. With a cache: block `layer`'s keys/values go through
        cache.attend; returns ([batch, seq, d_model], the updated cache).
        """
        c = self.config
        b, s, _ = x.shape
        q = self.wq(x).reshape(b, s, c.n_heads, c.head_dim)
        k = self.wk(x).reshape(b, s, c.n_kv_heads, c.head_dim)
        v = self.wv(x).reshape(b, s, c.n_kv_heads, c.head_dim)
        cos, sin = rope_angles(jnp.broadcast_to(positions, (b, s)), c.head_dim, c.rope_base)
        q_rotated = apply_rope(q, cos, sin, c.rope_layout)
        k = apply_rope(k, cos, sin, c.rope_layout)
        if cache is None:
            scaled = q_rotated * jnp.asarray(c.head_dim ** -0.5, q.dtype)
            grouped = scaled.reshape(b, s, c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim)
            mask = jnp.tril(jnp.ones((s, s), dtype=bool))[None]
            return self.wo(_attend(grouped, k, v, mask).reshape(b, s, -1))

        def rotate_query(at: jax.Array) -> jax.Array:
            cos_at, sin_at = rope_angles(at, c.head_dim, c.rope_base)
            return apply_rope(q, cos_at, sin_at, c.rope_layout)

        attended, cache = cache.attend(layer, q_rotated, k, v, rotate_query)
        return self.wo(attended.reshape(b, s, -1).astype(x.dtype)), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: w_down(silu(w_gate(x)) * w_up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.w_gate = _linear(config.d_model, config.ffn_dim, dtype, param_dtype, rngs)
        self.w_up = _linear(config.d_model, config.ffn_dim, dtype, param_dtype, rngs)
        self.w_down = _linear(config.ffn_dim, config.d_model, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(attn_norm(x)), then h + mlp(ffn_norm(h))."""

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype=param_dtype)
        self.attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: AttentionCache | None = None,
                 layer: int = 0) -> jax.Array | tuple[jax.Array, AttentionCache]:
        """x: [batch, seq, d_model], positions: [batch, seq] or [seq] -> [batch, seq, d_model];
        with a cache (see Attention), returns (that, the updated cache)."""
        if cache is None:
            h = x + self.attn(self.attn_norm(x), positions)
            return h + self.mlp(self.ffn_norm(h))
        attended, cache = self.attn(self.attn_norm(x), positions, cache, layer)
        h = x + attended
        return h + self.mlp(self.ffn_norm(h)), cache


class Llama(nnx.Module):
    """The decoder: embed -> layers -> final_norm -> lm_head (or the tied embedding; `embed` may be
    a block-quantized GgufEmbed, whose `attend` is then the head).

    The pieces run on their own too: embed_tokens(tokens), layers[i](x, positions), head(x).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        embed_init = nnx.initializers.normal(stddev=config.d_model ** -0.5)
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                               param_dtype=param_dtype, embedding_init=embed_init, rngs=rngs)
        self.layers = nnx.List([Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype=param_dtype)
        if not config.tied_embeddings:
            self.lm_head = _linear(config.d_model, config.vocab_size, dtype, param_dtype, rngs)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """tokens: [batch, seq] int -> [batch, seq, d_model] in the compute dtype."""
        return self.embed(tokens).astype(self.dtype)

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm and output projection: [batch, seq, d_model] -> logits [batch, seq, vocab]
        in f32."""
        h = self.final_norm(x)
        if self.config.tied_embeddings and not isinstance(self.embed, nnx.Embed):
            logits = self.embed.attend(h.astype(self.dtype))  # a block-quantized table (lowbit.nn.GgufEmbed)
        elif self.config.tied_embeddings:
            table = self.embed.embedding[...].astype(self.dtype)
            logits = jnp.einsum("bsd,vd->bsv", h, table, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens: [batch, seq] int32 -> logits [batch, seq, vocab] f32 (causal).

        positions: [batch, seq] or [seq] RoPE positions, default 0..seq-1.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        if positions is None:
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        return self.head(self.run_blocks(self.embed_tokens(tokens), positions))

    def run_blocks(self, x: jax.Array, positions: jax.Array, cache: AttentionCache | None = None
                   ) -> jax.Array | tuple[jax.Array, AttentionCache]:
        """Every block in turn on hidden states x: [batch, seq, d_model] at RoPE positions
        [batch, seq] or [seq]. Without a cache: causal, returns [batch, seq, d_model]; with one
        (block i is its layer i): returns (that, the updated cache)."""
        for layer, block in enumerate(self.layers):
            if cache is None:
                x = block(x, positions)
            else:
                x, cache = block(x, positions, cache, layer)
        return x if cache is None else (x, cache)

    @classmethod
    def from_weights(cls, config: LlamaConfig | Mapping[str, Any],
                     weights: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray], *,
                     dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Llama:
        """Builds a model from (name, array) pairs (or a mapping) consumed one at a time.

        Names: "embed" [vocab, d]; "layers.{i}.attn_norm"/"ffn_norm" [d]; "layers.{i}.wq"
        [d, n_heads*head_dim]; "wk"/"wv" [d, n_kv_heads*head_dim]; "wo" [n_heads*head_dim, d];
        "w_gate"/"w_up" [d, ffn]; "w_down" [ffn, d]; "final_norm" [d]; "lm_head" [d, vocab]
        (untied only). Linear weights are [in, out]. The model is first built abstractly, so
        each array is stored once, as it arrives.
        """
        if isinstance(config, Mapping):
            config = LlamaConfig.from_dict(config)
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype,
                                           param_dtype=param_dtype))
        if isinstance(weights, Mapping):
            weights = weights.items()
        table = model.weight_table()
        seen: set[str] = set()
        unknown: list[str] = []
        for name, array in weights:
            if name not in table:
                unknown.append(name)
                continue
            if name in seen:
                raise ValueError(f"weights: {name!r} was given twice")
            variable = table[name]
            expected = tuple(variable.get_value().shape)
            if tuple(np.shape(array)) != expected:
                raise ValueError(f"weights: {name!r} has shape {tuple(np.shape(array))}, "
                                 f"expected {expected}")
            variable.set_value(jnp.asarray(array, dtype=param_dtype))
            seen.add(name)
            del array
        missing = [name for name in table if name not in seen]
        if unknown or missing:
            raise ValueError(f"weights: unknown names {unknown}; missing names {missing}; "
                             f"expected names like {list(table)[:12]}")
        return model

    def weight_table(self) -> dict[str, nnx.Param]:
        """The parameters under the flat names that from_weights takes, in model order."""
        table: dict[str, nnx.Param] = {"embed": self.embed.embedding}
        for i, block in enumerate(self.layers):
            p = f"layers.{i}."
            table[p + "attn_norm"] = block.attn_norm.weight
            table[p + "wq"] = block.attn.wq.kernel
            table[p + "wk"] = block.attn.wk.kernel
            table[p + "wv"] = block.attn.wv.kernel
            table[p + "wo"] = block.attn.wo.kernel
            table[p + "ffn_norm"] = block.ffn_norm.weight
            table[p + "w_gate"] = block.mlp.w_gate.kernel
            table[p + "w_up"] = block.mlp.w_up.kernel
            table[p + "w_down"] = block.mlp.w_down.kernel
        table["final_norm"] = self.final_norm.weight
        if not self.config.tied_embeddings:
            table["lm_head"] = self.lm_head.kernel
        return table
