"""BitNet b1.58 trend check: small Llama models trained from scratch on the pydoc corpus (bytes),
fp32 / ternary (BitLinear) / binary / int4 (LSQ) at several widths on the same token batches.
Writes results.json and loss_curves.png next to this file and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from flax import nnx

HERE = Path(__file__).resolve().parent

from lowbit.nn import BitLinear, PackedLinear, freeze, quantize_kernel
from lowbit.train import TrainConfig, Trainer, corpus_tokens

SPECS = {"fp32": "fp32", "ternary": "ternary", "binary": "binary", "int4": "w4a8-lsq"}
SPEC_NOTES = {
    "fp32": "no quantization",
    "ternary": "BitLinear: RMSNorm, absmean ternary weights per tensor, int8 per-token inputs",
    "binary": "BinaryLinear: sign(w) * mean|w| per tensor, int8 per-token inputs",
    "int4": "int4 per-channel weights with learned LSQ steps, int8 per-token inputs",
}


def build_config(width: int, spec: str, args) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"d_model": width, "n_layers": args.layers, "n_heads": max(1, width // 32)},
        "data": {"tokenizer": "byte", "corpus": "pydoc"},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "lr": args.lr, "warmup_steps": args.warmup, "seed": args.seed,
                  "eval_interval": args.eval_interval},
        "quant": {"preset": SPECS[spec]},
    })


def ternary_check(trainer: Trainer) -> dict:
    """Distinct values of each trained ternary weight tensor, then its base-3 packed size."""
    model = trainer.model()
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, BitLinear)]
    distinct = sorted({int(np.unique(np.asarray(quantize_kernel(layer).dequantize())).size) for layer in layers})
    summary = freeze(model, ternary="base3")
    packed = [node for _, node in nnx.iter_graph(model) if isinstance(node, PackedLinear)]
    return {"tensors": len(layers), "distinct_values_per_tensor": distinct,
            "bits_per_weight_base3": summary.bits_per_weight,
            "packed_bytes": summary.nbytes, "weights": summary.weights,
            "all_base3": all(p.format == "base3" for p in packed)}


def plot(results: list[dict], widths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4), sharey=True, squeeze=False)
    colors = {"fp32": "black", "ternary": "tab:blue", "binary": "tab:red", "int4": "tab:green"}
    for ax, width in zip(axes[0], widths):
        for r in results:
            if r["width"] != width:
                continue
            losses = np.asarray(r["train_losses"])
            k = max(1, len(losses) // 40)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k, len(losses) + 1), smooth, color=colors[r["spec"]], lw=1.2,
                    label=f"{r['spec']} train")
            steps = [h["step"] for h in r["history"]]
            ax.plot(steps, [h["eval_loss"] for h in r["history"]], "o--", color=colors[r["spec"]], ms=3,
                    lw=0.8, label=f"{r['spec']} eval")
        ax.set_title(f"d_model = {width}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("next-byte loss (nats)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    low = min(min(r["train_losses"]) for r in results)
    axes.flat[0].set_ylim(low - 0.1, low + 1.6)  # the gaps, not the first steps
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: list[dict], widths: list[int], specs: list[str]) -> str:
    by = {(r["width"], r["spec"]): r for r in results}
    head = "| d_model | params | " + " | ".join(f"{s} ppl" for s in specs)
    extra = [s for s in specs if s != "fp32"] if "fp32" in specs else []
    head += "".join(f" | {s} / fp32" for s in extra) + " |"
    lines = [head, "|" + "---|" * (2 + len(specs) + len(extra))]
    for w in widths:
        cells = [str(w), f"{by[(w, specs[0])]['params'] / 1e6:.2f}M"]
        cells += [f"{by[(w, s)]['eval_ppl']:.3f}" for s in specs]
        cells += [f"{by[(w, s)]['eval_ppl'] / by[(w, 'fp32')]['eval_ppl']:.3f}" for s in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json and loss_curves.png")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the saved results.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())
        plot(*([saved["results"], saved["settings"]["widths"]] if "widths" in saved["settings"] else
               [saved["results"]]), args.out / "loss_curves.png")
        return 0
    tokens = corpus_tokens("pydoc", "byte", 0.1)
    results = []
    start = time.perf_counter()
    for width in args.widths:
        for spec in args.specs:
            config = build_config(width, spec, args)
            t0 = time.perf_counter()
            trainer = Trainer(config, tokens=tokens, progress=not args.quiet and sys.stderr.isatty())
            trainer.run()
            final = trainer.history[-1]
            record = {"width": width, "spec": spec, "preset": SPECS[spec], "note": SPEC_NOTES[spec],
                      "params": config.model.llama_config(256, args.seq_len).n_params,
                      "eval_loss": final["eval_loss"], "eval_ppl": final["eval_ppl"],
                      "seconds": time.perf_counter() - t0, "history": trainer.history,
                      "train_losses": trainer.train_losses}
            if spec == "ternary":
                record["ternary_check"] = ternary_check(trainer)
            results.append(record)
            print(f"d={width} {spec}: eval loss {final['eval_loss']:.4f} ppl {final['eval_ppl']:.3f} "
                  f"({record['seconds']:.0f} s)", flush=True)
    total = time.perf_counter() - start
    payload = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "eval_tokens": int(tokens[1].size), "train_tokens": int(tokens[0].size),
               "seconds": total, "results": results}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    plot(results, args.widths, args.out / "loss_curves.png")
    print(table(results, args.widths, args.specs))
    for r in results:
        if "ternary_check" in r:
            print(f"d={r['width']} ternary check: {r['ternary_check']}")
    print(f"total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
