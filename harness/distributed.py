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


def resolve_device(requested: str, cuda_available: bool, device_count: int, local_rank: int = 0, world: int = 1,
                   mps_available: bool = False, key: str = "model.device") -> str:
    """The device this process runs ``model.device`` on, or a HarnessError naming the problem.

    The one place the harness decides a device, from the config and the machine (pure: the
    caller passes what torch sees). ``auto`` takes a GPU when there is one; ``cuda`` is the
    local rank's GPU (GPU 0 in a plain launch); ``cuda:N`` is GPU N as asked. Never a quiet
    fall back to the CPU: a device that is not there stops the run.
    """
    from .errors import HarnessError

    if requested == "cpu":
        return "cpu"
    if requested == "mps":
        if not mps_available:
            raise HarnessError(f"{key}: 'mps' asked for but torch sees no MPS device; use {key}=cpu or auto")
        return "mps"
    if requested == "auto" and not (cuda_available and device_count > 0):
        return "cpu"
    if not (cuda_available and device_count > 0):
        raise HarnessError(
            f"{key}: '{requested}' asked for but torch sees no CUDA device (a CPU build of torch, or no GPU); "
            f"use {key}=cpu, or install a CUDA build of torch (make setup)"
        )
    if requested in ("auto", "cuda"):
        if local_rank >= device_count:
            raise HarnessError(
                f"{key}: local rank {local_rank} has no GPU of its own ({device_count} visible); "
                "launch at most one process per GPU"
            )
        return f"cuda:{local_rank}"
    index = int(requested.split(":", 1)[1])  # the config admits only auto, cpu, mps, cuda, cuda:N
    if index >= device_count:
        raise HarnessError(
            f"{key}: '{requested}' asked for but torch sees {device_count} CUDA device(s) "
            f"(cuda:0 to cuda:{device_count - 1}); choose one of them"
        )
    if world > 1:
        raise HarnessError(
            f"{key}: '{requested}' would put every one of the {world} processes on one GPU; "
            f"use {key}=cuda (each local rank takes its own GPU)"
        )
    return requested


def local_device(requested: str, key: str = "model.device") -> str:
    """``resolve_device`` for this process, on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return resolve_device(
        requested, cuda, torch.cuda.device_count() if cuda else 0, int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")), torch.backends.mps.is_available(), key,
    )


class Distributor:
    def __init__(self, device: str = "auto"):
        from accelerate import PartialState

        # decided per run from the config: accelerate's state is a process-wide singleton whose
        # device is fixed by the first run of the process (a sweep may mix cpu and cuda entries)
        self._device = local_device(device)
        if self._device.startswith("cuda"):
            import torch

            torch.cuda.set_device(self._device)
        # accelerate picks gloo for a CPU run when told cpu=True
        self.state = PartialState(cpu=self._device == "cpu")

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
        return self._device

    def reset_device_peaks(self) -> None:
        """Start a run's device-memory peaks afresh on every visible GPU (a process runs many)."""
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)

    def device_peaks(self, devices) -> dict[str, int] | None:
        """Peak bytes allocated since ``reset_device_peaks`` on each GPU among ``devices``, all
        ranks together (``{"cuda:0": bytes, ...}``; ``dev@rankN`` where two ranks name one
        device, e.g. on two nodes); None when no rank's model is on a GPU."""
        import torch

        mine = {str(d): int(torch.cuda.max_memory_allocated(d)) for d in sorted({torch.device(x) for x in devices}, key=str)
                if d.type == "cuda"}
        merged: dict[str, int] = {}
        for rank, peaks in enumerate(self.gather([mine])):
            for dev, peak in peaks.items():
                merged[dev if dev not in merged else f"{dev}@rank{rank}"] = peak
        return merged or None

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
