"""litdata's streaming loader, fixed for Lightning's resume and for checkpoints read with ``weights_only=True``."""

from __future__ import annotations

from typing import Any


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value.item() if hasattr(value, "item") and type(value).__module__ == "numpy" else value


def resumable_loader_class() -> type:
    """litdata's ``StreamingDataLoader`` with the fixes below (built on call, so litdata loads only when needed)."""
    from litdata import StreamingDataLoader

    class ResumableStreamingDataLoader(StreamingDataLoader):
        """litdata's loader, fixed for Lightning's resume.

        After ``load_state_dict`` litdata resumes the interrupted epoch and clears its ``restore`` flag only when that
        pass is iterated to exhaustion. Lightning stops a pass once it has taken ``len(loader)`` batches, so the flag
        stayed set and the next epoch began by replaying the previous epoch's last batch. A pass that starts while
        ``restore`` is still set from an earlier pass is now a fresh epoch.
        """

        _restored_pending = False

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._restored_pending = self.restore

        def state_dict(self) -> dict[str, Any]:
            # litdata's state holds numpy integers; plain ints keep checkpoints loadable with weights_only=True.
            return _plain(super().state_dict())

        def __iter__(self):
            if self.restore and not self._restored_pending:
                self.restore = False
            self._restored_pending = False
            return super().__iter__()

    return ResumableStreamingDataLoader
