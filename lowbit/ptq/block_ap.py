"""Block-wise reconstruction with gradients (EfficientQAT's Block-AP, OmniQuant's learnable weight
clipping): each block's weights, scales or clip factors are trained through the straight-through
estimator so that the quantized block reproduces the float block, then frozen to packed codes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from lowbit.core.quantize import SCALE_JNP_DTYPES, QArray, expand_groups, group_length, quantize, round_to_ste
from lowbit.core.spec import QuantSpec
from lowbit.files import atomic_path, open_stamped_workdir
from lowbit.ptq.driver import COUNT, XTX, BlockInputs, llama_block_inputs, run_blocks
from lowbit.ptq.result import PTQResult, QuantizedLinear, weight_errors
from lowbit.ptq.rtn import parse_weight_spec
from lowbit.ptq.targets import check_runtime, install_packed, module_at

LEARN_MODES = ("weights+scales", "scales", "clip", "weights+clip")
INITS = ("rtn", "gptq")
CLIP_INIT = 4.0  # OmniQuant's initial clip logit: sigmoid(4) = 0.982 of each group's range


def check_block_ap_spec(spec: QuantSpec | str) -> QuantSpec:
    """The spec if Block-AP can train it: int (sym or asym) with tensor, channel or group
    granularity along the input axis and plain scales."""
    spec = parse_weight_spec(spec)
    if spec.kind != "int":
        raise ValueError(f"Block-AP trains int grids only, got kind {spec.kind!r} (spec "
                         f"{str(spec)!r}); use rtn or gptq for the other kinds")
    if spec.double_quant or spec.clip is not None:
        raise ValueError(f"Block-AP needs plain scales without a fixed clip ratio, got spec "
                         f"{str(spec)!r}")
    return spec


def _check_positive(name: str, value, kind=float) -> None:
    ok = (isinstance(value, int) if kind is int else isinstance(value, (int, float)))
    if isinstance(value, bool) or not ok or not value > 0 or not np.isfinite(value):
        raise ValueError(f"{name} must be a positive {'integer' if kind is int else 'number'}, "
                         f"got {value!r}")


def check_block_ap_options(steps: int, learn: str, init: str, weight_lr: float,
                           scale_lr: float) -> None:
    """ValueError naming the first bad option."""
    _check_positive("steps", steps, int)
    if learn not in LEARN_MODES:
        raise ValueError(f"learn must be one of {LEARN_MODES}, got {learn!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "gptq" and learn.endswith("clip"):
        raise ValueError(f"init 'gptq' gives a grid, but learn {learn!r} derives the grid from "
                         "clip factors over the weights' own ranges; use init 'rtn' or learn "
                         "'weights+scales' / 'scales'")
    _check_positive("weight_lr", weight_lr)
    _check_positive("scale_lr", scale_lr)


# ---- The trainable grid -----------------------------------------------------------------------


def _round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _as_stored(x, spec: QuantSpec):
    """x rounded to the spec's scale dtype in the forward pass, gradient passed straight."""
    return round_to_ste(x, SCALE_JNP_DTYPES[spec.scale_dtype])


def _safe(s):
    return jnp.where(s == 0, jnp.ones_like(s), s)


