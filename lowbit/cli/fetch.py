"""`lowbit fetch NAME`: download a registered model into the cache and verify its sha256."""

from __future__ import annotations

from lowbit.cli.output import emit

HELP = "download a named model into the cache and verify it"


def add_arguments(parser) -> None:
    parser.add_argument("name")


def run(args) -> None:
    from lowbit.models.registry import fetch, sha256_of

    path = fetch(args.name)
    info = {"name": args.name, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_of(path)}
    emit(args, info, [info])
