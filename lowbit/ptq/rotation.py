"""Incoherence processing by orthogonal rotations (QuaRot / QuIP#): fold RMSNorm gains into the
linears that read them, rotate the residual stream by a randomized Hadamard matrix, rotate each value
head, and put an online Hadamard transform before each MLP's down projection; the function is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.core.hadamard import hadamard_factors, hadamard_matrix, hadamard_transform, random_hadamard
from lowbit.ptq.targets import module_at


@dataclasses.dataclass(frozen=True)
class NormReaders:
    """An RMSNorm (a 1-D gain `weight` or `scale`, no bias, no mean subtraction) and the
    nnx.Linear layers that read its output (dotted paths)."""

    norm: str
    readers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HeadPair:
    """A value projection whose output columns are value heads of `head_dim` features and the
    output projection that reads all attention heads (rows: query heads x head_dim; the
    attention output of each query head is a softmax-weighted sum of one value head's rows)."""

    value: str
    output: str
    head_dim: int


@dataclasses.dataclass(frozen=True)
class OnlineHadamard:
    """A linear (`consumer`) whose input gets an online Hadamard transform. `producer`: a linear
    whose output columns reach the consumer's input through elementwise products only (SwiGLU's
    up projection), so random signs fold into its columns; `caller`: the module that calls the
    consumer and applies the transform itself while the consumer does not carry it."""

    caller: str
    producer: str
    consumer: str


@dataclasses.dataclass(frozen=True)
class RotationPlan:
    """Where a model's residual stream is read and written.

    embedding: the nnx.Embed whose rows start the residual stream; norms: every RMSNorm on the
    residual and its readers (the final norm's reader is the head, an nnx.Linear [d, vocab]);
    writers: the linears whose outputs are added to the residual; heads: value/output pairs
    rotated per head; online: the down projections given an online Hadamard transform.
    prepare(model): run first (the Llama unties its tied head here); install_online(model,
    entry): makes entry.caller apply the transform to the consumer's input.
    """

    embedding: str
    norms: tuple[NormReaders, ...]
    writers: tuple[str, ...]
    heads: tuple[HeadPair, ...] = ()
    online: tuple[OnlineHadamard, ...] = ()
    prepare: Callable[[Any], None] | None = None
    install_online: Callable[[Any, OnlineHadamard], None] | None = None


class HadamardMLP(nnx.Module):
    """The Llama's SwiGLU MLP, w_down(H(silu(w_gate(x)) * w_up(x))), with H the online Hadamard
    transform x @ H / sqrt(ffn_dim); skipped when w_down carries it (a packed layer's
    input_transform), so the transform runs exactly once."""

    def __init__(self, mlp: nnx.Module):
        self.w_gate, self.w_up, self.w_down = mlp.w_gate, mlp.w_up, mlp.w_down

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.w_gate(x)) * self.w_up(x)
        if getattr(self.w_down, "input_transform", None) is None:
            hidden = hadamard_transform(hidden)
        return self.w_down(hidden)


def _untie_llama_head(model) -> None:
    """A tied Llama gets its own lm_head (the embedding table, transposed), so that the final
    norm's gain and the rotation can fold into the head alone."""
    if not model.config.tied_embeddings:
        return
    table = model.embed.embedding.get_value()
    head = nnx.Linear(model.config.d_model, model.config.vocab_size, use_bias=False,
                      dtype=model.dtype, param_dtype=table.dtype, rngs=nnx.Rngs(0),
                      kernel_init=nnx.initializers.zeros)
    head.kernel.set_value(jnp.asarray(table).T)
    model.lm_head = head
    model.config = dataclasses.replace(model.config, tied_embeddings=False)


def _install_llama_online(model, entry: OnlineHadamard) -> None:
    parent_path, _, name = entry.caller.rpartition(".")
    parent = module_at(model, parent_path)
    mlp = getattr(parent, name)
    if not isinstance(mlp, HadamardMLP):
        setattr(parent, name, HadamardMLP(mlp))


def llama_rotation_plan(model) -> RotationPlan:
    """The built-in Llama's plan: attn_norm -> q/k/v, ffn_norm -> gate/up, final_norm -> the
    head; o and down write the residual; v/o rotate per head; down gets the online transform."""
    norms, writers, heads, online = [], [], [], []
    head_dim = model.config.head_dim
    for i in range(len(model.layers)):
        p = f"layers.{i}"
        norms += [NormReaders(f"{p}.attn_norm", (f"{p}.attn.wq", f"{p}.attn.wk", f"{p}.attn.wv")),
                  NormReaders(f"{p}.ffn_norm", (f"{p}.mlp.w_gate", f"{p}.mlp.w_up"))]
        writers += [f"{p}.attn.wo", f"{p}.mlp.w_down"]
        heads.append(HeadPair(f"{p}.attn.wv", f"{p}.attn.wo", head_dim))
        online.append(OnlineHadamard(f"{p}.mlp", f"{p}.mlp.w_up", f"{p}.mlp.w_down"))
    norms.append(NormReaders("final_norm", ("lm_head",)))
    return RotationPlan(embedding="embed", norms=tuple(norms), writers=tuple(writers),
                        heads=tuple(heads), online=tuple(online), prepare=_untie_llama_head,
                        install_online=_install_llama_online)