def _group_reduce(w, spec: QuantSpec, reduce):
    """reduce over each group of w: [K, N] along K -> the stored statistic shape."""
    if spec.granularity == "tensor":
        return reduce(w).reshape(1, 1)
    k, n = w.shape
    g = group_length(spec, k)
    groups = -(-k // g)
    padded = jnp.pad(w, ((0, groups * g - k), (0, 0)), mode="edge")
    return reduce(padded.reshape(groups, g, n), axis=1)


def _grid(p: dict, spec: QuantSpec):
    """(weight, scale, zero or None) of one layer's parameters; scale and zero as stored.

    p holds "w" [K, N] and either "s" (and "z" when asymmetric) [groups, N], or OmniQuant's clip
    logits "gamma" (and "beta" when asymmetric) over the weight's own group ranges.
    """
    w = p["w"]
    if "gamma" in p:
        if spec.symmetric:
            amax = jax.nn.sigmoid(p["gamma"]) * _group_reduce(jnp.abs(w), spec, jnp.max)
            return w, _as_stored(amax / spec.qmax, spec), None
        hi = jax.nn.sigmoid(p["gamma"]) * _group_reduce(w, spec, jnp.max)
        lo = jax.nn.sigmoid(p["beta"]) * _group_reduce(w, spec, jnp.min)
        return w, _as_stored((hi - lo) / spec.qmax, spec), _as_stored(lo, spec)
    zero = None if spec.symmetric else _as_stored(p["z"], spec)
    return w, _as_stored(jnp.abs(p["s"]), spec), zero


def _codes(w, scale, zero, spec: QuantSpec, rounding):
    k = w.shape[0]
    scale = expand_groups(scale, spec, 0, k)
    if zero is None:
        return jnp.clip(rounding(w / _safe(scale)), -spec.qmax, spec.qmax), scale, None
    zero = expand_groups(zero, spec, 0, k)
    return jnp.clip(rounding((w - zero) / _safe(scale)), 0, spec.qmax), scale, zero


def fake_quant(p: dict, spec: QuantSpec):
    """The [K, N] matrix the frozen packed layer will hold, differentiable through the STE
    (rounding passes gradients straight; the clip stops them outside the grid)."""
    w, scale, zero = _grid(p, spec)
    codes, scale, zero = _codes(w, scale, zero, spec, _round_ste)
    out = codes * scale
    return out if zero is None else out + zero


def freeze(p: dict, spec: QuantSpec) -> QArray:
    """The trained parameters as a QArray (axis 0) whose dequantize() equals fake_quant(p)."""
    w, scale, zero = _grid(p, spec)
    codes, _, _ = _codes(w, scale, zero, spec, jnp.round)
    sdt = SCALE_JNP_DTYPES[spec.scale_dtype]
    dtype = jnp.int8 if spec.symmetric else jnp.uint8
    return QArray(codes.astype(dtype), scale.astype(sdt),
                  None if zero is None else zero.astype(sdt), spec, 0)


def _initial_parameters(matrix, q: QArray, spec: QuantSpec, learn: str, from_grid: bool):
    """(trainable, frozen) parameter dicts of one layer. from_grid: the weights start at the
    dequantized grid (GPTQ's choice of codes), else at the float matrix."""
    w = q.dequantize() if from_grid else matrix
    if learn.endswith("clip"):
        gamma = jnp.full(q.scale.shape, CLIP_INIT, jnp.float32)
        grid = {"gamma": gamma} if spec.symmetric else {"gamma": gamma, "beta": gamma}
    else:
        grid = {"s": q.scale_values()}
        if not spec.symmetric:
            grid["z"] = q.zero.astype(jnp.float32)
    trainable = dict(grid)
    frozen = {}
    (trainable if learn.startswith("weights") else frozen)["w"] = w
    return trainable, frozen


# ---- One block's training ----------------------------------------------------------------------


def _squared_error(out, target):
    leaves = [jnp.mean(jnp.square(o.astype(jnp.float32) - t.astype(jnp.float32)))
              for o, t in zip(jax.tree.leaves(out), jax.tree.leaves(target))]
    return sum(leaves) / len(leaves)


def _fake_quant_block(graphdef, state, params, layers):
    """The block with each trained layer's kernel replaced by its fake-quantized matrix."""
    block = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # variables of this trace
    for local, contraction, spec in layers:
        module = module_at(block, local)
        kernel = contraction.kernel_from_matrix(fake_quant(params[local], spec))
        module.kernel.set_value(kernel.astype(module.kernel[...].dtype))
    return block


def _merge(trainable, frozen):
    return {local: {**frozen[local], **trainable[local]} for local in trainable}


def _loss(trainable, frozen, graphdef, state, hidden, target, layers, run_block):
    block = _fake_quant_block(graphdef, state, _merge(trainable, frozen), layers)
    return _squared_error(run_block(block, hidden), target)


@functools.partial(jax.jit, static_argnums=(2, 6, 7))
def _evaluate(trainable, frozen, graphdef, state, hidden, target, layers, run_block):
    return _loss(trainable, frozen, graphdef, state, hidden, target, layers, run_block)


@functools.partial(jax.jit, static_argnums=(2, 6, 7, 8))
def _train_step(trainable, frozen, graphdef, state, hidden, target, layers, run_block,
                optimizer, opt_state):
    loss, grads = jax.value_and_grad(_loss)(trainable, frozen, graphdef, state, hidden, target,
                                            layers, run_block)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


@functools.lru_cache(maxsize=16)
def _optimizer(steps: int, weight_lr: float, scale_lr: float, learn: str):
    """AdamW (no weight decay) with cosine-decayed rates: weight_lr for "w", scale_lr for the
    grid ("s", "z", "gamma", "beta"); cached so that jit sees the same static object."""
    def adamw(rate):
        return optax.adamw(optax.cosine_decay_schedule(rate, steps), weight_decay=0.0)

    def labels(trainable):
        return {local: {name: "w" if name == "w" else "grid" for name in p}
                for local, p in trainable.items()}

    return optax.multi_transform({"w": adamw(weight_lr), "grid": adamw(scale_lr)}, labels)


def _mean_loss(trainable, frozen, graphdef, state, hidden, targets, layers, run_block) -> float:
    losses = [float(_evaluate(trainable, frozen, graphdef, state, h, t, layers, run_block))
              for h, t in zip(hidden, targets)]
    return float(np.mean(losses))


def reconstruct_block(context: BlockInputs, *, steps: int, learn: str = "weights+scales",
                      init: str = "rtn", weight_lr: float = 1e-4, scale_lr: float = 1e-4,
                      progress: bool = True) -> tuple[dict[str, QArray], dict[str, Any]]:
    """Trains one block's targets to reproduce the float block on context.hidden, through the
    STE, for `steps` AdamW steps (one calibration batch per step, cycling); returns the frozen
    QArrays {local path: QArray of the [K, N] matrix} and a report (mean squared output error
    of the initial grid, of the trained one, seconds). The block is left unchanged.

    If training ends above the initial grid's loss (over all batches), the initial grid is kept.
    """
    start = time.perf_counter()
    graphdef, state = nnx.split(context.block)
    targets = [jax.tree.map(jnp.asarray, context.output(b)) for b in range(len(context.hidden))]
    hidden = [jax.tree.map(jnp.asarray, h) for h in context.hidden]
    matrices = {}
    for local, target in context.targets.items():
        module = module_at(context.block, local)
        matrices[local] = target.contraction.matrix(jnp.asarray(module.kernel[...], jnp.float32))
    if init == "gptq":
        grids = _gptq_grids(context, matrices)
    else:
        grids = {local: quantize(m, context.targets[local].spec, axis=0)
                 for local, m in matrices.items()}
    layers = tuple((local, t.contraction, t.spec) for local, t in context.targets.items())
    trainable, frozen = {}, {}
    for local, _, spec in layers:
        trainable[local], frozen[local] = _initial_parameters(
            matrices[local], grids[local], spec, learn, from_grid=init == "gptq")
    # the RTN / GPTQ starting point, evaluated through the same fake quantization
    start_params = {local: {"w": grids[local].dequantize(), "s": grids[local].scale_values(),
                            **({} if spec.symmetric else
                               {"z": grids[local].zero.astype(jnp.float32)})}
                    for local, _, spec in layers}
    empty = {local: {} for local in start_params}
    initial_loss = _mean_loss(start_params, empty, graphdef, state, hidden, targets,
                              layers, context.run_block)
    optimizer = _optimizer(steps, float(weight_lr), float(scale_lr), learn)
    opt_state = optimizer.init(trainable)
    bar = tqdm(range(steps), desc=f"block {context.index}", unit="step", leave=False,
               disable=not progress)
    for step in bar:
        batch = step % len(hidden)
        trainable, opt_state, loss = _train_step(
            trainable, frozen, graphdef, state, hidden[batch], targets[batch], layers,
            context.run_block, optimizer, opt_state)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3g}")
    final_loss = _mean_loss(trainable, frozen, graphdef, state, hidden, targets, layers,
                            context.run_block)
    kept_initial = not final_loss < initial_loss
    if kept_initial:
        weights = {local: grids[local] for local, _, _ in layers}
        final_loss = initial_loss
    else:
        params = _merge(trainable, frozen)
        weights = {local: freeze(params[local], spec) for local, _, spec in layers}
    report = {"block": context.index, "path": context.path, "initial_loss": initial_loss,
              "final_loss": final_loss, "kept_initial": kept_initial, "steps": steps,
              "seconds": round(time.perf_counter() - start, 2)}
    return weights, report


