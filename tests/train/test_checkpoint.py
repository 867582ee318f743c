"""Training checkpoints: the unfinished folder of a killed save is never restored and goes away."""

import shutil

import jax.numpy as jnp

from lowbit.train.checkpoint import CheckpointStore


def test_a_killed_save_is_ignored_and_removed_by_the_next_store(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    store.save(1, {"a": jnp.ones(3)}, {"step": 1})
    store.close()
    # what SIGKILL in the middle of saving step 2 leaves: orbax's temporary folder
    shutil.copytree(tmp_path / "ck" / "1", tmp_path / "ck" / "2.orbax-checkpoint-tmp-1700000000")
    store = CheckpointStore(tmp_path / "ck")
    assert store.latest_step() == 1
    store.save(3, {"a": jnp.full(3, 2.0)}, {"step": 3})  # waits for the clean-up
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "3"]
    store.close()
