"""`lowbit specs`: the quantization error (MSE, SNR, bits per weight) of weight specs on synthetic data."""

from __future__ import annotations

from lowbit.cli.output import emit

HELP = "quantization error (MSE, SNR, bits per weight) of each spec on synthetic data"


def add_arguments(parser) -> None:
    parser.add_argument("--spec", action="append", help="a spec string (repeatable); default: a table of common specs")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)


def run(args) -> None:
    from lowbit.core.error import TABLE_SPECS, quantization_error, synthetic_weights

    specs = args.spec or list(TABLE_SPECS)
    rows = []
    for dist in ("gaussian", "laplace"):
        x = synthetic_weights(dist, (args.rows, args.cols))
        for spec in specs:
            e = quantization_error(x, spec)
            rows.append({"data": dist, "spec": e.spec, "bits_per_weight": round(e.bits_per_weight, 4),
                         "mse": e.mse, "snr_db": round(e.snr_db, 2)})
    emit(args, {"rows": rows}, rows)
