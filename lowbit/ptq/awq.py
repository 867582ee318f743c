"""AWQ (arXiv 2306.00978): activation-aware per-input-channel scaling searched on block output
MSE and folded into the preceding norm or linear, then a per-group weight clipping search.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.core.quantize import group_length, quantize
from lowbit.core.spec import QuantSpec
from lowbit.ptq.driver import (ABS_SUM, COUNT, INPUT_GROUPS, LINEAR_NAMES, BlockCalibration,
                               check_batch_size, check_calibration, coprime_stride, merge_blocks,
                               module_at, run_sequential, strided_sample)
from lowbit.ptq.result import PTQResult, QuantizedLinear, weight_errors
from lowbit.ptq.rtn import parse_weight_spec
from lowbit.nn.packed_layer import packed_layer
from lowbit.ptq.targets import check_runtime, install_packed, replace_module

AWQ_KINDS = ("int", "nf4", "fp4")
AWQ_GRID = tuple(i / 20 for i in range(20))  # alpha = 0, 0.05, ..., 0.95
CLIP_RATIOS = tuple(float(r) for r in np.linspace(1.0, 0.5, 20))  # of each group's max |w|
NO_CLIP = ("attn.wq", "attn.wk")  # q/k errors pass through softmax; not clipped (as llm-awq)
_MIN_SCALE = 1e-4

# The scaled groups: (input group, preceding op to fold 1/s into, how the loss is measured).
# "attention": MSE of the attention output (q/k/v scaled); "mlp": of the MLP output;
# "linear": of the scaled linear's own output.
_SEARCHES = (
    ("attn_in", "attn_norm", "attention"),
    ("attn_out", "attn.wv", "linear"),
    ("mlp_in", "ffn_norm", "mlp"),
    ("mlp_hidden", "mlp.w_up", "linear"),
)


def check_awq_spec(spec: QuantSpec | str) -> QuantSpec:
    """The spec if AWQ can run it: int, nf4 or fp4 with tensor, channel or group granularity."""
    spec = parse_weight_spec(spec)
    if spec.kind not in AWQ_KINDS:
        raise ValueError(f"AWQ supports weight kinds {AWQ_KINDS}, got {spec.kind!r} "
                         f"(spec {str(spec)!r}); its clipping search needs a max-based grid")
    return spec


def awq_scales(mean_abs, alpha) -> jax.Array:
    """s = mean|x|^alpha per input channel (at least 1e-4), divided by sqrt(max(s) * min(s))."""
    s = jnp.maximum(jnp.asarray(mean_abs, jnp.float32) ** alpha, _MIN_SCALE)
    return s / jnp.sqrt(s.max() * s.min())


def fake_quantize_scaled(weight, scales, spec: QuantSpec) -> jax.Array:
    """Q(diag(s) W) / s for a kernel [in, out] and input-channel scales s: [in]."""
    s = scales[:, None]
    return quantize(weight * s, spec, axis=0).dequantize() / s


def _run(module, x, kind: str):
    if kind == "attention":
        return module(x, jnp.arange(x.shape[1], dtype=jnp.int32)[None, :])
    return module(x)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _module_output(graphdef, state, kind, x):
    return _run(nnx.merge(graphdef, state), x, kind)


@functools.partial(jax.jit, static_argnames=("graphdef", "names", "spec", "kind"))
def _scale_losses(state, x, reference, mean_abs, alphas, *, graphdef, names, spec, kind):
    """Output MSE for each alpha when the named linears get Q(diag(s) W) / s."""

    def loss(alpha):
        # Fresh Variables at this trace level (the closed-over ones belong to the outer trace).
        module = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))
        s = awq_scales(mean_abs, alpha)
        for name in names:
            linear = module_at(module, name) if name else module
            linear.kernel.set_value(fake_quantize_scaled(linear.kernel[...], s, spec))
        out = _run(module, x, kind)
        return jnp.mean((out.astype(jnp.float32) - reference) ** 2)

    return jax.lax.map(loss, alphas)


def search_scales(module, kind: str, names: tuple[str, ...], x, mean_abs, spec: QuantSpec,
                  grid=AWQ_GRID) -> tuple[float, jax.Array, np.ndarray]:
    """Grid search of alpha for the linears `names` inside `module` (an empty name: the module
    is the linear). x: the module's input ([batch, seq, d] for kind "attention", else
    [tokens, features]); mean_abs: [in] mean |x| per input channel over the calibration data.

    Returns (best alpha, its scales [in], the losses over the grid). Ties keep the first, so
    alpha = 0 (plain RTN) wins unless another alpha is strictly better.
    """
    graphdef, state = nnx.split(module)
    reference = _module_output(graphdef, state, kind, x).astype(jnp.float32)
    alphas = jnp.asarray(grid, jnp.float32)
    losses = np.asarray(_scale_losses(state, x, reference, jnp.asarray(mean_abs), alphas,
                                      graphdef=graphdef, names=tuple(names), spec=spec,
                                      kind=kind), np.float64)
    best = int(np.argmin(losses))
    return float(grid[best]), awq_scales(mean_abs, grid[best]), losses


def _expand_rows(stat, gs: int, n_in: int):
    return jnp.repeat(stat, gs, axis=0)[:n_in]


@functools.partial(jax.jit, static_argnames=("spec", "ratios"))
def _clip_search(weight, x, *, spec: QuantSpec, ratios: tuple[float, ...]):
    n_in, n_out = weight.shape
    gs = group_length(spec, n_in)
    groups = -(-n_in // gs)
    pad = groups * gs - n_in
    grouped_w = jnp.pad(weight, ((0, pad), (0, 0))).reshape(groups, gs, n_out)
    grouped_x = jnp.pad(x, ((0, 0), (0, pad))).reshape(x.shape[0], groups, gs)
    reference = jnp.einsum("tgk,gko->tgo", grouped_x, grouped_w)
    amax = jnp.abs(grouped_w).max(axis=1)

    def error(ratio):
        limit = _expand_rows(amax * ratio, gs, n_in)
        clipped = quantize(jnp.clip(weight, -limit, limit), spec, axis=0).dequantize()
        grouped_q = jnp.pad(clipped, ((0, pad), (0, 0))).reshape(groups, gs, n_out)
        out = jnp.einsum("tgk,gko->tgo", grouped_x, grouped_q)
        return jnp.mean((out - reference) ** 2, axis=0)

    errors = jax.lax.map(error, jnp.asarray(ratios, jnp.float32))
    best = jnp.argmin(errors, axis=0)
    return amax * jnp.asarray(ratios, jnp.float32)[best]


def search_clip(weight, x, spec: QuantSpec, ratios=CLIP_RATIOS) -> jax.Array:
    """Per group and output column, the clipping limit m = r * max|w| (r from `ratios`) that
    minimizes the MSE of that group's contribution x_g W_g to the output.

    weight: [in, out]; x: [tokens, in]. Returns m: [groups, out].
    """
    return _clip_search(jnp.asarray(weight, jnp.float32), jnp.asarray(x, jnp.float32),
                        spec=spec, ratios=tuple(float(r) for r in ratios))


def clip_weight(weight, limit, spec: QuantSpec) -> jax.Array:
    """weight [in, out] clipped to [-m, m] with m: [groups, out] from search_clip."""
    n_in = weight.shape[0]
    bound = _expand_rows(limit, group_length(spec, n_in), n_in)
    return jnp.clip(weight, -bound, bound)


def _scale_rows(linear, s) -> None:
    linear.kernel.set_value(linear.kernel[...] * s[:, None].astype(linear.kernel[...].dtype))


def _fold_inverse(previous, s) -> None:
    """Divides the preceding op's output channels by s (an RMSNorm weight or a kernel's columns)."""
    if hasattr(previous, "kernel"):
        kernel = previous.kernel[...]
        previous.kernel.set_value(kernel / s[None, :].astype(kernel.dtype))
    else:
        previous.weight.set_value(previous.weight[...] / s.astype(previous.weight[...].dtype))


def _subsample(rows, count: int):
    stride = max(1, rows.shape[0] // count)
    return rows[::stride][:count]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_grid(values, name: str, low: float, high: float) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if not values or any(not low <= v <= high for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of numbers in [{low}, {high}], "
                         f"got {values!r}")
    return values


def awq_quantize(model, calibration, spec: QuantSpec | str, *, grid=AWQ_GRID, clip: bool = True,
                 clip_ratios=CLIP_RATIOS, search_sequences: int = 4, search_tokens: int = 4096,
                 clip_tokens: int = 512, batch_size: int = 8, progress: bool = True,
                 runtime: str = "packed") -> PTQResult:
    """AWQ every block linear of a Llama model in place, block after block.

    Per block: mean|x| per input channel over all calibration tokens; alpha searched over
    `grid` for q/k/v (loss: attention output MSE on the first `search_sequences` calibration
    sequences), v->o (o output; only when v's output width equals o's input, i.e. no GQA),
    gate/up (MLP output) and up->down (down output), these three on `search_tokens` tokens
    taken with a stride coprime with the sequence length (every position is sampled) from all
    calibration tokens. The scales are folded into the RMSNorms and into
    v / up, then (if clip) each linear but q/k gets a per-group clipping search on
    `clip_tokens` tokens, then everything is quantized: each linear becomes a packed layer
    (runtime "packed", or "dequant" for fake-quant float execution).
    """
    spec = check_awq_spec(spec)
    check_runtime(runtime)
    grid = _check_grid(grid, "grid", 0.0, 1.0)
    clip_ratios = _check_grid(clip_ratios, "clip_ratios", 1e-3, 1.0)
    for name, value in (("search_sequences", search_sequences), ("search_tokens", search_tokens),
                        ("clip_tokens", clip_tokens)):
        _check_positive_int(name, value)
    check_batch_size(batch_size)
    tokens = check_calibration(calibration, model.config)
    start = time.perf_counter()

    def process(context: BlockCalibration) -> tuple[dict[str, QuantizedLinear], dict]:
        block = context.block
        stride = coprime_stride(context.tokens, search_tokens, context.inputs.shape[1])
        sample = strided_sample(stride)
        stats = context.statistics({g: (ABS_SUM, COUNT, sample) for g in INPUT_GROUPS})
        mean_abs = {g: stats[g]["abs_sum"] / stats[g]["count"] for g in INPUT_GROUPS}
        rows = {g: stats[g][sample.name] for g in INPUT_GROUPS}
        original = {n: jnp.asarray(module_at(block, n).kernel[...], jnp.float32)
                    for n in LINEAR_NAMES}
        in_scale = {n: None for n in LINEAR_NAMES}
        out_scale = {n: None for n in LINEAR_NAMES}
        report: dict[str, Any] = {"block": context.index}
        chosen: dict[str, jax.Array] = {}
        for group, previous, kind in _SEARCHES:
            names = INPUT_GROUPS[group]
            if group == "attn_out":
                v_out = module_at(block, "attn.wv").kernel.shape[1]
                if v_out != module_at(block, "attn.wo").kernel.shape[0]:
                    report["attn_out"] = {"skipped": f"v output {v_out} != o input "
                                          f"{module_at(block, 'attn.wo').kernel.shape[0]} (GQA)"}
                    continue
            if kind == "attention":
                x = block.attn_norm(jnp.asarray(context.inputs[:search_sequences]))
                module, local = block.attn, tuple(n.split(".", 1)[1] for n in names)
            elif kind == "mlp":
                x, module, local = rows[group], block.mlp, tuple(n.split(".", 1)[1] for n in names)
            else:
                x, module, local = rows[group], module_at(block, names[0]), ("",)
            alpha, s, losses = search_scales(module, kind, local, x, mean_abs[group], spec, grid)
            chosen[group] = s
            report[group] = {"alpha": alpha, "loss": float(losses.min()),
                             **({"rtn_loss": float(losses[grid.index(0.0)])}
                                if 0.0 in grid else {})}
        for group, previous, _ in _SEARCHES:
            if group not in chosen:
                continue
            s = chosen[group]
            _fold_inverse(module_at(block, previous), s)
            if previous in in_scale:
                out_scale[previous] = s
            for name in INPUT_GROUPS[group]:
                _scale_rows(module_at(block, name), s)
                in_scale[name] = s
        out = {}
        for name in LINEAR_NAMES:
            linear = module_at(block, name)
            kernel = jnp.asarray(linear.kernel[...], jnp.float32)
            group = next(g for g, names in INPUT_GROUPS.items() if name in names)
            x_orig = _subsample(rows[group], clip_tokens)
            x_scaled = x_orig if in_scale[name] is None else x_orig / in_scale[name][None, :]
            entry: dict[str, Any] = {}
            if clip and name not in NO_CLIP:
                limit = search_clip(kernel, x_scaled, spec, clip_ratios)
                kernel_to_quantize = clip_weight(kernel, limit, spec)
                entry["clipped"] = True
            else:
                kernel_to_quantize = kernel
            q = quantize(kernel_to_quantize, spec, axis=0)
            dequantized = q.dequantize()
            install_packed(block, name, q, runtime)
            effective = dequantized
            if in_scale[name] is not None:
                effective = effective / in_scale[name][:, None]
            if out_scale[name] is not None:
                effective = effective * out_scale[name][None, :]
            errors = weight_errors(original[name], effective)
            reference = x_orig @ original[name]
            delta = x_orig @ effective - reference
            errors["output_rel_error"] = float(jnp.sum(delta ** 2) /
                                               jnp.maximum(jnp.sum(reference ** 2), 1e-30))
            out[f"layers.{context.index}.{name}"] = QuantizedLinear(
                weight=q, report={**errors, **entry})
        return out, report

    linears, block_reports = merge_blocks(run_sequential(model, tokens, process,
                                                         batch_size=batch_size,
                                                         progress=progress, desc="awq"))
    settings = {"weights": str(spec), "grid": list(grid), "clip": clip,
                "clip_ratios": list(clip_ratios), "search_sequences": search_sequences,
                "search_tokens": search_tokens, "clip_tokens": clip_tokens,
                "calibration_shape": list(tokens.shape)}
    return PTQResult(method="awq", linears=linears, seconds=time.perf_counter() - start,
                     settings=settings, block_reports=block_reports)


# ---- AWQ on any NNX model: the model-agnostic driver and scale groups ----------------------


@functools.partial(jax.jit, static_argnames=("specs",))
def _group_losses(x, matrices, mean_abs, alphas, *, specs):
    """For each alpha, sum over the group's layers of ||x W - (x / s) Q(diag(s) W)||^2 / size."""
    references = [x @ w for w in matrices]
    total = sum(r.size for r in references)

    def loss(alpha):
        s = awq_scales(mean_abs, alpha)
        return sum(jnp.sum((x @ fake_quantize_scaled(w, s, spec) - r) ** 2)
                   for w, r, spec in zip(matrices, references, specs)) / total

    return jax.lax.map(loss, alphas)