def _gptq_grids(context: BlockInputs, matrices: dict) -> dict[str, QArray]:
    from lowbit.ptq.gptq import gptq_quantize_weight, prepare_hessian

    stats = context.statistics((XTX, COUNT))
    prepared: dict[int, Any] = {}
    grids = {}
    for local, target in context.targets.items():
        entry = stats[local]
        if id(entry) not in prepared:
            prepared[id(entry)] = prepare_hessian(2.0 * entry["xtx"] / entry["count"])
        grids[local], _ = gptq_quantize_weight(matrices[local], prepared[id(entry)], target.spec)
    return grids


# ---- Resumable runs: one file per finished block -------------------------------------------------


def _fingerprint(calibration, settings: dict) -> dict:
    digest = hashlib.sha256()
    for batch in calibration:
        for leaf in jax.tree.leaves(batch):
            array = np.asarray(leaf)
            digest.update(str((array.shape, array.dtype.str)).encode())
            digest.update(array.tobytes())
    return {**settings, "calibration_sha256": digest.hexdigest()}


def _block_file(workdir: Path, index: int) -> Path:
    return workdir / f"block-{index:04d}.npz"


def _save_block(path: Path, weights: dict[str, QArray], report: dict) -> None:
    arrays = {"report": np.asarray(json.dumps(report))}
    for i, (local, q) in enumerate(weights.items()):
        arrays[f"{i}.name"] = np.asarray(local)
        arrays[f"{i}.codes"] = np.asarray(q.codes)
        arrays[f"{i}.scale"] = np.asarray(q.scale)
        if q.zero is not None:
            arrays[f"{i}.zero"] = np.asarray(q.zero)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)


