"""The little of torch.distributed that generation needs, and a one-process stand-in.

Launched by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` in the environment) ``connect`` joins the process
group — gloo on the CPU, nccl on CUDA — with a finite ``timeout``; otherwise it returns a one-process
``Comm``. An already initialised process group (a caller's) is used as it is and left open.

Collectives happen only at the start (two broadcasts, one all-gather). Ranks finish at different times
(round-robin shards do not take equal time), so the end is not a plain ``barrier`` that would time out on
a slow rank: every rank adds to two counters in the process group's key-value store (samples done, ranks
finished) and polls them. The wait fails when the counters stop moving for ``timeout`` seconds — a dead
rank — rather than after a fixed wall time; under torchrun a dead worker makes the agent stop the others
at once anyway, and rerunning the command resumes. (``torchrun --max-restarts`` reruns it too, but with gloo
on torch 2.13 the restarted workers often fail to reconnect, ``connectFullMesh`` refused, even for a plain
script, so a fresh torchrun is the reliable way.)
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from typing import Any, Callable, List, Optional

import torch

from ..core.checks import check_device


class Comm:
    """One rank's view of the job: ``rank``, ``world_size``, object collectives and shared counters."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: Optional[str] = None,
                 owns_group: bool = False, timeout: float = 1800.0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend, self.owns_group, self.timeout = backend, owns_group, timeout
        self.distributed = backend is not None
        self._store = None
        self._local = {}
        self._prefix = ""
        if self.distributed:
            from torch.distributed import distributed_c10d

            try:
                self._store = distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - no store: progress falls back to this rank's own count
                self._store = None

    # -- collectives (start of the run only) --------------------------------------------------------
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # -- counters -----------------------------------------------------------------------------------
    def start_counters(self) -> None:
        """Fresh counter names for this run (rank 0 picks them), so reruns in one job never collide."""
        self._prefix = self.broadcast(f"fastguide/generate/{uuid.uuid4().hex}/")

    def add(self, name: str, amount: int) -> int:
        """Add ``amount`` to the shared counter ``name``; returns its new value (this rank's own count when
        the job has no store)."""
        if self._store is not None:
            return int(self._store.add(self._prefix + name, int(amount)))
        self._local[name] = self._local.get(name, 0) + int(amount)
        return self._local[name]

    def wait_all_finished(self, on_progress: Callable[[int], None], poll: float = 0.2) -> None:
        """Mark this rank finished and wait for every rank, calling ``on_progress(done)`` with the global
        done counter while waiting. Raises ``TimeoutError`` when nothing moves for ``timeout`` seconds."""
        finished = self.add("finished", 1)
        if not self.distributed:
            return
        if self._store is None:  # cannot watch: a plain barrier (times out after the group's timeout)
            self.barrier()
            return
        last, last_change = None, time.monotonic()
        while finished < self.world_size:
            done = self.add("done", 0)
            state = (done, finished)
            if state != last:
                last, last_change = state, time.monotonic()
                on_progress(done)
            elif time.monotonic() - last_change > self.timeout:
                raise TimeoutError(f"rank {self.rank}: {self.world_size - finished} of {self.world_size} ranks "
                                   f"made no progress for {self.timeout:.0f} s (did a rank die?); rerun the same "
                                   f"command to resume")
            time.sleep(poll)
            finished = self.add("finished", 0)
        on_progress(self.add("done", 0))

    def barrier(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        if self.backend == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout), wait_all_ranks=True)
        else:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def launched_distributed() -> bool:
    """True under torchrun (or any launcher setting ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(device: str) -> torch.device:
    """``auto``: this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU; or a torch device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device("--device", device)
    if dev.type == "cuda":
        if torch.device(device).index is None:   # one GPU per rank, not the current device
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def connect(device: torch.device, timeout: float) -> Comm:
    """Join the torchrun job (gloo for CPU, nccl for CUDA), or a one-process ``Comm`` outside torchrun."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return Comm(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owns_group=False,
                    timeout=timeout)
    if not launched_distributed():
        return Comm(timeout=timeout)
    if not dist.is_available():
        raise RuntimeError("RANK/WORLD_SIZE are set but this torch has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    return Comm(dist.get_rank(), dist.get_world_size(), local, backend, owns_group=True, timeout=timeout)
