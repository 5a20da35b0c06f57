"""Running under ``torchrun``: ranks, exact slices, the process group and the end-of-extraction barrier.

``torchrun --nproc_per_node=N -m evalkit report CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each rank extracts one contiguous, unpadded slice of
the selected samples (:func:`slice_ranges`; never ``DistributedSampler``, which pads the last
shard by repeating samples) into the feature cache; rank 0 waits for every rank
(:meth:`Session.agree`), reads the slices back from the cache in dataset order and alone
embeds, scores and writes. No features travel through the process group: only a barrier and
one short status per rank. Without ``WORLD_SIZE > 1`` none of this runs.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from evalkit.errors import EvalkitError

#: Tests only: ``RANK`` or ``RANK:BATCHES``; that rank raises after that many batches (default 1).
FAIL_ENV = "EVALKIT_TEST_FAIL_RANK"

_current: Optional["Session"] = None  # the session of this process, while one is open
USED = False  # a process group was initialised in this process (the CLI then exits without finalization)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among torchrun's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def ranks_from_env(environ=None) -> Ranks:
    """:class:`Ranks` from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``."""
    env = os.environ if environ is None else environ

    def number(key: str, default: int) -> int:
        value = env.get(key)
        if value in (None, ""):
            return default
        try:
            return int(value)
        except ValueError:
            raise EvalkitError(f"environment variable {key}={value!r}: expected an integer (torchrun sets it)") from None

    world = number("WORLD_SIZE", 1)
    rank = number("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise EvalkitError(f"environment: RANK={rank} and WORLD_SIZE={world}; expected 0 <= RANK < WORLD_SIZE "
                           f"(torchrun sets both)")
    return Ranks(rank, world, number("LOCAL_RANK", 0), number("LOCAL_WORLD_SIZE", 1))


def slice_ranges(n: int, parts: int) -> list:
    """``[(start, stop), ...]``: ``parts`` contiguous ranges covering ``0..n`` exactly once.

    The first ``n % parts`` ranges hold one sample more; nothing is padded or repeated (a rank
    may get an empty range when ``n < parts``).
    """
    if parts < 1 or n < 0:
        raise ValueError(f"slice_ranges: n={n}, parts={parts}")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + base + (k < extra)
        out.append((start, stop))
        start = stop
    return out


def current() -> Optional["Session"]:
    """The open session of this process (under torchrun), else None."""
    return _current


def current_ranks() -> Ranks:
    return _current.ranks if _current is not None else Ranks()


class Session:
    """An initialised process group: gloo on CPU, NCCL on CUDA (``LOCAL_RANK`` picks the GPU)."""

    def __init__(self, ranks: Ranks, device_name: str = "auto", *, timeout_s: float = 3600.0):
        import datetime

        import torch
        import torch.distributed as dist

        self.ranks, self.timeout_s = ranks, float(timeout_s)
        use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
        if use_cuda:
            if ranks.local_rank >= torch.cuda.device_count():
                raise EvalkitError(f"{ranks}: LOCAL_RANK {ranks.local_rank} but only {torch.cuda.device_count()} "
                                   f"CUDA devices; start at most that many processes per machine")
            torch.cuda.set_device(ranks.local_rank)
            self.device = torch.device("cuda", ranks.local_rank)
        else:
            self.device = None  # extract.device decides (cpu, or mps)
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=self.timeout_s)
        kwargs = {"device_id": self.device} if use_cuda else {}
        try:
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        except TypeError:  # an older torch without device_id
            dist.init_process_group(backend, timeout=timeout)
        # statuses and the barrier go over gloo on the host even when features are on GPUs
        self.group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        self.backend = backend

    def map_device(self, device):
        """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if device is not None and device.type == "cuda" and self.device is not None:
            return self.device
        return device

    def agree(self, failure: Optional[BaseException], payload=None, *, what: str = "extraction") -> list:
        """Wait for every rank, then fail on every rank if any rank failed; else every rank's ``payload``.

        Each rank passes the exception that ended its part (None when it finished) and a small
        picklable ``payload`` (its throughput). A rank that failed re-raises its own exception
        after this returns; the others raise one line naming the failed rank. Waiting is a
        polled barrier, so Ctrl-C and torchrun's SIGTERM still reach Python; after
        ``timeout_s`` it gives up with a message.
        """
        import torch.distributed as dist

        self._barrier(what)
        mine = (None if failure is None else _one_line(failure), payload)
        gathered = [None] * self.ranks.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        failed = [(k, s) for k, (s, _) in enumerate(gathered) if s is not None]
        if not failed:
            return [p for _, p in gathered]
        # torchrun stops every rank as soon as one exits with an error: so each rank says its line
        # now, all wait until every line is out, and only then does any rank exit
        k, text = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        exc = failure
        if failure is None:
            exc = EvalkitError(f"rank {k} of {self.ranks.world_size} failed{more}: {text}; slices that finished are "
                               f"in the feature cache: rerun the same command to compute only the missing ones")
            if self.ranks.main:
                _say(f"evalkit: error: {exc}")
            exc.reported = True
        elif isinstance(failure, EvalkitError):
            _say(f"evalkit: error: {self.ranks}: {_one_line(failure)}")
            failure.reported = True
        with contextlib.suppress(Exception):
            self.timeout_s = min(self.timeout_s, 60.0)
            self._barrier("reporting the failure")
        raise exc

    def _barrier(self, what: str) -> None:
        import torch.distributed as dist

        from evalkit.interrupt import check_interrupted

        start = time.monotonic()
        try:
            work = dist.barrier(group=self.group, async_op=True)
            while not work.is_completed():
                if time.monotonic() - start > self.timeout_s:
                    raise EvalkitError(f"{self.ranks}: waited {self.timeout_s:.0f} s for the other ranks to finish "
                                       f"{what}; a rank died or is stuck (see its output); slices that finished are "
                                       f"in the feature cache: rerun the same command to compute only the missing "
                                       f"ones (extract.timeout_s sets the wait)")
                check_interrupted()  # torchrun's SIGTERM (another rank failed), or Ctrl-C
                time.sleep(0.05)
            work.wait()
        except EvalkitError:
            raise
        except RuntimeError as exc:  # gloo: a peer closed its connection (the rank died)
            reason = _one_line(exc).split(" This is typically")[0]  # gloo adds advice and an emoji
            raise EvalkitError(f"{self.ranks}: another rank stopped before finishing {what} ({reason}); "
                               f"slices that finished are in the feature cache: rerun the same command to compute "
                               f"only the missing ones") from None

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


