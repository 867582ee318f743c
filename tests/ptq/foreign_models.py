"""Models lowbit has never seen, written as a user would: the CNN of the Flax NNX MNIST tutorial and
a small transformer with Einsum, LinearGeneral, MultiHeadAttention and Linear layers."""

from functools import partial

import jax.numpy as jnp
from flax import nnx

from lowbit.ptq.driver import ModelBlocks


class CNN(nnx.Module):
    """The Flax NNX MNIST tutorial's CNN: [batch, 28, 28, 1] -> [batch, 10]."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


class Block(nnx.Module):
    """Pre-norm block: Einsum q/k/v, LinearGeneral output over (heads, head_dim), an
    nnx.MultiHeadAttention cross-mixer and a Linear MLP."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        head_dim = d // heads
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Einsum("bsd,tdhk->tbshk", (3, d, heads, head_dim), rngs=rngs)
        self.out = nnx.LinearGeneral((heads, head_dim), d, axis=(-2, -1), rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mha = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.norm3 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        q, k, v = self.qkv(self.norm1(x))
        scores = jnp.einsum("bshk,bthk->bhst", q, k) / jnp.sqrt(q.shape[-1])
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        weights = nnx.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        x = x + self.out(jnp.einsum("bhst,bthk->bshk", weights, v))
        x = x + self.mha(self.norm2(x))
        return x + self.down(nnx.gelu(self.up(self.norm3(x))))


def _embed(model, tokens):
    return model.embed(tokens)


def _block(block, x):
    return block(x)


class TinyTransformer(nnx.Module):
    """tokens [batch, seq] -> logits [batch, seq, vocab]; provides the PTQ blocks protocol."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, layers: int = 2, *,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def ptq_blocks(self) -> ModelBlocks:
        return ModelBlocks(tuple((f"blocks.{i}", b) for i, b in enumerate(self.blocks)),
                           _embed, _block)