def _load_block(path: Path, targets: dict) -> tuple[dict[str, QArray], dict]:
    with np.load(path) as data:
        report = json.loads(str(data["report"]))
        weights = {}
        i = 0
        while f"{i}.name" in data:
            local = str(data[f"{i}.name"])
            if local not in targets:
                raise ValueError(f"{path} holds layer {local!r}, not a target of this block "
                                 f"({sorted(targets)}); use a fresh workdir")
            zero = jnp.asarray(data[f"{i}.zero"]) if f"{i}.zero" in data else None
            weights[local] = QArray(jnp.asarray(data[f"{i}.codes"]),
                                    jnp.asarray(data[f"{i}.scale"]), zero, targets[local].spec, 0)
            i += 1
    if sorted(weights) != sorted(targets):
        raise ValueError(f"{path} holds layers {sorted(weights)}, the block has targets "
                         f"{sorted(targets)}; use a fresh workdir")
    return weights, report


# ---- Entry points ------------------------------------------------------------------------------


def block_ap_apply(model, targets, calibration, *, steps: int = 100,
                   learn: str = "weights+scales", init: str = "rtn", weight_lr: float = 1e-4,
                   scale_lr: float = 1e-4, workdir: str | Path | None = None,
                   runtime: str = "packed", blocks=None, progress: bool = True
                   ) -> tuple[dict[str, QuantizedLinear], list[dict]]:
    """Block-AP of every target (lowbit.ptq.targets.Target) of any NNX model, block after block
    through the sequential driver: each block is trained on the outputs of the already
    quantized blocks to reproduce its own float outputs (mean squared error), then its targets
    become packed layers. Returns (path -> QuantizedLinear, one report per block).

    learn: "weights+scales" (EfficientQAT Block-AP: weights and per-group scales / zeros),
      "scales" (the grid only), "clip" (OmniQuant LWC: per-group clip factors of the weights'
      ranges, weights fixed) or "weights+clip". init: "rtn" (min-max grid of the float weights)
      or "gptq" (GPTQ's codes and scales on the same inputs; weights start at its grid).
    steps: AdamW steps per block, one calibration batch each (cycling); cosine-decayed rates
      weight_lr (weights) and scale_lr (scales, zeros, clip logits), no weight decay.
    workdir: a folder keeping one file per finished block: a rerun with the same settings and
      calibration loads those blocks instead of training them (an interrupted run continues).
    """
    for target in targets:
        check_block_ap_spec(target.spec)
    check_block_ap_options(steps, learn, init, weight_lr, scale_lr)
    check_runtime(runtime)
    folder = None
    if workdir is not None:
        from lowbit.ptq.driver import check_batches

        settings = {"method": "blockap", "steps": steps, "learn": learn, "init": init,
                    "weight_lr": weight_lr, "scale_lr": scale_lr,
                    "targets": {t.path: str(t.spec) for t in targets}}
        folder = open_stamped_workdir(workdir, _fingerprint(check_batches(calibration), settings),
                                      "settings.json", "a Block-AP run")

    def process(context: BlockInputs) -> tuple[dict[str, QuantizedLinear], dict]:
        done = None if folder is None else _block_file(folder, context.index)
        if done is not None and done.is_file():
            weights, report = _load_block(done, context.targets)
            report = {**report, "resumed": True}
        else:
            weights, report = reconstruct_block(context, steps=steps, learn=learn, init=init,
                                                weight_lr=weight_lr, scale_lr=scale_lr,
                                                progress=progress)
            if done is not None:
                _save_block(done, weights, report)
        out = {}
        for local, q in weights.items():
            target = context.targets[local]
            module = module_at(context.block, local)
            matrix = target.contraction.matrix(jnp.asarray(module.kernel[...], jnp.float32))
            layer_report = weight_errors(matrix, q.dequantize())
            install_packed(context.block, local, q, runtime)
            out[target.path] = QuantizedLinear(weight=q, report=layer_report)
        return out, report

    linears: dict[str, QuantizedLinear] = {}
    reports = []
    for block_linears, report in run_blocks(model, targets, calibration, process, blocks=blocks,
                                            progress=progress, desc="block-ap"):
        linears.update(block_linears)
        reports.append(report)
    return linears, reports


