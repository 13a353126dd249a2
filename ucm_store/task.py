"""Asynchronous store tasks: one Task per dump or load call, one future per block.

A task succeeds when every block succeeded. A failed block carries its id and the cause, so ``wait`` can say
which block failed and why; nothing is swallowed.
"""
import enum
import itertools
import logging
from concurrent.futures import Future, wait as wait_futures

logger = logging.getLogger(__name__)
_task_ids = itertools.count(1)


class TaskStatus(enum.IntEnum):
    """Outcome of a finished task (0 is success, as in UCM's C API)."""

    SUCCESS = 0
    FAILURE = 1


class Task:
    """A dump or load of several blocks in flight; ``failures`` maps block id -> cause once finished."""

    def __init__(self, kind: str, block_ids: list[bytes], futures: list[Future]):
        self.id = next(_task_ids)
        self.kind = kind
        self.block_ids = block_ids
        self._futures = futures
        self.failures: dict[bytes, str] = {}

    def __repr__(self) -> str:
        return f"Task(id={self.id}, kind={self.kind}, blocks={len(self.block_ids)})"

    def done(self) -> bool:
        """True once every block of the task has finished, successfully or not."""
        return all(f.done() for f in self._futures)

    def wait(self, timeout: float | None = None) -> TaskStatus:
        """Block until done (TimeoutError after ``timeout`` s); return SUCCESS or FAILURE."""
        if not self.wait_done(timeout):
            pending = sum(not f.done() for f in self._futures)
            raise TimeoutError(f"{self!r}: {pending} of {len(self._futures)} blocks unfinished after {timeout} s")
        return self._collect()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until done or ``timeout`` s have passed; whether it is done (``wait`` then returns at once)."""
        return not wait_futures(self._futures, timeout=timeout).not_done

    def _collect(self) -> TaskStatus:
        for block_id, future in zip(self.block_ids, self._futures):
            error = future.exception()
            if error is not None and block_id not in self.failures:
                self.failures[block_id] = f"{type(error).__name__}: {error}"
                logger.warning("task %d (%s) block %s failed: %s", self.id, self.kind, block_id.hex(), error)
        return TaskStatus.FAILURE if self.failures else TaskStatus.SUCCESS

    def describe_failures(self) -> str:
        """One line per failed block: its id (hex) and the cause."""
        return "\n".join(f"block {bid.hex()}: {cause}" for bid, cause in self.failures.items())


def finished_future(error: BaseException | None = None) -> Future:
    """A future already done (with ``error`` if given), for blocks that need no work."""
    future: Future = Future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future