def rotation_plan(model) -> RotationPlan:
    """The model's `rotation_plan()` when it declares one, the built-in Llama's plan, else a
    ValueError."""
    from lowbit.models.llama import Llama

    if hasattr(model, "rotation_plan"):
        plan = model.rotation_plan()
    elif isinstance(model, Llama):
        plan = llama_rotation_plan(model)
    else:
        raise ValueError(f"model {type(model).__name__} declares no rotation structure: give it a "
                         "rotation_plan() method returning a lowbit.ptq.rotation.RotationPlan "
                         "(which norms feed which linears, which linears write the residual), or "
                         "pass plan= (built-in: the Llama)")
    if not isinstance(plan, RotationPlan):
        raise ValueError(f"rotation_plan() must return a RotationPlan, got {type(plan).__name__}")
    return plan


# ---- checks and array access ------------------------------------------------------------------
def _linear(model, path: str) -> nnx.Linear:
    module = module_at(model, path)
    if not isinstance(module, nnx.Linear):
        raise ValueError(f"rotation plan: {path!r} must be an nnx.Linear (a float layer, rotated "
                         f"before quantization), got {type(module).__name__}")
    return module


def _gain(norm, path: str) -> nnx.Variable:
    if isinstance(norm, nnx.LayerNorm) or getattr(norm, "bias", None) is not None:
        raise ValueError(f"rotation plan: {path!r} is a {type(norm).__name__} with mean "
                         "subtraction or a bias, which a rotation does not commute with; only "
                         "RMSNorms (a 1-D gain, no bias) are supported")
    for name in ("weight", "scale"):
        variable = getattr(norm, name, None)
        if isinstance(variable, nnx.Variable) and np.ndim(variable.get_value()) == 1:
            return variable
    raise ValueError(f"rotation plan: {path!r} ({type(norm).__name__}) has no 1-D gain "
                     "`weight` or `scale`: not an RMSNorm")


def _get(variable) -> np.ndarray:
    return np.asarray(variable.get_value(), np.float64)


def _set(variable, value: np.ndarray) -> None:
    old = variable.get_value()
    variable.set_value(jnp.asarray(value, old.dtype))


def _check_width(path: str, actual: int, expected: int, side: str) -> None:
    if actual != expected:
        raise ValueError(f"rotation plan: {path!r} has {actual} {side} features, the residual "
                         f"stream {expected}")


