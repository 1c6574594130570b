"""Data-parallel runs under ``torchrun`` / ``accelerate launch``: one shard of the tasks per process.

Launchers start one process per device and tell each its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :class:`DataParallel` reads those variables; with a world of more
than one process it connects to the launcher's key-value store (a ``torch.distributed`` ``TCPStore``, the one
``init_process_group`` would rendezvous through). The processes only need to synchronise (a barrier) and to exchange
small byte strings (JSON), never model tensors, so no process group is created: a gloo group's worker threads can
still be releasing a finished collective's tensors when the interpreter shuts down, which aborts the process
(``terminate called without an active exception``). The same code runs on CPU processes and on GPUs. Without the
launcher's variables it is a world of one and does nothing.

Task ``i`` belongs to rank ``i % world_size`` (the same rule as the ablation store's shards), so a data-parallel run
does exactly the per-task work of a single process, split; the results are merged in task order and are identical.
Objects travel as JSON bytes: nothing is pickled.
"""

from __future__ import annotations

import datetime
import json
import os
from types import TracebackType
from typing import Any

import torch

from at2_lens._validate import check_int, check_positive
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

    ``with DataParallel() as dp:`` connects to the launcher's store when ``WORLD_SIZE > 1``; on a normal exit rank 0
    waits until the others are done with the store, which it may be hosting.
    ``dp.rank``, ``dp.world_size``, ``dp.local_rank``, ``dp.is_main``; ``dp.shard(n)`` the task indices of this
    rank; ``dp.compose(shard_index, shard_count)`` combines an explicit sharding with the process's rank;
    ``dp.device(choice)`` the device for this process (``cuda:LOCAL_RANK`` when CUDA is available);
    ``dp.barrier()``; ``dp.gather_json(obj)`` every rank's JSON-able object, on every rank, in rank order.

    Args:
        env: the environment to read (default ``os.environ``).
        timeout_s: how long a barrier or gather waits for the other processes (default 24 h, so a fast shard
            can wait for a slow one at the end of a long collection).
    """

    def __init__(self, env: dict[str, str] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        env = dict(os.environ if env is None else env)
        self.world_size = _env_int(env, "WORLD_SIZE", 1)
        self.rank = _env_int(env, "RANK", 0)
        self.local_rank = _env_int(env, "LOCAL_RANK", self.rank if self.world_size > 1 else 0)
        check_int("environment variable WORLD_SIZE", self.world_size)
        check_int(f"environment variable RANK (WORLD_SIZE={self.world_size})", self.rank, minimum=0,
                  maximum=self.world_size - 1)
        check_int("environment variable LOCAL_RANK", self.local_rank, minimum=0)
        self.timeout_s = check_positive("timeout_s (seconds)", timeout_s)
        self._env = env
        self._store: Any = None
        self._generation = 0

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
        if self.is_distributed and self._store is None:
            import torch.distributed as dist

            if not dist.is_available():
                raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            addr = self._env.get("MASTER_ADDR", "").strip()
            if not addr:
                raise InputError("environment variable MASTER_ADDR: expected the launcher's store address "
                                 "(torchrun and accelerate launch set it), got nothing")
            port = _env_int(self._env, "MASTER_PORT", -1)
            if not 0 < port < 2**16:
                raise InputError(f"environment variable MASTER_PORT: expected a port in 1..65535, got "
                                 f"{self._env.get('MASTER_PORT')!r}")
            host = f"[{addr}]" if ":" in addr else addr  # an IPv6 address
            url = f"tcp://{host}:{port}?rank={self.rank}&world_size={self.world_size}"
            store, _, _ = next(dist.rendezvous(url, timeout=datetime.timedelta(seconds=self.timeout_s)))
            # Keys are unique per launcher restart and per ``with`` block (every rank enters the same sequence of
            # blocks): stale keys in a store that outlives a block never answer a later wait.
            prefix = f"at2_lens/{self._env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            session = store.add(f"{prefix}/sessions/{self.rank}", 1)
            self._store = dist.PrefixStore(f"{prefix}/{session}", store)
            self._generation = 0
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._store is not None:
            try:
                # Rank 0 may host the store (accelerate, a bare env:// launch): it leaves only after every other rank
                # has made its last request. After a failure the launcher stops the others; nothing is awaited.
                if exc_type is None and self.rank:
                    self._store.set(f"exit/{self.rank}", b"")
                elif exc_type is None:
                    self._store.wait([f"exit/{r}" for r in range(1, self.world_size)],
                                     datetime.timedelta(seconds=self.timeout_s))
            finally:
                self._store = None

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"

    # --- sharding and placement ---------------------------------------------------------------------------------
    def shard(self, n_tasks: int) -> list[int]:
        """The task indices in ``range(n_tasks)`` this rank handles: ``i % world_size == rank``."""
        check_int("n_tasks", n_tasks, minimum=0)
        return list(range(self.rank, n_tasks, self.world_size))

    def compose(self, shard_index: int, shard_count: int) -> tuple[int, int]:
        """Combine an explicit ``(shard_index, shard_count)`` (e.g. one per job) with this process's rank.

        Shard ``shard_index`` of ``shard_count`` is split again between the ``world_size`` processes, giving shard
        ``shard_index + shard_count * rank`` of ``shard_count * world_size``: the ``i % count`` rule then assigns
        every task to exactly one process of exactly one job.
        """
        check_int("shard_count", shard_count)
        check_int(f"shard_index (shard_count={shard_count})", shard_index, minimum=0, maximum=shard_count - 1)
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
        self.gather_bytes(b"")

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank (through the launcher's store; nothing pickled)."""
        if not isinstance(data, bytes):
            raise InputError(f"data: expected bytes, got {type(data).__name__}")
        if not self.is_distributed:
            return [data]
        if self._store is None:
            raise InputError("DataParallel: use it as a context manager (`with DataParallel() as dp:`) before "
                             "gathering or waiting in a world of more than one process")
        self._generation += 1
        keys = [f"{self._generation}/{r}" for r in range(self.world_size)]
        self._store.set(keys[self.rank], data)
        self._store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
        out = [bytes(self._store.get(k)) for k in keys]
        if self._store.add(f"{self._generation}/read", 1) == self.world_size:  # the last reader frees the values
            for k in keys:
                self._store.delete_key(k)
        return out

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able ``obj`` (floats round-trip exactly; NaN allowed), in rank order, on every rank."""
        try:
            data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise InputError(f"obj: expected a JSON-serialisable object ({exc})") from None
        return [json.loads(b.decode("utf-8")) for b in self.gather_bytes(data)]


__all__ = ["DEFAULT_TIMEOUT_S", "DataParallel"]