@contextlib.contextmanager
def session(device_name: str = "auto", *, timeout_s: float = 3600.0):
    """A :class:`Session` under torchrun (``WORLD_SIZE > 1``), else None; closed on exit."""
    global _current, USED
    ranks = ranks_from_env()
    if not ranks.active:
        yield None
        return
    if _current is not None:  # nested (extract inside report): the outer session serves
        yield _current
        return
    USED = True
    s = Session(ranks, device_name, timeout_s=timeout_s)
    _current = s
    try:
        yield s
    finally:
        _current = None
        s.close()


def _say(line: str) -> None:
    """One line on stderr in one write, so lines from several ranks never interleave."""
    text = line.replace("\n", " ") + "\n"
    try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), text.encode("utf-8", "replace"))
    except (OSError, ValueError):  # a stderr without a file descriptor (captured)
        sys.stderr.write(text)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else exc.__class__.__name__
    return text if isinstance(exc, EvalkitError) else f"{exc.__class__.__name__}: {text}"


# --- tests only -------------------------------------------------------------------------------


class FailAfter:
    """Wraps a DataLoader; raises on the rank :data:`FAIL_ENV` names after that many batches.

    Only tests set the variable (a rank that dies mid-way); ``batch_size`` and ``dataset`` are
    passed through for :func:`evalkit.extract.run_layers`.
    """

    def __init__(self, loader, batches: int):
        self.loader, self.batches = loader, batches
        self.batch_size = getattr(loader, "batch_size", None)
        self.dataset = getattr(loader, "dataset", None)

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.batches:
                raise EvalkitError(f"{FAIL_ENV}: rank {current_ranks().rank} stops after {k} batches (a test)")
            yield batch


def maybe_fail(loader):
    """``loader``, or :class:`FailAfter` around it when :data:`FAIL_ENV` names this rank."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return loader
    rank, _, batches = spec.partition(":")
    if int(rank) != current_ranks().rank:
        return loader
    return FailAfter(loader, int(batches or 1))
