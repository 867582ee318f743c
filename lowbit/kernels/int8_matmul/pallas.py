"""Pallas W8A8 kernel: int8 tiles multiplied with int32 accumulation, rescaled once at the end."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowbit.kernels.dispatch import (
    cdiv,
    is_pow2,
    largest_divisor_at_most,
    largest_pow2_divisor,
    next_pow2,
    pad_to,
    round_up,
)

TARGET_PROGRAMS = 264  # about two programs per streaming multiprocessor of an H100/H200


@dataclasses.dataclass(frozen=True)
class Int8MatmulConfig:
    """Tile sizes for one regime; split_k partial int32 sums are added outside (None: auto)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or not is_pow2(value) or value < 16:
                raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles), got {value!r}")
        if self.block_k < 32:
            raise ValueError(f"block_k must be >= 32 for int8 tensor-core dots, got {self.block_k}")
        if self.split_k is not None and (not isinstance(self.split_k, int) or self.split_k < 1):
            raise ValueError(f"split_k must be None or a positive integer, got {self.split_k!r}")


DECODE_CONFIG = Int8MatmulConfig(block_m=16, block_n=64, block_k=256, split_k=None, num_warps=4, num_stages=3)
PREFILL_CONFIG = Int8MatmulConfig(block_m=64, block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=3)


def select_config(m: int) -> Int8MatmulConfig:
    """Decode tiles for M <= 16 tokens, prefill tiles above."""
    return DECODE_CONFIG if m <= 16 else PREFILL_CONFIG


@dataclasses.dataclass(frozen=True)
class TilePlan:
    block_m: int
    block_n: int
    block_k: int
    m_padded: int
    n_padded: int
    k_padded: int
    split_k: int
    tiles_per_split: int
    num_warps: int
    num_stages: int


def plan_tiles(m: int, k: int, n: int, config: Int8MatmulConfig) -> TilePlan:
    """Tiles for one call. block_k and block_n divide K and N when a power of two >= the Triton
    minimum does (SmolLM2's K = 576 takes 64), so the weight is passed as it is; only other shapes
    pay for a padded copy of the weight."""
    block_m = min(config.block_m, max(16, next_pow2(m)))
    block_n = fitting_tile(n, config.block_n, 16)
    block_k = fitting_tile(k, config.block_k, 32)
    m_padded, n_padded, k_padded = round_up(m, block_m), round_up(n, block_n), round_up(k, block_k)
    k_tiles = k_padded // block_k
    if config.split_k is None:
        mn_tiles = (m_padded // block_m) * (n_padded // block_n)
        split_k = largest_divisor_at_most(k_tiles, cdiv(TARGET_PROGRAMS, mn_tiles))
    else:
        split_k = largest_divisor_at_most(k_tiles, config.split_k)
    return TilePlan(block_m, block_n, block_k, m_padded, n_padded, k_padded, split_k, k_tiles // split_k,
                    config.num_warps, config.num_stages)


def fitting_tile(size: int, cap: int, minimum: int) -> int:
    """A power-of-two tile <= cap for an axis of `size`: one that divides it when one >= minimum does."""
    tile = min(cap, max(minimum, next_pow2(size)))
    divisor = largest_pow2_divisor(size)
    return min(tile, divisor) if divisor >= minimum else tile


def _kernel(x_ref, w_ref, xs_ref, ws_ref, out_ref, *, plan: TilePlan):
    first_tile = pl.program_id(2) * plan.tiles_per_split
    bk = plan.block_k

    def body(t, acc):
        cols = pl.ds((first_tile + t) * bk, bk)
        return acc + jnp.dot(x_ref[:, cols], w_ref[cols, :], preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, plan.tiles_per_split, body, jnp.zeros((plan.block_m, plan.block_n), jnp.int32))
    if plan.split_k == 1:
        y = acc.astype(jnp.float32) * xs_ref[...].astype(jnp.float32) * ws_ref[...].astype(jnp.float32)
        out_ref[...] = y.astype(out_ref.dtype)
    else:
        out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("plan", "out_dtype", "interpret"))
def int8_matmul_pallas(x_codes, x_scale, w_codes, w_scale, *, plan: TilePlan, out_dtype, interpret: bool):
    """x_codes int8 [M, K], x_scale [M, 1], w_codes int8 [K, N], w_scale [1, N] -> [M, N] out_dtype."""
    m, k = x_codes.shape
    n = w_codes.shape[1]
    mp, np_, kp = plan.m_padded, plan.n_padded, plan.k_padded
    x_codes = pad_to(x_codes, (mp, kp))
    w_codes = pad_to(w_codes, (kp, np_))  # a no-op when the tiles divide K and N
    x_scale = pad_to(x_scale.astype(jnp.float32), (mp, 1))
    w_scale = pad_to(w_scale.astype(jnp.float32), (1, np_))
    bm, bn = plan.block_m, plan.block_n
    in_specs = [
        pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)),
        pl.BlockSpec((kp, bn), lambda i, j, s: (0, j)),
        pl.BlockSpec((bm, 1), lambda i, j, s: (i, 0)),
        pl.BlockSpec((1, bn), lambda i, j, s: (0, j)),
    ]
    if plan.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((plan.split_k, mp, np_), jnp.int32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        functools.partial(_kernel, plan=plan),
        grid=(mp // bm, np_ // bn, plan.split_k),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        name="int8_matmul",
    )(x_codes, w_codes, x_scale, w_scale)
    if plan.split_k > 1:
        out = (out.sum(axis=0).astype(jnp.float32) * x_scale * w_scale).astype(out_dtype)
    return out[:m, :n]
