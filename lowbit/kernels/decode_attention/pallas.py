"""Pallas decode attention over a paged (optionally int8/int4-quantized) KV cache.

Grid (batch, kv head, split): each program walks its share of the sequence's pages through the
block table with an online softmax, dequantizing pages in registers; splits merge outside.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowbit.kernels.decode_attention.pages import QuantizedPagePool, dequantize_page_fields, kind_fields
from lowbit.kernels.dispatch import cdiv, is_pow2, next_pow2, round_up

TARGET_PROGRAMS = 264  # about two programs per streaming multiprocessor of an H100/H200
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """block_tokens: KV positions per inner step (whole pages; at least one page).

    num_splits: independent slices of the sequence per (batch, kv head), merged afterwards
    (flash-decoding); None picks enough to fill the GPU.
    """

    block_tokens: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if not isinstance(self.block_tokens, int) or not is_pow2(self.block_tokens) or self.block_tokens < 16:
            raise ValueError(f"block_tokens must be a power of two >= 16, got {self.block_tokens!r}")
        if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
            raise ValueError(f"num_splits must be None or a positive integer, got {self.num_splits!r}")


DEFAULT_CONFIG = DecodeAttentionConfig()


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    group: int  # query heads per kv head
    group_padded: int  # padded to a power of two >= 16 (Triton dot rows)
    pages_per_block: int
    table_width: int  # block-table columns after padding to whole blocks
    num_splits: int
    blocks_per_split: int
    num_warps: int
    num_stages: int


def plan_decode(batch: int, n_heads: int, n_kv: int, head_dim: int, page_size: int, max_pages: int,
                k_fields: int, v_fields: int, config: DecodeAttentionConfig, *, interpret: bool) -> DecodePlan:
    """Choose pages per step and sequence splits; check Triton's power-of-two tile rules on GPU."""
    group = n_heads // n_kv
    pages_per_block = max(1, config.block_tokens // page_size)
    block_tokens = pages_per_block * page_size
    if not interpret:
        if not is_pow2(page_size) or block_tokens < 16:
            raise ValueError(f"k_pages: the Triton kernel needs a power-of-two page_size, got {page_size}")
        for fields in {k_fields, v_fields}:
            if not is_pow2(head_dim // fields) or head_dim // fields < 16:
                raise ValueError(f"q: the Triton kernel needs head_dim / {fields} to be a power of two >= 16, "
                                 f"got head_dim {head_dim}")
    blocks = cdiv(max_pages, pages_per_block)
    splits = config.num_splits or cdiv(TARGET_PROGRAMS, batch * n_kv)
    splits = max(1, min(splits, blocks))
    per_split = cdiv(blocks, splits)
    splits = cdiv(blocks, per_split)
    return DecodePlan(group, max(16, next_pow2(group)), pages_per_block, round_up(max_pages, pages_per_block),
                      splits, per_split, config.num_warps, config.num_stages)


def _pool_parts(pages):
    """(kind or None, arrays to pass): float pages, or codes, scale (and zero) of a pool."""
    if isinstance(pages, QuantizedPagePool):
        parts = [pages.codes, pages.scale] + ([] if pages.zero is None else [pages.zero])
        return pages.kind, parts
    return None, [pages]


def _part_spec(array):
    """Pages, codes or a stat ([P, ps, Hkv, n_groups]) of one kv head: the kernel sees [P, ps, last]."""
    p, s, _, d = array.shape
    return pl.BlockSpec((p, s, None, d), lambda b, h, sp: (0, 0, h, 0))


def _load_fields(refs, kind, pages, block_tokens: int, dtype):
    """Load the pages `pages` ([pages_per_block] ids) of one kv head as fields [T, D/F] in dtype."""
    if kind is None:
        tile = refs[0][pages]
        return (tile.reshape(block_tokens, tile.shape[-1]).astype(dtype),)
    codes = refs[0][pages]
    codes = codes.reshape(block_tokens, codes.shape[-1])
    groups = refs[1].shape[-1]
    scale = refs[1][pages].reshape(block_tokens, groups)
    zero = refs[2][pages].reshape(block_tokens, groups) if len(refs) == 3 else None
    return tuple(f.astype(dtype) for f in dequantize_page_fields(codes, scale, zero, kind))


def _kernel(lengths_ref, tables_ref, q_ref, *refs, k_kind, n_k, v_kind, n_v, plan: DecodePlan,
            page_size: int, softmax_scale: float):
    k_refs, v_refs = refs[:n_k], refs[n_k:n_k + n_v]
    o_ref, m_ref, l_ref = refs[n_k + n_v:]
    length = lengths_ref[0]
    ppb = plan.pages_per_block
    block_tokens = ppb * page_size
    n_qf, n_vf = q_ref.shape[0], o_ref.shape[0]
    dtype = q_ref.dtype
    queries = [q_ref[f] for f in range(n_qf)]  # [Gp, D/Fk]
    first = pl.program_id(2) * plan.blocks_per_split
    last = jnp.minimum(first + plan.blocks_per_split, pl.cdiv(length, block_tokens))
    last = jnp.minimum(last, plan.table_width // ppb)

    def body(i, carry):
        m_prev, l_prev, accs = carry
        block = first + i
        pages = tables_ref[pl.ds(block * ppb, ppb)]
        keys = _load_fields(k_refs, k_kind, pages, block_tokens, dtype)
        logits = sum(
            jax.lax.dot_general(qf, kf, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                precision=jax.lax.Precision.HIGHEST)  # IEEE f32 in Triton, not TF32
            for qf, kf in zip(queries, keys)
        ) * softmax_scale  # [Gp, T]
        positions = block * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        logits = jnp.where(positions[None, :] < length, logits, MASK_VALUE)
        m_next = jnp.maximum(m_prev, logits.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        probs = jnp.exp(logits - m_next[:, None])
        l_next = correction * l_prev + probs.sum(axis=-1)
        values = _load_fields(v_refs, v_kind, pages, block_tokens, dtype)
        accs = tuple(
            correction[:, None] * acc + jnp.dot(probs.astype(dtype), vf, preferred_element_type=jnp.float32,
                                                precision=jax.lax.Precision.HIGHEST)
            for acc, vf in zip(accs, values)
        )
        return m_next, l_next, accs

    gp = plan.group_padded
    init = (
        jnp.full((gp,), MASK_VALUE, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        tuple(jnp.zeros((gp, o_ref.shape[-1]), jnp.float32) for _ in range(n_vf)),
    )
    m, l, accs = jax.lax.fori_loop(0, jnp.maximum(last - first, 0), body, init)
    for f in range(n_vf):
        o_ref[f] = accs[f]
    m_ref[...] = m
    l_ref[...] = l


def _split_fields(q, fields: int):
    """[..., D] -> [..., F, D/F] with field f holding elements f, f + F, ... (moved before the last two axes)."""
    *lead, g, d = q.shape
    q = q.reshape(*lead, g, d // fields, fields)
    return jnp.moveaxis(q, -1, -3)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "plan", "interpret"))
def decode_attention_pallas(q, k_pages, v_pages, block_tables, lengths, *, softmax_scale: float,
                            plan: DecodePlan, interpret: bool):
    """q: [B, H, D]; k_pages/v_pages: float [P, ps, Hkv, D] or QuantizedPagePool; block_tables int32
    [B, W] (entries clipped into [0, P)); lengths int32 [B] -> [B, H, D] in q's dtype."""
    b, n_heads, d = q.shape
    k_kind, k_parts = _pool_parts(k_pages)
    v_kind, v_parts = _pool_parts(v_pages)
    num_pages, page_size, n_kv = k_parts[0].shape[:3]
    kf, vf = kind_fields(k_kind), kind_fields(v_kind)
    g, gp = plan.group, plan.group_padded

    qg = q.reshape(b, n_kv, g, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    qf = _split_fields(qg, kf)  # [B, Hkv, Fk, Gp, D/Fk]
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1)
    tables = jnp.pad(tables, ((0, 0), (0, plan.table_width - tables.shape[1])))
    lengths2 = lengths.astype(jnp.int32).reshape(b, 1)

    splits = plan.num_splits
    in_specs = [
        pl.BlockSpec((None, 1), lambda i, h, s: (i, 0)),
        pl.BlockSpec((None, plan.table_width), lambda i, h, s: (i, 0)),
        pl.BlockSpec((None, None, kf, gp, d // kf), lambda i, h, s: (i, h, 0, 0, 0)),
    ]
    in_specs += [_part_spec(a) for a in k_parts]
    in_specs += [_part_spec(a) for a in v_parts]
    out_shape = [
        jax.ShapeDtypeStruct((b, n_kv, splits, vf, gp, d // vf), jnp.float32),
        jax.ShapeDtypeStruct((b, n_kv, splits, gp), jnp.float32),
        jax.ShapeDtypeStruct((b, n_kv, splits, gp), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, vf, gp, d // vf), lambda i, h, s: (i, h, s, 0, 0, 0)),
        pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
        pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
    ]
    kernel = functools.partial(
        _kernel, k_kind=k_kind, n_k=len(k_parts), v_kind=v_kind, n_v=len(v_parts), plan=plan,
        page_size=page_size, softmax_scale=softmax_scale,
    )
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, n_kv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        name="decode_attention",
    )(lengths2, tables, qf, *k_parts, *v_parts)

    # Merge the splits (each holds an unnormalized partial softmax with its own running max).
    m_all = m.max(axis=2, keepdims=True)
    weight = jnp.exp(m - m_all)  # [B, Hkv, S, Gp]
    denom = (weight * l).sum(axis=2)  # [B, Hkv, Gp]
    o = (weight[:, :, :, None, :, None] * o).sum(axis=2)  # [B, Hkv, Fv, Gp, D/Fv]
    o = o / jnp.where(denom == 0, 1.0, denom)[:, :, None, :, None]
    o = jnp.moveaxis(o, 2, -1).reshape(b, n_kv, gp, d)[:, :, :g]
    return o.reshape(b, n_heads, d).astype(q.dtype)