def awq_apply(model, targets, calibration, *, grid=AWQ_GRID, clip: bool = True,
              clip_ratios=CLIP_RATIOS, search_tokens: int = 4096, clip_tokens: int = 512,
              scale_groups=None, runtime: str = "packed", blocks=None, progress: bool = True
              ) -> tuple[dict[str, QuantizedLinear], list[dict]]:
    """AWQ of every target (lowbit.ptq.targets.Target, each with its own spec) of any NNX model,
    block after block (lowbit.ptq.driver.run_blocks), in place.

    Per block: mean |x| per input feature of each layer's rows (Contraction.rows) over all
    calibration batches and a strided sample of about `search_tokens` rows (stride coprime with
    every batch's row count); the targets are grouped by shared input (lowbit.ptq.scaling:
    declared `scale_groups`, the model's `ptq_scale_groups()`, the Llama's, else the tensors the
    layers were fed). Per group, alpha is searched over `grid` on the MSE of the group's layer
    outputs (s = mean|x|^alpha, normalized); 1/s folds into the group's declared norm or layer
    or the norm that produced a derived group's input (checked to keep the block's function),
    else stays in the packed layers as an input scale.
    Then (if clip) a per-group clipping search on `clip_tokens` rows (except a group's no_clip
    members) and quantization to packed layers. Returns (path -> QuantizedLinear, block reports).
    """
    from lowbit.ptq.driver import (ABS_SUM, BATCH_COUNTS, COUNT, BlockInputs, rows_stride,
                                   run_blocks)
    from lowbit.ptq.scaling import apply_folds, declared_groups, resolve_groups

    for target in targets:
        check_awq_spec(target.spec)
    check_runtime(runtime)
    grid = _check_grid(grid, "grid", 0.0, 1.0)
    clip_ratios = _check_grid(clip_ratios, "clip_ratios", 1e-3, 1.0)
    for name, value in (("search_tokens", search_tokens), ("clip_tokens", clip_tokens)):
        _check_positive_int(name, value)
    declared = declared_groups(model, scale_groups)

    def process(context: BlockInputs):
        stats = context.statistics((ABS_SUM, COUNT, BATCH_COUNTS))
        per = {}
        for local in context.targets:
            entry = stats[local]
            counts = np.asarray(entry["batch_counts"])
            stride = rows_stride(int(counts.sum()), search_tokens, counts)
            per[local] = (strided_sample(stride),)
        samples = context.statistics(per)
        groups = resolve_groups(context, declared, stats)
        report: dict[str, Any] = {"block": context.index, "groups": []}
        matrices = {local: t.contraction.matrix(jnp.asarray(
            module_at(context.block, local).kernel[...], jnp.float32))
            for local, t in context.targets.items()}
        scales = {}
        for index, group in enumerate(groups):
            first = group.members[0]
            x = jnp.asarray(samples[first][per[first][0].name])
            mean_abs = stats[first]["abs_sum"] / stats[first]["count"]
            specs = tuple(context.targets[m].spec for m in group.members)
            losses = np.asarray(_group_losses(x, tuple(matrices[m] for m in group.members),
                                              mean_abs, jnp.asarray(grid, jnp.float32),
                                              specs=specs), np.float64)
            best = int(np.argmin(losses))
            scales[index] = awq_scales(mean_abs, grid[best])
            report["groups"].append({"members": list(group.members), "fold": group.fold,
                                     "alpha": grid[best], "loss": float(losses[best]),
                                     **({"rtn_loss": float(losses[grid.index(0.0)])}
                                        if 0.0 in grid else {})})
        out_scaled = apply_folds(context, groups, scales)
        for entry, group in zip(report["groups"], groups):
            entry["fold"] = group.fold  # a derived fold that changed the function was dropped
        out = {}
        for index, group in enumerate(groups):
            s = scales[index]
            first = group.members[0]
            x_orig = _subsample(jnp.asarray(samples[first][per[first][0].name]), clip_tokens)
            for local in group.members:
                target = context.targets[local]
                module = module_at(context.block, local)
                current = target.contraction.matrix(jnp.asarray(module.kernel[...], jnp.float32))
                scaled = current if group.fold is not None else current * s[:, None]
                entry: dict[str, Any] = {"alpha": report["groups"][index]["alpha"]}
                if clip and local not in group.no_clip:
                    limit = search_clip(scaled, x_orig / s[None, :], target.spec, clip_ratios)
                    scaled = clip_weight(scaled, limit, target.spec)
                    entry["clipped"] = True
                q = quantize(scaled, target.spec, axis=0)
                layer = packed_layer(module, q, runtime=runtime,
                                     input_scale=None if group.fold is not None else 1.0 / s)
                replace_module(context.block, local, layer)
                effective = q.dequantize() / s[:, None]
                if local in out_scaled:
                    effective = effective * out_scaled[local][None, :]
                original = matrices[local]
                errors = weight_errors(original, effective)
                reference = x_orig @ original
                delta = x_orig @ effective - reference
                errors["output_rel_error"] = float(jnp.sum(delta ** 2) /
                                                   jnp.maximum(jnp.sum(reference ** 2), 1e-30))
                out[target.path] = QuantizedLinear(weight=q, report={**errors, **entry})
        return out, report

    results = run_blocks(model, targets, calibration, process, blocks=blocks, progress=progress,
                         desc="awq")
    return merge_blocks(results)