# ---- the rotation -------------------------------------------------------------------------------
def rotate_model(model, *, seed: int = 0, plan: RotationPlan | None = None) -> RotationPlan:
    """Rotates a float model in place; it computes the same function (up to f32 rounding).

    1. every norm's gain g folds into its readers' input rows (W <- diag(g) W) and becomes 1;
    2. the residual stream is rotated by Q = diag(s) H / sqrt(d) (a randomized Hadamard matrix,
       core.hadamard: 576 = 12 x 12 x 4): embedding E <- E Q, readers W <- Q^T W, writers
       W <- W Q (RMSNorm without a gain commutes with Q);
    3. each value head's columns and the matching output rows: V <- V R, O_h <- R^T O_h with one
       randomized Hadamard R of order head_dim;
    4. each online entry: random signs D on the producer's columns, the consumer's rows
       W <- H^T D W / sqrt(n) (n = its inputs, 1536 = 12 x 128) and the caller applies x @ H /
       sqrt(n) online (packed layers carry it as input_transform "hadamard").
    The products are taken in float64 and stored in each parameter's dtype. Returns the plan.
    seed: the random signs (numpy default_rng(seed)).
    """
    plan = rotation_plan(model) if plan is None else plan
    if not isinstance(plan, RotationPlan):
        raise ValueError(f"plan must be a RotationPlan, got {type(plan).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if plan.online and plan.install_online is None:
        raise ValueError("rotation plan: online entries need install_online")
    embed = module_at(model, plan.embedding)
    if not isinstance(embed, nnx.Embed):
        raise ValueError(f"rotation plan: {plan.embedding!r} must be an nnx.Embed, got "
                         f"{type(embed).__name__}")
    d = embed.embedding.get_value().shape[1]
    hadamard_factors(d)  # a clear error before anything changes
    if plan.prepare is not None:
        plan.prepare(model)
    readers = [r for entry in plan.norms for r in entry.readers]
    for path in readers:
        _check_width(path, _linear(model, path).kernel.get_value().shape[0], d, "input")
    for path in plan.writers:
        _check_width(path, _linear(model, path).kernel.get_value().shape[1], d, "output")
    gains = [(_gain(module_at(model, entry.norm), entry.norm), entry) for entry in plan.norms]
    for pair in plan.heads:
        _check_heads(model, pair)
    for entry in plan.online:
        hadamard_factors(_linear(model, entry.consumer).kernel.get_value().shape[0])
        _linear(model, entry.producer)

    rng = np.random.default_rng(seed)
    for gain, entry in gains:
        g = _get(gain)
        for path in entry.readers:
            kernel = _linear(model, path).kernel
            _set(kernel, g[:, None] * _get(kernel))
        _set(gain, np.ones_like(g))
    q = random_hadamard(d, rng)
    _set(embed.embedding, _get(embed.embedding) @ q)
    for path in readers:
        kernel = _linear(model, path).kernel
        _set(kernel, q.T @ _get(kernel))
    for path in plan.writers:
        layer = _linear(model, path)
        _set(layer.kernel, _get(layer.kernel) @ q)
        if layer.bias is not None:
            _set(layer.bias, _get(layer.bias) @ q)
    for pair in plan.heads:
        _rotate_heads(model, pair, random_hadamard(pair.head_dim, rng))
    for entry in plan.online:
        producer, consumer = _linear(model, entry.producer), _linear(model, entry.consumer)
        n = consumer.kernel.get_value().shape[0]
        signs = rng.choice(np.array([-1.0, 1.0]), size=n)
        _set(producer.kernel, _get(producer.kernel) * signs[None, :])
        if producer.bias is not None:
            _set(producer.bias, _get(producer.bias) * signs)
        h = hadamard_matrix(n).astype(np.float64) / np.sqrt(n)
        _set(consumer.kernel, h.T @ (signs[:, None] * _get(consumer.kernel)))
        plan.install_online(model, entry)
    return plan


def _check_heads(model, pair: HeadPair) -> None:
    v, o = _linear(model, pair.value), _linear(model, pair.output)
    v_out, o_in = v.kernel.get_value().shape[1], o.kernel.get_value().shape[0]
    if pair.head_dim < 1 or v_out % pair.head_dim or o_in % pair.head_dim:
        raise ValueError(f"rotation plan: head_dim {pair.head_dim} must divide {pair.value!r}'s "
                         f"{v_out} outputs and {pair.output!r}'s {o_in} inputs")
    hadamard_factors(pair.head_dim)


def _rotate_heads(model, pair: HeadPair, r: np.ndarray) -> None:
    v, o = _linear(model, pair.value), _linear(model, pair.output)
    hd = pair.head_dim
    kernel = _get(v.kernel)
    _set(v.kernel, (kernel.reshape(kernel.shape[0], -1, hd) @ r).reshape(kernel.shape))
    if v.bias is not None:
        _set(v.bias, (_get(v.bias).reshape(-1, hd) @ r).reshape(-1))
    kernel = _get(o.kernel)
    _set(o.kernel, np.einsum("ij,hjn->hin", r.T, kernel.reshape(-1, hd, kernel.shape[1]))
         .reshape(kernel.shape))


def carry_online_transforms(model, plan: RotationPlan) -> list[str]:
    """Each online consumer that is now a packed layer takes the transform over from its caller
    (input_transform "hadamard"), so a saved checkpoint computes the same function when loaded
    into a model without the caller's transform. Returns the paths that took it over."""
    from lowbit.nn.packed_layer import PackedLayer

    carried = []
    for entry in plan.online:
        layer = module_at(model, entry.consumer)
        if isinstance(layer, PackedLayer) and layer.input_transform is None:
            layer.set_input_transform("hadamard")
            carried.append(entry.consumer)
    return carried


def rotated_scale_groups(model, plan: RotationPlan, scale_groups=None) -> list:
    """The model's AWQ / SmoothQuant scale groups (lowbit.ptq.scaling.declared_groups) with no
    fold into an online entry's producer: an online Hadamard lies between it and the consumer,
    so the consumer keeps its scale as an input scale (applied after the transform)."""
    from lowbit.ptq.scaling import ScaleGroup, declared_groups

    producers = {entry.producer for entry in plan.online}
    return [ScaleGroup(g.members, None, g.no_clip) if g.fold in producers else g
            for g in declared_groups(model, scale_groups)]
