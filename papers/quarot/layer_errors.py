"""Relative output error ||x dW||^2 / ||x W||^2 of RTN int4:g64 on real activations (256 pydoc
tokens) for q, up and down of blocks 2, 8 and 15, before and after lowbit.ptq.rotation; and, for
up's input, the largest channel's RMS over the median channel's and its weight row's RMS over
the median row's.
    PYTHONPATH=. .venv/bin/python papers/quarot/layer_errors.py
"""
import numpy as np, jax, jax.numpy as jnp
from lowbit.models.registry import fetch
from lowbit.models.loader import load_gguf_model
from lowbit.models.tokenizer import Tokenizer
from lowbit.data.corpus import load_text
from lowbit.core.quantize import quantize
from lowbit.core.hadamard import hadamard_transform
from lowbit.ptq.rotation import rotate_model
p = fetch("smollm2-135m")
tokens = np.asarray(Tokenizer.from_gguf(p).encode(load_text()[:3000]), np.int32)[None, :256]
pos = jnp.arange(256)[None]
def run(model, rotated: bool) -> dict:
    x = model.embed_tokens(tokens)
    res = {}
    for i, block in enumerate(model.layers[:16]):
        if i in (2, 8, 15):
            h = block.attn_norm(x)
            mid = x + block.attn(h, pos)
            h2 = block.ffn_norm(mid)
            hid = jax.nn.silu(block.mlp.w_gate(h2)) * block.mlp.w_up(h2)
            if rotated: hid = hadamard_transform(hid)
            for name, inp, lin in (("wq", h, block.attn.wq), ("up", h2, block.mlp.w_up), ("down", hid, block.mlp.w_down)):
                w = lin.kernel.get_value()
                q = quantize(w, "int4:g64", axis=0).dequantize()
                y = inp.reshape(-1, w.shape[0]) @ w
                res[(i, name)] = float(jnp.sum((inp.reshape(-1, w.shape[0]) @ q - y) ** 2) / jnp.sum(y ** 2))
            channel = jnp.sqrt(jnp.mean(h2.reshape(-1, h2.shape[-1]) ** 2, axis=0))
            rows = jnp.sqrt(jnp.mean(block.mlp.w_up.kernel.get_value() ** 2, axis=1))
            top = int(jnp.argmax(channel))
            res[(i, "up input: max/median channel rms")] = float(channel[top] / jnp.median(channel))
            res[(i, "up: that row's rms / median row rms")] = float(rows[top] / jnp.median(rows))
        x = block(x, pos)
    return res
m, _ = load_gguf_model(p)
a = run(m, False)
rotate_model(m, seed=0)
b = run(m, True)
for key in a:
    print(key, f"plain {a[key]:.5f} rotated {b[key]:.5f}")
