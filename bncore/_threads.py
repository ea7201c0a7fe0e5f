"""How many threads a kernel call may use.

Precedence, first that applies: the call's ``num_threads=``, the innermost
``with bncore.num_threads(n):`` of the current thread or task, the value set
by ``bncore.set_num_threads(n)``, and OpenMP's own default, which follows
OMP_NUM_THREADS and threadpoolctl's ``threadpool_limits``.

The scoped setting lives in a ContextVar, so a service that limits one request
does not limit the requests running beside it.

libgomp (GCC's OpenMP runtime) keeps its worker threads in a pool. fork()
copies the pool's bookkeeping into the child but not the threads, so the
child's next parallel region waits forever for workers that do not exist
(measured: a child of a parent that ran a 2-thread kernel hangs on its own
first 2-thread kernel; tests/test_fork.py). A serial call never touches the
pool and works. So bncore remembers whether it ever asked for a team, and a
process forked after that runs every kernel on its calling thread, with one
warning. Other runtimes (LLVM's libomp) survive fork, but a serial child is
correct everywhere, and the results are bitwise the same for any thread
count. What bncore cannot see is a team started by another library on
libgomp (scikit-learn, say): there only spawn or forkserver helps.
"""

import contextlib
import contextvars
import operator
import os
import warnings
from collections.abc import Iterator

from . import _kernels

_scoped: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "bncore_num_threads", default=None
)
_process_default: int | None = None
_team_requested = False  # this process (or a parent before fork) asked for > 1 thread
_forked_after_team = False  # we are a child forked after that: stay serial
_warned_forked_serial = False


def _after_fork_in_child() -> None:
    global _forked_after_team
    if _team_requested:
        _forked_after_team = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _warn_forked_serial() -> None:
    global _warned_forked_serial
    if not _warned_forked_serial:
        _warned_forked_serial = True
        warnings.warn(
            "bncore: this process was forked after bncore had run OpenMP threads; "
            "libgomp cannot start threads in such a child (it would hang), so bncore "
            "runs single-threaded here. Use multiprocessing's 'spawn' or 'forkserver' "
            "start method for parallel kernels in child processes.",
            RuntimeWarning,
            stacklevel=4,
        )


def check_num_threads(n: object, name: str = "num_threads") -> int:
    """n as a positive int, or a clear TypeError / ValueError."""
    if isinstance(n, bool):
        raise TypeError(f"{name} must be a positive integer or None, got {n!r}")
    try:
        value = operator.index(n)  # type: ignore[arg-type]  # the except names n
    except TypeError:
        raise TypeError(
            f"{name} must be a positive integer or None, got {type(n).__name__}"
        ) from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def set_num_threads(n: int | None) -> None:
    """Set the process-wide default thread count; None returns to OpenMP's."""
    global _process_default
    _process_default = None if n is None else check_num_threads(n, "n")


def get_num_threads() -> int:
    """The thread count a call without ``num_threads=`` would use now."""
    n = _configured(None)
    return 1 if n > 1 and _forked_after_team else n


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Limit bncore to n threads inside the ``with`` block (this thread/task only)."""
    token = _scoped.set(check_num_threads(n, "n"))
    try:
        yield
    finally:
        _scoped.reset(token)


def resolve(requested: int | None) -> int:
    """The thread count for one kernel call, given its ``num_threads=``
    argument: 1 in a process forked after bncore had asked OpenMP for a team."""
    global _team_requested
    n = _configured(requested)
    if n > 1 and _kernels.OPENMP_ENABLED:
        if _forked_after_team:
            _warn_forked_serial()
            return 1
        _team_requested = True
    return n


def _configured(requested: int | None) -> int:
    """The thread count the settings ask for, by the precedence above."""
    if requested is not None:
        return check_num_threads(requested)
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _process_default is not None:
        return _process_default
    return max(1, _kernels.max_threads())
