"""Data-parallel runs under ``torchrun`` / ``accelerate launch``: one shard of the tasks per process.

Launchers start one process per device and tell each its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :class:`DataParallel` reads those variables; with a world of more
than one process it joins a ``torch.distributed`` process group on the **gloo** backend, which is only used to
synchronise (a barrier) and to gather small byte strings (JSON), never model tensors, so the same code runs on CPU
processes and on GPUs. Without those variables it is a world of one and does nothing.

Task ``i`` belongs to rank ``i % world_size`` (the same rule as the ablation store's shards), so a data-parallel run
does exactly the per-task work of a single process, split; the results are merged in task order and are identical.
Objects travel as JSON bytes in uint8 tensors: nothing is pickled.
"""

from __future__ import annotations

import datetime
import json
import os
from types import TracebackType
from typing import Any

import torch

from at2_lens.errors import InputError

DEFAULT_TIMEOUT_S = 24 * 3600.0  # a barrier waits for the slowest shard of a long collection


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    """An integer environment variable (``default`` if unset); InputError naming it if it is not an integer."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}: expected an integer, got {raw!r}") from None


class DataParallel:
    """This process's place in a data-parallel run, read from the launcher's environment; a context manager.

    ``with DataParallel() as dp:`` joins the process group when ``WORLD_SIZE > 1`` (gloo) and leaves it on exit.
    ``dp.rank``, ``dp.world_size``, ``dp.local_rank``, ``dp.is_main``; ``dp.shard(n)`` the task indices of this
    rank; ``dp.compose(shard_index, shard_count)`` combines an explicit sharding with the process's rank;
    ``dp.device(choice)`` the device for this process (``cuda:LOCAL_RANK`` when CUDA is available);
    ``dp.barrier()``; ``dp.gather_json(obj)`` every rank's JSON-able object, on every rank, in rank order.

    Args:
        env: the environment to read (default ``os.environ``).
        timeout_s: how long collectives (barriers) wait for the other processes (default 24 h, so a fast shard
            can wait for a slow one at the end of a long collection).
    """

    def __init__(self, env: dict[str, str] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        env = dict(os.environ if env is None else env)
        self.world_size = _env_int(env, "WORLD_SIZE", 1)
        self.rank = _env_int(env, "RANK", 0)
        self.local_rank = _env_int(env, "LOCAL_RANK", self.rank if self.world_size > 1 else 0)
        if self.world_size < 1:
            raise InputError(f"environment variable WORLD_SIZE: expected >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"environment variable RANK: expected 0 <= RANK < WORLD_SIZE={self.world_size}, "
                             f"got {self.rank}")
        if self.local_rank < 0:
            raise InputError(f"environment variable LOCAL_RANK: expected >= 0, got {self.local_rank}")
        if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise InputError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._joined = False

    # --- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the process that merges, prints and writes summaries)."""
        return self.rank == 0

    def __enter__(self) -> DataParallel:
        if self.is_distributed:
            import torch.distributed as dist

            if not dist.is_available():
                raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if not dist.is_initialized():
                dist.init_process_group(
                    "gloo", rank=self.rank, world_size=self.world_size,
                    timeout=datetime.timedelta(seconds=self.timeout_s),
                )
                self._joined = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._joined:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._joined = False

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"

    # --- sharding and placement ---------------------------------------------------------------------------------
    def shard(self, n_tasks: int) -> list[int]:
        """The task indices in ``range(n_tasks)`` this rank handles: ``i % world_size == rank``."""
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 0:
            raise InputError(f"n_tasks: expected an integer >= 0, got {n_tasks!r}")
        return list(range(self.rank, n_tasks, self.world_size))

    def compose(self, shard_index: int, shard_count: int) -> tuple[int, int]:
        """Combine an explicit ``(shard_index, shard_count)`` (e.g. one per job) with this process's rank.

        Shard ``shard_index`` of ``shard_count`` is split again between the ``world_size`` processes, giving shard
        ``shard_index + shard_count * rank`` of ``shard_count * world_size``: the ``i % count`` rule then assigns
        every task to exactly one process of exactly one job.
        """
        for name, value, low in (("shard_count", shard_count, 1), ("shard_index", shard_index, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name}: expected an integer >= {low}, got {value!r}")
        if shard_index >= shard_count:
            raise InputError(f"shard_index: expected 0 <= shard_index < shard_count={shard_count}, got {shard_index}")
        return shard_index + shard_count * self.rank, shard_count * self.world_size

    def device(self, choice: str = "auto") -> torch.device:
        """The device this process runs its model on.

        ``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available (one GPU per process on each node), else CPU.
        ``"cpu"``, ``"cuda"`` (= ``cuda:LOCAL_RANK``) or an explicit ``"cuda:N"`` are taken as given.
        """
        if not isinstance(choice, str) or not choice:
            raise InputError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {choice!r}")
        if choice == "auto":
            choice = "cuda" if torch.cuda.is_available() else "cpu"
        if choice == "cuda":
            if not torch.cuda.is_available():
                raise InputError("device: 'cuda' was requested but CUDA is not available")
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise InputError(f"device: LOCAL_RANK={self.local_rank} but this node has only {n} CUDA devices; "
                                 "start at most one process per GPU (--nproc_per_node)")
            return torch.device("cuda", self.local_rank)
        try:
            return torch.device(choice)
        except RuntimeError:
            raise InputError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {choice!r}") from None

    # --- collectives --------------------------------------------------------------------------------------------
    def barrier(self) -> None:
        """Wait until every process gets here (no-op for a world of one)."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank (uint8 tensors over gloo; nothing pickled)."""
        if not isinstance(data, bytes):
            raise InputError(f"data: expected bytes, got {type(data).__name__}")
        if not self.is_distributed:
            return [data]
        import torch.distributed as dist

        length = torch.tensor([len(data)], dtype=torch.int64)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(lengths, length)
        size = max(int(n.item()) for n in lengths)
        buf = torch.zeros(max(size, 1), dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.zeros_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf)
        return [bytes(b[: int(n.item())].numpy().tobytes()) for b, n in zip(bufs, lengths, strict=True)]

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able ``obj`` (floats round-trip exactly; NaN allowed), in rank order, on every rank."""
        try:
            data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise InputError(f"obj: expected a JSON-serialisable object ({exc})") from None
        return [json.loads(b.decode("utf-8")) for b in self.gather_bytes(data)]


__all__ = ["DEFAULT_TIMEOUT_S", "DataParallel"]
