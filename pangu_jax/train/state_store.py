"""Saved training states: orbax's CheckpointManager, asynchronous saves, the last few kept, restored sharded."""

from __future__ import annotations

from pathlib import Path

from .step import TrainState

__all__ = ["StateStore"]


class StateStore:
    """Training states under `directory`, one folder a step, the last `keep` kept.

    A save returns once the arrays are copied off the devices and is
    written in the background (orbax's asynchronous checkpointing); a state
    is restored straight into the shardings of the abstract state given, so
    no device holds more than its share.
    """

    def __init__(self, directory: str | Path, keep: int) -> None:
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState) -> None:
        import orbax.checkpoint as ocp

        if self._manager.latest_step() == step:
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, abstract: TrainState, step: int | None = None) -> TrainState | None:
        """The state saved at `step` (default: the latest), laid out as `abstract`; None if none was saved."""
        import orbax.checkpoint as ocp

        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        """Until every save in the background is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

