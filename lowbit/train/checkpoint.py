"""Orbax checkpoints of a training run: the array state (parameters, other variables, optimizer
state) plus a JSON record (step, config, history), restored onto the live arrays' shardings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class CheckpointStore:
    """Numbered checkpoints in one directory (the newest `max_to_keep` are kept). A save is
    finalized by a rename; the unfinished folder of a killed save is never restored and is
    removed when the next store opens the directory."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        if not str(directory):
            raise ValueError("directory must be a non-empty path")
        self.directory = Path(directory).expanduser().resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, record: dict) -> None:
        """Write `state` (a pytree of arrays) and `record` (JSON-able) as checkpoint `step`."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         record=ocp.args.JsonSave(record)), force=True)
        self._manager.wait_until_finished()

    def read_record(self, step: int) -> dict:
        """The JSON record of checkpoint `step` alone (no arrays are read)."""
        self._check_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record

    def _check_step(self, step: int) -> None:
        if step not in self.all_steps():
            raise ValueError(f"step {step} has no checkpoint in {self.directory}; available: {self.all_steps()}")

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """(state, record) of checkpoint `step`; `target` is a live state of the same structure
        (its arrays give the shapes, dtypes and shardings to restore onto)."""
        self._check_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(target)), record=ocp.args.JsonRestore()))
        return restored.state, restored.record

    def close(self) -> None:
        self._manager.close()
