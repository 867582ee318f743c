"""LSQ and PACT ablations on a small Llama trained from scratch on the pydoc corpus (bytes):
LSQ with and without its step-gradient scale (W4A4, W3A3), and PACT's learned clip against a
fixed clip. Writes results.json and loss_curves.png next to this file; prints Markdown tables.
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

from lowbit.nn import QuantLinear
from lowbit.train import TrainConfig, Trainer, corpus_tokens

BLOCKS = r"layers\.\d+\..*"


def lsq_rule(bits: int, grad_scale: bool) -> dict:
    return {"path": BLOCKS, "weight_spec": f"int{bits}", "act_spec": f"int{bits}", "estimator": "lsq",
            "lsq_grad_scale": grad_scale}


def clip_rule(init, learn: bool) -> dict:
    return {"path": BLOCKS, "weight_spec": "int8:channel", "act_spec": "int4", "act_estimator": "pact",
            "act_clip_init": init, "learn_clip": learn}


RUNS = {  # name -> (group, rules, description)
    "fp32": ("baseline", [], "no quantization"),
    "lsq-w4a4": ("lsq", [lsq_rule(4, True)], "LSQ W4A4, gradient scale 1/sqrt(N Qp)"),
    "lsq-w4a4-noscale": ("lsq", [lsq_rule(4, False)], "LSQ W4A4, no gradient scale"),
    "lsq-w3a3": ("lsq", [lsq_rule(3, True)], "LSQ W3A3, gradient scale"),
    "lsq-w3a3-noscale": ("lsq", [lsq_rule(3, False)], "LSQ W3A3, no gradient scale"),
    "pact-data": ("pact", [clip_rule("data", True)], "A4 PACT, alpha from 2.55 sigma of batch 0, learned"),
    "fixed-data": ("pact", [clip_rule("data", False)], "A4 fixed clip at 2.55 sigma of batch 0"),
    "pact-10": ("pact", [clip_rule(10.0, True)], "A4 PACT, alpha starts at 10, learned"),
    "fixed-10": ("pact", [clip_rule(10.0, False)], "A4 fixed clip at 10"),
    "absmax-a4": ("pact", [{"path": BLOCKS, "weight_spec": "int8:channel", "act_spec": "int4:token"}],
                  "A4 dynamic per-token absmax (no clip)"),
}


def build_config(rules: list, args) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"d_model": args.width, "n_layers": args.layers, "n_heads": max(1, args.width // 32)},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                  "warmup_steps": args.warmup, "seed": args.seed, "eval_interval": args.eval_interval},
        "quant": {"rules": rules},
    })


def learned_values(trainer: Trainer) -> dict:
    """Mean learned input clip / step over the quantized layers (if any)."""
    layers = [n for _, n in nnx.iter_graph(trainer.model()) if isinstance(n, QuantLinear) and n.act_param is not None]
    if not layers:
        return {}
    values = np.asarray([float(n.act_param[...]) for n in layers])
    return {"act_param_mean": float(values.mean()), "act_param_min": float(values.min()),
            "act_param_max": float(values.max())}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("lsq", "LSQ: gradient scale on / off"), ("pact", "4-bit inputs: PACT vs fixed clip")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (group, title) in zip(axes, groups):
        for r in results:
            if r["group"] not in (group, "baseline"):
                continue
            losses = np.asarray(r["train_losses"])
            k = max(1, len(losses) // 40)
            ax.plot(np.arange(k, len(losses) + 1), np.convolve(losses, np.ones(k) / k, mode="valid"),
                    lw=1.1, label=r["name"], color="black" if r["name"] == "fp32" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("next-byte train loss (nats)")
    low = min(min(r["train_losses"]) for r in results)
    axes.flat[0].set_ylim(low - 0.1, low + 1.6)  # the gaps, not the first steps
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the saved results.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())
        plot(*([saved["results"], saved["settings"]["widths"]] if "widths" in saved["settings"] else
               [saved["results"]]), args.out / "loss_curves.png")
        return 0
    tokens = corpus_tokens("pydoc", "byte", 0.1)
    results, start = [], time.perf_counter()
    for name in args.runs:
        group, rules, description = RUNS[name]
        t0 = time.perf_counter()
        trainer = Trainer(build_config(rules, args), tokens=tokens)
        trainer.run()
        final = trainer.history[-1]
        record = {"name": name, "group": group, "description": description, "eval_loss": final["eval_loss"],
                  "eval_ppl": final["eval_ppl"], "seconds": time.perf_counter() - t0,
                  "history": trainer.history, "train_losses": trainer.train_losses, **learned_values(trainer)}
        results.append(record)
        print(f"{name}: eval loss {final['eval_loss']:.4f} ppl {final['eval_ppl']:.3f} ({record['seconds']:.0f} s)",
              flush=True)
    total = time.perf_counter() - start
    payload = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "seconds": total, "results": results}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    plot(results, args.out / "loss_curves.png")
    print("| run | what | eval loss | eval ppl | learned input clip / step (mean, min-max) |")
    print("|---|---|---|---|---|")
    for r in results:
        learned = (f"{r['act_param_mean']:.3f} ({r['act_param_min']:.3f}-{r['act_param_max']:.3f})"
                   if "act_param_mean" in r else "")
        print(f"| {r['name']} | {r['description']} | {r['eval_loss']:.4f} | {r['eval_ppl']:.3f} | {learned} |")
    print(f"total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
