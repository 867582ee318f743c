"""Writing files so that a reader never sees half of one: write to a partial file (or folder)
next to the target, named `.NAME.partial-PID-*`, rename it over the target only when the write
succeeded; partials of the same target left by a killed process go on the next write."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

_PARTIAL = ".partial-"


def _partial_prefix(target: Path) -> str:
    return f".{target.name}{_PARTIAL}{os.getpid()}-"


def is_partial(path: str | Path) -> bool:
    """Whether `path` is named like an unfinished write (`.NAME.partial-...`)."""
    name = Path(path).name
    return name.startswith(".") and _PARTIAL in name


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(target: str | Path) -> list[Path]:
    """Remove the partial writes of `target` whose writing process no longer runs (and those of
    older lowbit versions, which did not record it); returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{target.name}{_PARTIAL}") + r"(\d+-)?")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or (match.group(1) and _running(int(match.group(1)[:-1]))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def partial_directory(target: str | Path) -> Path:
    """A new empty partial directory next to `target` (its parents are created), after removing
    stale partials of the same target; the caller renames it to `target` when it is complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    return Path(tempfile.mkdtemp(prefix=_partial_prefix(target), dir=target.parent))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a partial path in the target's folder; when the block finishes without an error
    the partial file replaces `path`, otherwise it is removed and `path` is left as it was.
    Stale partials of `path` (from a killed earlier write) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    handle, temporary = tempfile.mkstemp(prefix=_partial_prefix(path), dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_toml(path: str | Path, what: str = "config") -> dict:
    """The table of a TOML file; FileNotFoundError if it is missing, ValueError naming the file
    if it is not valid TOML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{what} {path} is not valid TOML: {error}") from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` through atomic_path; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def open_stamped_workdir(workdir: str | Path, settings: dict, stamp: str, what: str) -> Path:
    """A resumable run's work directory (created if missing), stamped with its settings as JSON in
    `stamp`: a directory stamped with other settings is a ValueError naming the differing keys
    (`what` names the run, e.g. "a Block-AP run")."""
    import json

    folder = Path(workdir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"workdir {folder} is a file, not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / stamp
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != settings:
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise ValueError(f"workdir {folder} holds {what} with other settings (differing: {changed}); "
                             "use a fresh workdir to start over")
    else:
        write_text_atomic(path, json.dumps(settings, indent=1, sort_keys=True))
    return folder
