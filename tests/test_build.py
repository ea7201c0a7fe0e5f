"""The build: OpenMP really compiled in, `python -m bncore` runs, show_config
reports what it should."""

import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import bncore
from bncore import _config


def _linux_gcc():
    if not sys.platform.startswith("linux"):
        return False
    compiler = str(_config.build_info().get("compiler", "")) + " " + str(
        sysconfig.get_config_var("CC") or "")
    return "gcc" in compiler.lower()


def test_build_info_keys():
    info = _config.build_info()
    assert isinstance(info, dict)
    assert isinstance(info["openmp"], bool)


def test_openmp_enabled():
    """A Linux/gcc build that silently lost OpenMP is a broken build; set
    BNCORE_ALLOW_SERIAL_BUILD=1 to accept a deliberately serial one."""
    if os.environ.get("BNCORE_ALLOW_SERIAL_BUILD") == "1":
        pytest.skip("serial build explicitly allowed")
    if not _linux_gcc():
        pytest.skip("OpenMP is only required on Linux with gcc")
    assert _config.build_info()["openmp"] is True, (
        "bncore was built without OpenMP; rebuild with a compiler that supports "
        "-fopenmp or set BNCORE_ALLOW_SERIAL_BUILD=1")


def test_show_config_reports_versions():
    buf = io.StringIO()
    saved = sys.stdout
    sys.stdout = buf
    try:
        bncore.show_config()
    finally:
        sys.stdout = saved
    text = buf.getvalue().lower()
    assert bncore.__version__ in text
    assert np.__version__ in text
    for word in ("openmp", "numpy", "cython", "thread", "compiler", "vector loops"):
        assert word in text, word


def test_python_m_bncore_runs():
    """`python -m bncore` (build info, self-check, quick speed report) exits 0;
    about a second on 2 cores."""
    res = subprocess.run([sys.executable, "-m", "bncore"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bncore" in res.stdout.lower()
    assert bncore.__version__ in res.stdout


ISA_ORDER = ("baseline", "AVX2", "AVX-512")


def _cpuinfo_isa():
    """The widest of bncore's vector loops this CPU can run, from the
    kernel's view of it (/proc/cpuinfo), not from the compiler's."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        else:
            return None
    if "avx512f" in flags:
        return "AVX-512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "baseline"


def test_vector_isa_is_the_widest_the_build_and_cpu_share():
    """The loops chosen at run time are the CPU's widest, capped by the
    build (BNCORE_NO_AVX512, BNCORE_NO_DISPATCH): a dispatch that silently
    fell back to narrower loops would halve the speed."""
    from bncore import _kernels

    info = _config.build_info()
    assert info["vector_isa"] == _kernels.VECTOR_ISA
    assert _kernels.VECTOR_ISA in ISA_ORDER and _kernels.VECTOR_ISA_CAP in ISA_ORDER
    if not (_linux_gcc() and os.path.exists("/proc/cpuinfo")
            and sysconfig.get_platform().endswith("x86_64")):
        pytest.skip("run-time dispatch is built with gcc on Linux x86-64 only")
    cpu = _cpuinfo_isa()
    if cpu is None:
        pytest.skip("/proc/cpuinfo lists no flags")
    expected = min(cpu, _kernels.VECTOR_ISA_CAP, key=ISA_ORDER.index)
    assert _kernels.VECTOR_ISA == expected
    if os.environ.get("BNCORE_NO_DISPATCH") == "1":
        assert _kernels.VECTOR_ISA_CAP == "baseline"
    elif os.environ.get("BNCORE_NO_AVX512") == "1":
        assert _kernels.VECTOR_ISA_CAP == "AVX2"


def _instructions_by_function(path):
    """{function name: its disassembled lines}, from objdump."""
    text = subprocess.run([shutil.which("objdump"), "-d", "--no-show-raw-insn", path],
                          capture_output=True, text=True, check=True).stdout
    functions, name = {}, None
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <([^>]+)>:$", line)
        if header:
            name = header.group(1)
            functions[name] = []
        elif name is not None:
            functions[name].append(line)
    return functions


def _prefetches_in(functions, prefix, instruction):
    return sum(line.split()[1:2] == [instruction]
               for name, lines in functions.items() if name.startswith(prefix)
               for line in lines)


def test_the_compiler_keeps_the_prefetches():
    """GCC 12 deletes calls to a function whose only statements are
    prefetches, taking it for one without effects: bncore's "into L1"
    prefetches were silently never issued that way. The helpers that ask
    for memory ahead must still hold their prefetch instructions in the
    built module (objdump; the static symbols of an unstripped build)."""
    from bncore import _kernels

    if not (_linux_gcc() and sysconfig.get_platform().endswith("x86_64")):
        pytest.skip("checked for gcc on Linux x86-64 builds")
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    functions = _instructions_by_function(_kernels.__file__)
    # The float32 pipelined loops (pipelined_item, or pipelined_runs where
    # it is not inlined, as at -O0).
    pipelined = "__pyx_fuse_0__pyx_f_6bncore_8_kernels_pipelined_"
    if not any(name.startswith(pipelined) for name in functions):
        pytest.skip("the module's static symbols are stripped")
    assert _prefetches_in(functions, pipelined, "prefetcht1") > 0
    # The statistics of blocks of short runs (bn_block_shifted_sums_f64,
    # or the callers it is inlined into).
    callers = ["__pyx_fuse_1__pyx_f_6bncore_8_kernels_" + name
               for name in ("planar_rows_moments", "block_moments", "shifted_runs_moments")]
    assert sum(_prefetches_in(functions, prefix, "prefetcht0")
               for prefix in ["bn_block_shifted_sums_f64"] + callers) > 0
    if _kernels.VECTOR_ISA_CAP == "baseline":
        return   # no dispatched loops: the statistics' row prefetch is not built
    assert _prefetches_in(functions, "bn_prefetch_rows_ahead", "prefetcht0") > 0
    # The wide-row loops of the statistics, and with AVX-512 of the
    # gradient sums (BNV_avx512_GRAD_ROWS_AHEAD).
    row_loops = ["bn_rows_shifted_sums_f32_avx"]
    if _kernels.VECTOR_ISA_CAP == "AVX-512":
        assert _prefetches_in(functions, "bn_block_shifted_sums_f32_avx512", "prefetcht0") > 0
        row_loops.append("bn_rows_grad_sums_f32_avx512")
    for loops in row_loops:
        calls = [line for name, lines in functions.items() if name.startswith(loops)
                 for line in lines if "call" in line and "bn_prefetch_rows_ahead" in line]
        assert calls, f"{loops}* no longer call bn_prefetch_rows_ahead"
