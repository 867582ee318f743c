"""atomic_path / write_text_atomic: the target is replaced whole or not at all."""

import pytest

from lowbit.files import atomic_path, write_text_atomic


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half of the new")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_read_toml_names_the_file(tmp_path):
    from lowbit.files import read_toml

    good = tmp_path / "good.toml"
    good.write_text('name = "x"\n[data]\nctx = 8\n')
    assert read_toml(good) == {"name": "x", "data": {"ctx": 8}}
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ValueError, match="bad.toml is not valid TOML"):
        read_toml(bad, "sweep config")
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        read_toml(tmp_path / "missing.toml")


def _dead_pid() -> int:
    """The id of a process that has finished (and been reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_write_removes_stale_partials_of_the_same_target_only(tmp_path):
    import os

    from lowbit.files import partial_directory

    target = tmp_path / "results.csv"
    dead = _dead_pid()
    stale_file = tmp_path / f".results.csv.partial-{dead}-abc"  # a killed earlier write
    stale_file.write_text("half")
    stale_dir = tmp_path / f".results.csv.partial-{dead}-def"
    (stale_dir / "arrays").mkdir(parents=True)
    (stale_dir / "arrays" / "x").write_bytes(bytes(1000))
    legacy = tmp_path / ".results.csv.partial-k2j4x9"  # from before partials named their writer
    legacy.mkdir()
    live = tmp_path / f".results.csv.partial-{os.getpid()}-ghi"  # a write in progress
    live.write_text("running")
    other = tmp_path / f".other.csv.partial-{dead}-jkl"  # another target's partial
    other.write_text("not ours")
    write_text_atomic(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["results.csv", live.name, other.name])
    staging = partial_directory(tmp_path / "ckpt")
    assert staging.is_dir() and staging.name.startswith(f".ckpt.partial-{os.getpid()}-")


def test_partial_names_are_recognized(tmp_path):
    from lowbit.files import is_partial

    assert is_partial(tmp_path / ".ckpt.partial-123-abc")
    assert is_partial(tmp_path / ".ckpt.partial-x7y")
    assert not is_partial(tmp_path / "ckpt")
    assert not is_partial(tmp_path / ".hidden")
