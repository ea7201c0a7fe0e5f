"""Build bncore's compiled kernels.

The kernels are Cython compiled with -O3 and OpenMP. Whether the compiler
supports OpenMP is found out by compiling and linking a tiny program, not by
guessing from the platform: where it does not (Apple clang without libomp),
a serial build is made with a loud warning, or refused when
BNCORE_REQUIRE_OPENMP=1.

Environment switches:
  BNCORE_REQUIRE_OPENMP=1  fail instead of falling back to a serial build
  BNCORE_DEBUG=1           bounds checking, wraparound checks and -O0 -g: a
                           checked build for CI, slow
  BNCORE_NATIVE=1          add -march=native (the binary then only runs on
                           CPUs like the build machine's; off by default)
  BNCORE_NO_DISPATCH=1     no AVX2 / AVX-512 clones of the inner loops, only
                           the baseline instruction set
  BNCORE_NO_AVX512=1       AVX2 and the baseline only: the library as a CPU
                           without AVX-512 runs it (to test and measure those
                           paths on one that has it)
"""

import os
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n > 0 && omp_get_max_threads() > 0);
        return 0;
    }
    """
)


def _flag_enabled(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _openmp_flags():
    """Compile and link flags for OpenMP, as found by compiling a probe."""
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple clang needs the preprocessor flag and a separately installed
        # libomp; the probe below tells whether it is there.
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _compiler_supports(compile_flags, link_flags):
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        binary = os.path.join(tmp, "probe")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        command = compiler.split() + compile_flags + [source, "-o", binary] + link_flags
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            result = subprocess.run([binary], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return result.stdout.strip() == b"1"


def openmp_build_flags():
    compile_flags, link_flags = _openmp_flags()
    if sys.platform == "win32" or _compiler_supports(compile_flags, link_flags):
        return compile_flags, link_flags
    message = (
        "bncore: the C compiler does not support OpenMP; building SERIAL kernels "
        "that use one core only. Install an OpenMP runtime (e.g. libomp) and "
        "rebuild for parallel kernels."
    )
    if _flag_enabled("BNCORE_REQUIRE_OPENMP"):
        raise SystemExit(message + " (BNCORE_REQUIRE_OPENMP=1 makes this an error)")
    banner = "*" * 78
    print(f"\n{banner}\n{message}\n{banner}\n", file=sys.stderr)
    return [], []


def build_extensions():
    debug = _flag_enabled("BNCORE_DEBUG")
    openmp_compile, openmp_link = openmp_build_flags()
    if sys.platform == "win32":
        optimise = ["/O2"]
    else:
        # -ffp-contract=off: no fused multiply-add behind our back, so the
        # vector body and the scalar tail of a loop round identically and
        # results do not depend on which instruction set the compiler chose.
        # Never -ffast-math: it breaks NaN handling and compensated sums.
        optimise = ["-O0", "-g"] if debug else ["-O3", "-ffp-contract=off"]
        if _flag_enabled("BNCORE_NATIVE"):
            optimise.append("-march=native")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "nonecheck": False,
        "embedsignature": True,
    }
    kernels = Extension(
        "bncore._kernels",
        sources=["bncore/_kernels.pyx"],
        include_dirs=[np.get_include(), "bncore"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
        + ([("BN_NO_DISPATCH", "1")] if _flag_enabled("BNCORE_NO_DISPATCH") else [])
        + ([("BN_NO_AVX512", "1")] if _flag_enabled("BNCORE_NO_AVX512") else []),
        extra_compile_args=optimise + openmp_compile,
        extra_link_args=openmp_link,
    )
    return cythonize([kernels], compiler_directives=directives, force=debug)


setup(ext_modules=build_extensions())
