"""fork(): a process forked after bncore ran a parallel kernel must not hang.

libgomp keeps its worker threads in a pool that fork() copies as bookkeeping
only; a child that opens a parallel region of its own waits forever for
workers that do not exist (without bncore's guard, measured on GCC 12's
libgomp: the child's first 2-thread kernel on 98304 values hangs). bncore
therefore runs kernels serially in such a child, with a RuntimeWarning.

Each scenario runs in a fresh interpreter under a timeout, so a hang fails
the test instead of the test run.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")

SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import sys
    import warnings

    import numpy as np

    import bncore

    PARENT_THREADS = int(sys.argv[1])
    SHAPE = (4, 3, 128, 64)  # 98304 values: above the serial cutoff

    def data():
        rng = np.random.default_rng(0)
        return (rng.standard_normal(SHAPE) * 3 + 2).astype(np.float32)

    def child(queue):
        reported = bncore.get_num_threads()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = bncore.batch_norm(data(), training=True, num_threads=2)
            m, v = bncore.moments(data(), num_threads=2)
            bn = bncore.BatchNorm2d(3)
            bn(data())
            g = bn.backward(np.ones(SHAPE, np.float32))
        queue.put((y.tobytes(), m.tobytes(), g.tobytes(), [str(w.message) for w in caught],
                   reported))

    if __name__ == "__main__":
        x = data()
        expected = None
        if PARENT_THREADS:
            # the parent runs a parallel kernel first: libgomp's pool exists
            expected = bncore.batch_norm(x, training=True, num_threads=PARENT_THREADS)
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue,))
        proc.start()
        # read before join: a child exits only once its queue is drained
        try:
            y, m, g, messages, reported = queue.get(timeout=30)
        except Exception:
            proc.kill()
            print(f"HANG: the forked child gave no answer in 30 s (exit code {proc.exitcode})")
            sys.exit(3)
        proc.join(30)
        if proc.exitcode != 0:
            proc.kill()
            print(f"CHILD FAILED with exit code {proc.exitcode}")
            sys.exit(4)
        if expected is None:
            expected = bncore.batch_norm(x, training=True, num_threads=1)
        # bitwise the same as the parent's result: thread count never changes bits
        assert y == expected.tobytes(), "child's output differs"
        assert m == bncore.moments(x, num_threads=1)[0].tobytes(), "child's moments differ"
        bn = bncore.BatchNorm2d(3)
        bn(x)
        assert g == bn.backward(np.ones(SHAPE, np.float32)).tobytes(), "child's gradient differs"
        print("OK")
        print("THREADS:", reported)
        for message in messages:
            print("WARNING:", message)
    """
)


def _run(tmp_path, parent_threads):
    script = tmp_path / "fork_after_parallel.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    try:
        res = subprocess.run([sys.executable, str(script), str(parent_threads)],
                             capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired as e:  # pragma: no cover - the failure we guard against
        pytest.fail(f"the forking script hung (no answer in 60 s): {e.stdout!r} {e.stderr!r}")
    assert res.returncode == 0, f"rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    lines = res.stdout.splitlines()
    assert lines[0] == "OK", res.stdout
    warnings = [line for line in lines[1:] if line.startswith("WARNING:")]
    threads = int(lines[1].removeprefix("THREADS: "))
    return warnings, threads


@pytest.mark.parametrize("parent_threads", [2, 3])
def test_child_forked_after_parallel_kernel_works(tmp_path, parent_threads):
    warnings, threads = _run(tmp_path, parent_threads)
    from bncore import _kernels

    if _kernels.OPENMP_ENABLED:
        # the child ran serially, said so once, and reports it
        assert len(warnings) == 1, warnings
        assert "forked" in warnings[0] and "spawn" in warnings[0]
        assert threads == 1


def test_child_forked_before_any_parallel_kernel_is_not_limited(tmp_path):
    """Forking before the first parallel call is safe: the child's kernels
    keep their threads and nothing is said."""
    warnings, _ = _run(tmp_path, 0)
    assert warnings == []