def block_ap_quantize(model, calibration, spec: QuantSpec | str, *, steps: int = 100,
                      learn: str = "weights+scales", init: str = "rtn", weight_lr: float = 1e-4,
                      scale_lr: float = 1e-4, workdir: str | Path | None = None,
                      batch_size: int = 4, progress: bool = True,
                      runtime: str = "packed") -> PTQResult:
    """Block-AP of every block linear of a Llama model in place (see block_ap_apply, which
    serves any model). calibration: int tokens [samples, seq], batches of batch_size sequences
    (one batch per training step)."""
    spec = check_block_ap_spec(spec)
    check_block_ap_options(steps, learn, init, weight_lr, scale_lr)
    start = time.perf_counter()
    targets, batches = llama_block_inputs(model, spec, calibration, batch_size)
    linears, reports = block_ap_apply(model, targets, batches, steps=steps, learn=learn,
                                      init=init, weight_lr=weight_lr, scale_lr=scale_lr,
                                      workdir=workdir, runtime=runtime, progress=progress)
    settings = {"weights": str(spec), "steps": steps, "learn": learn, "init": init,
                "weight_lr": weight_lr, "scale_lr": scale_lr, "batch_size": batch_size,
                "calibration_shape": list(np.shape(calibration))}
    return PTQResult(method="blockap", linears=linears, seconds=time.perf_counter() - start,
                     settings=settings, block_reports=reports)
