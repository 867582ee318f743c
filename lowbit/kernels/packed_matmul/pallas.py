"""Pallas kernel for y = x @ dequant(W) with W packed 2, 4 or 8 codes per byte along K.

W is unpacked and dequantized tile by tile in registers; the float W never exists in HBM.
"""

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
from lowbit.kernels.packed_matmul.reference import WeightFormat, dequantize_codes, split_fields, unpack_field

# Programs to aim for when splitting K (about two per streaming multiprocessor of an H100/H200).
TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class PackedMatmulConfig:
    """Tile sizes for one regime. block_k counts logical K rows (block_k / codes-per-byte bytes).

    split_k: K is cut into this many independent partial sums (added outside the kernel), to
    fill the GPU when M and N give few tiles; None picks it from the shape.
    """

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
        if self.split_k is not None and (not isinstance(self.split_k, int) or self.split_k < 1):
            raise ValueError(f"split_k must be None or a positive integer, got {self.split_k!r}")


DECODE_CONFIG = PackedMatmulConfig(block_m=16, block_n=64, block_k=256, split_k=None, num_warps=4, num_stages=3)
PREFILL_CONFIG = PackedMatmulConfig(block_m=64, block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=3)


def select_config(m: int) -> PackedMatmulConfig:
    """Decode tiles for M <= 16 rows of activations, prefill tiles above."""
    return DECODE_CONFIG if m <= 16 else PREFILL_CONFIG


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Concrete tiling of one call (static under jit)."""

    block_m: int
    block_n: int
    block_k: int  # logical K rows per tile
    m_padded: int
    n_padded: int
    k_padded: int
    split_k: int
    tiles_per_split: int
    groups_per_tile: int  # > 1: the tile spans several groups; 1: inside one group (or channel)
    num_warps: int
    num_stages: int


def plan_tiles(m: int, k: int, n: int, fmt: WeightFormat, config: PackedMatmulConfig, *, interpret: bool) -> TilePlan:
    """Pick tiles so that a K tile covers whole groups or lies inside one, and pad to tiles.

    block_k and block_n divide K and N when a power of two >= the Triton minimum does (SmolLM2's
    K = 576 takes 64), so the packed weight and its scales are passed as they are; only other
    shapes pay for a padded copy.
    """
    if fmt.levels is not None:
        raise ValueError("w: code-book formats (nf4/fp4) are not supported by the Pallas kernel (use impl='xla')")
    fields = fmt.fields
    min_k = 16 * fields  # Triton dots need >= 16 packed rows
    block_k = max(config.block_k, min_k)
    block_k = min(block_k, max(min_k, next_pow2(k)))
    if largest_pow2_divisor(k) >= min_k:
        block_k = min(block_k, largest_pow2_divisor(k))
    gs = fmt.group_size
    if gs is not None:
        if gs % fields:
            raise ValueError(
                f"w: group_size {gs} must be a multiple of the {fields} codes per byte of the "
                f"{fmt.bits}-bit format for the Pallas kernel (use impl='xla')"
            )
        if k % gs:
            raise ValueError(f"w: group_size {gs} does not divide K={k}; the Pallas kernel needs whole groups "
                             "(use impl='xla' or, on CPU, 'native')")
        if not is_pow2(gs):  # tiles inside one group; pow2 groups divide or are divided by block_k
            block_k = min(block_k, largest_pow2_divisor(gs))
        if block_k < min_k and not interpret:
            raise ValueError(
                f"w: group_size {gs} allows K tiles of only {block_k} rows ({block_k // fields} packed rows); "
                "the Triton kernel needs >= 16 packed rows per tile: use a power-of-two group size"
            )
    rows = cdiv(k, fields)
    k_padded = round_up(rows * fields, block_k)
    groups_per_tile = block_k // gs if gs is not None and block_k > gs else 1
    block_m = min(config.block_m, max(16, next_pow2(m)))
    block_n = min(config.block_n, max(16, next_pow2(n)))
    if largest_pow2_divisor(n) >= 16:
        block_n = min(block_n, largest_pow2_divisor(n))
    m_padded, n_padded = round_up(m, block_m), round_up(n, block_n)
    k_tiles = k_padded // block_k
    if config.split_k is None:
        mn_tiles = (m_padded // block_m) * (n_padded // block_n)
        split_k = largest_divisor_at_most(k_tiles, cdiv(TARGET_PROGRAMS, mn_tiles))
    else:
        split_k = largest_divisor_at_most(k_tiles, config.split_k)
    return TilePlan(block_m, block_n, block_k, m_padded, n_padded, k_padded, split_k, k_tiles // split_k,
                    groups_per_tile, config.num_warps, config.num_stages)


def _tile_stat(ref, kt, fmt: WeightFormat, plan: TilePlan):
    """Scale (or zero) rows for K tile `kt`: [packed rows, block_n] or [1, block_n], f32."""
    if fmt.group_size is None:
        return ref[pl.ds(0, 1), :].astype(jnp.float32)
    if plan.groups_per_tile == 1:
        group = kt * plan.block_k // fmt.group_size
        return ref[pl.ds(group, 1), :].astype(jnp.float32)
    groups = plan.groups_per_tile
    rows_per_group = fmt.group_size // fmt.fields
    stat = ref[pl.ds(kt * groups, groups), :].astype(jnp.float32)
    stat = jnp.broadcast_to(stat[:, None, :], (groups, rows_per_group, plan.block_n))
    return stat.reshape(groups * rows_per_group, plan.block_n)


def _kernel(x_ref, w_ref, scale_ref, *refs, fmt: WeightFormat, plan: TilePlan):
    zero_ref = refs[0] if fmt.asymmetric else None
    out_ref = refs[-1]
    packed_rows = plan.block_k // fmt.fields
    first_tile = pl.program_id(2) * plan.tiles_per_split

    def body(t, acc):
        kt = first_tile + t
        rows = pl.ds(kt * packed_rows, packed_rows)
        packed = w_ref[rows, :]  # uint8 [packed_rows, block_n]
        scale = _tile_stat(scale_ref, kt, fmt, plan)
        zero = None if zero_ref is None else _tile_stat(zero_ref, kt, fmt, plan)
        for f in range(fmt.fields):
            x_f = x_ref[f, :, rows]  # [block_m, packed_rows]
            w_f = dequantize_codes(unpack_field(packed, f, fmt.bits), fmt, scale, zero)
            # HIGHEST: Triton lowers an f32 dot to IEEE f32 (the default would be TF32, ~1e-3 error)
            acc = acc + jnp.dot(x_f, w_f.astype(x_f.dtype), preferred_element_type=jnp.float32,
                                precision=jax.lax.Precision.HIGHEST)
        return acc

    acc = jax.lax.fori_loop(0, plan.tiles_per_split, body, jnp.zeros((plan.block_m, plan.block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "plan", "interpret"))
def packed_matmul_pallas(x, data, scale, zero, *, fmt: WeightFormat, plan: TilePlan, interpret: bool):
    """x: [M, K]; data: uint8 [ceil(K/F), N]; scale/zero: [groups or 1, N] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = data.shape[1]
    fields = fmt.fields
    rows_padded = plan.k_padded // fields
    x = pad_to(x, (plan.m_padded, k))
    xf = split_fields(x, fields, rows_padded)  # [F, Mp, Kp/F]
    data = pad_to(data, (rows_padded, plan.n_padded))  # a no-op when the tiles divide K and N
    scale = jnp.broadcast_to(scale, (scale.shape[0], n))
    stat_rows = plan.k_padded // fmt.group_size if fmt.group_size else 1
    stats = [scale] if zero is None else [scale, jnp.broadcast_to(zero, (zero.shape[0], n))]
    stats = [pad_to(s, (stat_rows, plan.n_padded)) for s in stats]

    bm, bn = plan.block_m, plan.block_n
    in_specs = [
        pl.BlockSpec((fields, bm, rows_padded), lambda i, j, s: (0, i, 0)),
        pl.BlockSpec((rows_padded, bn), lambda i, j, s: (0, j)),
    ] + [pl.BlockSpec((stat_rows, bn), lambda i, j, s: (0, j)) for _ in stats]
    if plan.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((plan.m_padded, plan.n_padded), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((plan.split_k, plan.m_padded, plan.n_padded), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        functools.partial(_kernel, fmt=fmt, plan=plan),
        grid=(plan.m_padded // bm, plan.n_padded // bn, plan.split_k),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        name=f"packed_matmul_{fmt.bits}bit",
    )(xf, data, *stats)
    if plan.split_k > 1:
        out = out.sum(axis=0)
    return out[:m, :n].astype(x.dtype)
