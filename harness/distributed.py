"""Distribution over processes: the only module that imports ``accelerate``.

Launched plainly, there is one process and everything here is the identity. Under ``torchrun``
or ``accelerate launch``, windows are sharded by *global* rank (so several nodes work too), each
process scores its shard, and the per-window records are gathered to every process; the
accumulation that follows is the same code as in a single process, so the record is the same.
"""

from __future__ import annotations

import os
from typing import Any, Sequence


class Distributor:
    def __init__(self, device: str = "auto"):
        from accelerate import PartialState

        cpu = device == "cpu"
        if device == "auto":
            import torch

            cpu = not torch.cuda.is_available()
        # accelerate picks gloo for a CPU run when told cpu=True
        self.state = PartialState(cpu=cpu)

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def world(self) -> int:
        return self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def device(self) -> str:
        return str(self.state.device)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share: every ``world``-th item starting at ``rank``."""
        return list(items[self.rank :: self.world])

    def gather(self, items: list[Any]) -> list[Any]:
        """All ranks' items, on every rank (uneven lengths are fine)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
