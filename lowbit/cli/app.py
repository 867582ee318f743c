"""The `lowbit` command: the parser over the command modules, and main() with one error line for
bad input (exit 2) and one for Ctrl-C (exit 130)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import signal
import sys
import threading

# One module of lowbit.cli per command, in `lowbit --help` order; each has HELP (one line),
# add_arguments(parser) and run(args) -> exit status or None.
COMMANDS = ("eval", "generate", "quantize", "export", "train", "finetune", "sweep", "demo", "activations",
            "specs", "fetch")


def command_module(name: str):
    return importlib.import_module(f"lowbit.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit and ternary models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def error_message(err: BaseException) -> str | None:
    """The one-line message for an error the user can act on (bad input, the file system, a KV
    pool or memory too small); None for anything else, which is a bug and keeps its traceback."""
    allocator = sys.modules.get("lowbit.kvcache.allocator")
    if isinstance(err, ValueError) or (allocator and isinstance(err, allocator.OutOfBlocksError)):
        return str(err)
    if isinstance(err, OSError):  # missing, existing or unwritable paths, a full disk, ...
        return str(err)
    if isinstance(err, MemoryError):
        return "out of host memory"
    jax = sys.modules.get("jax")
    if jax and isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err):
        return "out of device memory: " + str(err).strip().splitlines()[0]
    return None


class _Interrupts:
    """SIGINT raises KeyboardInterrupt as usual; if the exception is swallowed (it can land in a
    garbage-collector callback, e.g. JAX's, where Python ignores exceptions), the signal is sent
    again until main() has seen it."""

    def __init__(self):
        self.pending = False

    def handle(self, signum, frame):
        self.pending = True
        retry = threading.Timer(0.2, self._resend)
        retry.daemon = True
        retry.start()
        raise KeyboardInterrupt

    def _resend(self):
        if self.pending:
            os.kill(os.getpid(), signal.SIGINT)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield
        finally:
            self.pending = False
            signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command: exit 0 on success, 2 with `lowbit CMD: error: ...` for an error the user
    can act on, 130 with one line on Ctrl-C; a command may return its own status (sweep: 1
    when points failed)."""
    from lowbit.kernels.dispatch import schedule_cpu_for_memory

    parser = build_parser()
    args = parser.parse_args(argv)
    schedule_cpu_for_memory()
    interrupts = _Interrupts()
    try:
        with interrupts.installed():
            code = args.func(args)
    except KeyboardInterrupt:
        interrupts.pending = False
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = error_message(err)
        if message is None:
            raise
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return code or 0



def run_json(argv: list[str]) -> dict:
    """`lowbit ARGV --json --quiet` in this process (a script's way to run a command and read its
    result): the JSON object it printed last; a non-zero exit is a RuntimeError naming the command."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main([*argv, "--json", "--quiet"])
    if status:
        raise RuntimeError(f"lowbit {' '.join(argv)} exited with status {status}")
    return json.loads(out.getvalue().strip().splitlines()[-1])
