"""What was built and what is running: versions, compiler, OpenMP."""

import os
import platform
import sys
from typing import TextIO, TypedDict

import numpy as np

from . import _kernels, _threads
from ._version import __version__

_OPENMP_LIBRARIES = {"libgomp": "GNU libgomp", "libiomp": "Intel libiomp", "libomp": "LLVM libomp"}


def loaded_openmp_runtimes() -> list[str]:
    """OpenMP runtime libraries mapped into this process (Linux), by file.

    Two different runtimes in one process (say libgomp beside MKL's libiomp)
    can crash or oversubscribe the cores; this is how to see them.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    found = []
    for path in sorted(paths):
        name = os.path.basename(path)
        for prefix, runtime in _OPENMP_LIBRARIES.items():
            if name.startswith(prefix + ".") or name.startswith(prefix + "-"):
                found.append(f"{runtime} ({path})")
                break
    return found


class BuildInfo(TypedDict):
    """What :func:`build_info` returns (one key per line of show_config)."""

    version: str
    python: str
    platform: str
    machine: str
    compiler: str
    vector_isa: str
    openmp: bool
    openmp_version: int
    openmp_runtimes: list[str]
    threads: int
    cpu_count: int | None
    numpy: str
    cython: str


def build_info() -> BuildInfo:
    """A dict describing this build of bncore and its environment."""
    try:
        import Cython
        cython_version = Cython.__version__
    except ImportError:
        cython_version = "not installed (only needed to build)"
    return {
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "compiler": _kernels.COMPILER,
        "vector_isa": _kernels.VECTOR_ISA,
        "openmp": _kernels.OPENMP_ENABLED,
        "openmp_version": _kernels.OPENMP_VERSION,
        "openmp_runtimes": loaded_openmp_runtimes(),
        "threads": _threads.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "cython": cython_version,
    }


def show_config(file: TextIO | None = None) -> None:
    """Print version, compiler, vector loops, OpenMP status and runtime,
    threads, NumPy and Cython."""
    info = build_info()
    openmp = (
        f"on (OpenMP {info['openmp_version']})" if info["openmp"]
        else "OFF: serial build, one core only"
    )
    runtimes = ", ".join(info["openmp_runtimes"]) or "none found"
    lines = [
        f"bncore {info['version']}",
        f"  python          {info['python']} on {info['platform']}",
        f"  compiler        {info['compiler']}",
        f"  vector loops    {info['vector_isa']}",
        f"  openmp          {openmp}",
        f"  openmp runtime  {runtimes}",
        f"  threads         {info['threads']} (of {info['cpu_count']} CPUs)",
        f"  numpy           {info['numpy']}",
        f"  cython          {info['cython']}",
    ]
    print("\n".join(lines), file=file or sys.stdout)
