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
