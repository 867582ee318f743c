"""The ternary Llama of experiments/qat/ternary_gguf.toml as a lowbit checkpoint that exports to
TQ1_0 / TQ2_0: restored from its training checkpoint, frozen to packed ternary layers (inputs
int8 per 256, llama.cpp's Q8_K), the embedding put on the Q8_0 grid the GGUF stores, lowbit.save.

    python papers/bitnet-b158/export_ternary.py --config experiments/qat/ternary_gguf.toml --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType

import lowbit
from lowbit.models.gguf.blocks import dequantize_ggml
from lowbit.models.gguf.encode import encode_values
from lowbit.nn import freeze
from lowbit.train.config import load_config
from lowbit.train.loop import Trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training config (its checkpoint_dir is read)")
    parser.add_argument("--out", required=True, help="new checkpoint directory (lowbit.save)")
    args = parser.parse_args()
    config = load_config(args.config)
    if config.data.tokenizer != "smollm2":
        raise SystemExit("the GGUF needs SmolLM2's tokenizer: data.tokenizer must be 'smollm2'")
    trainer = Trainer(config, resume=True)
    if trainer.step == 0:
        raise SystemExit(f"no checkpoint in {config.train.checkpoint_dir}: train first")
    fake_quant = trainer.evaluate()
    model = trainer.model()
    trainer.close()
    summary = freeze(model)
    embedding = model.embed.embedding
    values = np.asarray(embedding.get_value(), np.float32)
    on_grid = dequantize_ggml(encode_values(values, GGMLQuantizationType.Q8_0),
                              GGMLQuantizationType.Q8_0, values.shape)
    embedding.set_value(on_grid.astype(values.dtype))
    info = {"source": {"model": "smollm2-135m"},
            "training": {"config": args.config, "step": trainer.step,
                         "heldout_loss_fake_quant": fake_quant["eval_loss"]},
            "embedding": "rounded to the Q8_0 grid (blocks of 32, f16 scales) as the GGUF stores it",
            "packed_layers": summary.layers, "packed_bytes": summary.nbytes}
    lowbit.save(model, args.out, info=info)
    print(json.dumps({"out": args.out, **info,
                      "embedding_rounding_max_abs": float(np.abs(on_grid - values).max())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
