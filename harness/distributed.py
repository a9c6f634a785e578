"""Distribution over processes: the only module that imports ``accelerate`` or reads the
launcher's variables (``RANK``, ``WORLD_SIZE``); the rest asks here.

Launched plainly, there is one process and everything here is the identity. Under ``torchrun``
or ``accelerate launch``, windows are sharded by *global* rank (so several nodes work too), each
process scores its shard, and the per-window records are gathered to every process; the
accumulation that follows is the same code as in a single process, so the record is the same.

Uneven work is padded: every rank gets the same number of items (the short ranks repeat an
item marked as padding), so every rank runs the same number of batches and can take part in
the per-batch gather that lets rank 0 alone write the resume log. The padding is dropped by
the caller. The automatic batch size uses accelerate's ``find_executable_batch_size``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence


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

    def shard_padded(self, items: Sequence[Any], pad: Callable[[Any], Any]) -> list[Any]:
        """This rank's share, padded with ``pad(items[0])`` to ``ceil(len(items) / world)`` items."""
        mine = self.shard(items)
        per_rank = -(-len(items) // self.world)
        if items and len(mine) < per_rank:
            mine += [pad(items[0])] * (per_rank - len(mine))
        return mine

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def gather(self, items: list[Any]) -> list[Any]:
        """All ranks' items, on every rank (uneven lengths are fine)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)

    def peak_device_memory(self) -> int | None:
        """Peak bytes allocated on this process's accelerator (None on CPU)."""
        import torch

        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    @staticmethod
    def versions() -> dict:
        import accelerate

        return {"accelerate": accelerate.__version__}

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def find_batch_size(probe: Callable[[int], Any], start: int) -> int:
    """The largest batch size from ``start`` down (x0.9 per step) for which ``probe`` runs out of
    memory on no rank; accelerate's ``find_executable_batch_size`` does the backing off."""
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=start)
    def attempt(batch_size: int) -> int:
        probe(batch_size)
        return batch_size

    return attempt()


class SingleProcess:
    """The distributor of code called outside a run (one process): everything is the identity,
    and nothing starts a process group or imports accelerate."""

    rank, world, is_main = 0, 1, True

    def gather(self, items: list[Any]) -> list[Any]:
        return list(items)

    def broadcast(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass


# What a launcher (torchrun, accelerate launch) tells each process, read before any process group
# exists: for decisions taken ahead of a Distributor (a sweep lets each run place its own model;
# only the main process reports an interrupt).


def world_size() -> int:
    """How many processes the launcher started (1 when launched plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Is this the global rank 0 (always, when launched plainly)?"""
    return int(os.environ.get("RANK", "0")) == 0
