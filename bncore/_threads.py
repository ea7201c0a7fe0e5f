"""How many threads a kernel call may use.

Precedence, first that applies: the call's ``num_threads=``, the innermost
``with bncore.num_threads(n):`` of the current thread or task, the value set
by ``bncore.set_num_threads(n)``, and OpenMP's own default, which follows
OMP_NUM_THREADS and threadpoolctl's ``threadpool_limits``.

The scoped setting lives in a ContextVar, so a service that limits one request
does not limit the requests running beside it.
"""

import contextlib
import contextvars
import operator

from . import _kernels

_scoped = contextvars.ContextVar("bncore_num_threads", default=None)
_process_default = None


def check_num_threads(n, name="num_threads"):
    """n as a positive int, or a clear TypeError / ValueError."""
    if isinstance(n, bool):
        raise TypeError(f"{name} must be a positive integer or None, got {n!r}")
    try:
        value = operator.index(n)
    except TypeError:
        raise TypeError(
            f"{name} must be a positive integer or None, got {type(n).__name__}"
        ) from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def set_num_threads(n):
    """Set the process-wide default thread count; None returns to OpenMP's."""
    global _process_default
    _process_default = None if n is None else check_num_threads(n, "n")


def get_num_threads():
    """The thread count a call without ``num_threads=`` would use now."""
    return resolve(None)


@contextlib.contextmanager
def num_threads(n):
    """Limit bncore to n threads inside the ``with`` block (this thread/task only)."""
    token = _scoped.set(check_num_threads(n, "n"))
    try:
        yield
    finally:
        _scoped.reset(token)


def resolve(requested):
    """The thread count for one call, given its ``num_threads=`` argument."""
    if requested is not None:
        return check_num_threads(requested)
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _process_default is not None:
        return _process_default
    return max(1, _kernels.max_threads())
