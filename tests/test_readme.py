"""Every ```python block of README.md runs.

Each block runs on its own, in order, in a fresh interpreter whose working
directory is an empty temporary folder and which imports bncore from this
checkout. A block fails the test on any exception, except when it needs an
optional package that is not installed (PyTorch, ONNX, mpi4py, Dask, ...),
or that is installed but fails to import here (mpi4py without an MPI
library): then it is skipped, naming the package. A block whose nearest non-blank
line above reads ``<!-- not-tested: reason -->`` is skipped with that
reason (shell sessions, MPI runs, anything that cannot run here).

Tracebacks point at README.md's own line numbers.
"""

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

#: Top-level modules a README block may need without bncore requiring them:
#: the extras of pyproject.toml and the frameworks bncore works beside. A
#: block importing one that is missing is skipped; a missing module not
#: listed here (a typo, a renamed bncore module) fails.
OPTIONAL_MODULES = frozenset({
    "dask", "flax", "jax", "keras", "matplotlib", "ml_dtypes", "mpi4py", "onnx",
    "onnxruntime", "scipy", "sklearn", "tensorflow", "threadpoolctl", "torch",
})

#: Exit status of the runner for "skipped: optional module missing".
SKIP_STATUS = 75

NOT_TESTED = re.compile(r"^\s*<!--\s*not-tested:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    index: int  #: 0, 1, ... among the python blocks, in order
    line: int  #: README line number of the block's first code line
    code: str
    not_tested: str | None  #: the reason given by a not-tested marker

    @property
    def id(self):
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")
        first = re.sub(r"[^\w.=()-]+", "_", first)[:40]
        return f"block{self.index}-line{self.line}-{first}"


def python_blocks(text):
    """The fenced python blocks of markdown ``text``, in order.

    A fence opens with three or more backticks (or tildes) and closes with a
    line of at least as many of the same character; an opening fence that is
    indented (inside a list) has that indentation removed from its lines.
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    previous = None  # the last non-blank line outside code blocks
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body = []
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            # Drop the fence's indentation (no more than the line has).
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip())):])
            i += 1
        if opening["info"].lower() in ("python", "py", "python3"):
            marker = NOT_TESTED.match(previous or "")
            start = i - len(body) + 1  # 1-based number of the first code line
            blocks.append(Block(len(blocks), start, "\n".join(body) + "\n",
                                marker["reason"] if marker else None))
        previous = None
        i += 1  # past the closing fence
    return blocks


#: Runs one block given as a file, with its README line numbers. Exits with
#: SKIP_STATUS, printing the module, when an optional module is the cause of
#: an ImportError (directly or as the cause of a library's own "install the
#: extra" ImportError) and is not installed; or when one that is installed
#: raised while being imported, from its own code: it cannot work here (mpi4py
#: without an MPI library raises RuntimeError("cannot load MPI library")).
RUNNER = r"""
import importlib.util, os, re, sys, traceback
path, first_line, status, optional = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
optional = optional.split(",")
source = "\n" * (first_line - 1) + open(path).read()

def missing_module(error):
    seen = error
    while seen is not None:
        name = (getattr(seen, "name", None) or "").partition(".")[0]
        if (isinstance(seen, ImportError) and name in optional
                and importlib.util.find_spec(name) is None):
            return name
        seen = seen.__cause__ or seen.__context__
    return None

def failing_import(error):
    # The block's line that raised imports an optional package, and the
    # error came from that package's own files.
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if frame.filename == "README.md"]
    if not ours or frames[-1].filename == "README.md":
        return None
    line = source.splitlines()[ours[-1].lineno - 1]
    imported = re.match(r"\s*(?:from|import)\s+(\w+)", line)
    name = imported and imported[1]
    if name not in optional:
        return None
    spec = importlib.util.find_spec(name)
    raised_in = os.path.realpath(frames[-1].filename)
    folders = (spec.submodule_search_locations or []) if spec else []
    return name if any(raised_in.startswith(os.path.realpath(f) + os.sep) for f in folders) else None

try:
    exec(compile(source, "README.md", "exec"), {"__name__": "__main__"})
except Exception as error:
    name = missing_module(error)
    if name is not None:
        print(f"optional module {name!r} is not installed")
        sys.exit(status)
    name = failing_import(error)
    if name is not None:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        print(f"optional module {name!r} cannot be imported here: {reason}")
        sys.exit(status)
    raise
"""


def run_block(code, first_line, cwd, timeout=300):
    """Run ``code`` as README lines from ``first_line`` on, in ``cwd``."""
    path = Path(cwd) / "readme_block.py"
    path.write_text(code)
    env = dict(os.environ)
    # This checkout first, before any installed bncore; no display for plots.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("MPLBACKEND", "Agg")
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(path), str(first_line), str(SKIP_STATUS),
         ",".join(sorted(OPTIONAL_MODULES))],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def check_block(block, cwd):
    if block.not_tested is not None:
        pytest.skip(f"README block marked not-tested: {block.not_tested}")
    result = run_block(block.code, block.line, cwd)
    if result.returncode == SKIP_STATUS:
        pytest.skip(f"README block at line {block.line}: {result.stdout.strip()}")
    assert result.returncode == 0, (
        f"README block at line {block.line} failed (exit status {result.returncode}):\n"
        f"{result.stderr}{result.stdout}"
    )


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    check_block(block, tmp_path)


def test_readme_has_python_blocks():
    # An empty parametrization would pass silently if parsing broke.
    assert any(block.not_tested is None for block in BLOCKS)


# --------------------------------------------------------------------------
# The harness itself.

SAMPLE = """\
Text.

```python
a = 1
```

<!-- not-tested: needs mpirun -->
```python
import mpi4py
```

```bash
pip install bncore
```

- In a list:

  ```python
  if True:
      b = 2
  ```

````python
s = '''
```
'''
````

<!-- not-tested: comment here -->

Text between marker and block.

~~~py
c = 3
~~~
"""


def test_python_blocks_are_found_with_their_markers():
    blocks = python_blocks(SAMPLE)
    assert [b.code for b in blocks] == [
        "a = 1\n", "import mpi4py\n", "if True:\n    b = 2\n", "s = '''\n```\n'''\n", "c = 3\n",
    ]
    assert [b.not_tested for b in blocks] == [None, "needs mpirun", None, None, None]
    assert [b.line for b in blocks] == [4, 9, 19, 24, 34]
    assert [b.index for b in blocks] == [0, 1, 2, 3, 4]
    assert SAMPLE.splitlines()[blocks[2].line - 1].strip() == "if True:"


def test_missing_optional_module_skips(tmp_path, monkeypatch):
    missing = "bncore_no_such_optional_module"
    monkeypatch.setattr(sys.modules[__name__], "OPTIONAL_MODULES",
                        OPTIONAL_MODULES | {missing})
    block = Block(0, 1, f"import numpy\nimport {missing}\n", None)
    with pytest.raises(pytest.skip.Exception, match=missing):
        check_block(block, tmp_path)
    # Also when a library wraps it in its own ImportError.
    wrapped = (f"try:\n    import {missing}\nexcept ImportError as e:\n"
               f"    raise ImportError('pip install bncore[extra]') from e\n")
    with pytest.raises(pytest.skip.Exception, match=missing):
        check_block(Block(0, 1, wrapped, None), tmp_path)


def _package_failing_on_import(folder, name):
    """A package in folder (the blocks' working directory, on their path)
    whose import raises as mpi4py's does without an MPI library."""
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(
        "raise RuntimeError('cannot load MPI library\\nlibmpi.so: no such file')\n")


def test_optional_module_that_cannot_load_here_skips(tmp_path, monkeypatch):
    name = "bncore_optional_without_its_library"
    _package_failing_on_import(tmp_path, name)
    monkeypatch.setattr(sys.modules[__name__], "OPTIONAL_MODULES", OPTIONAL_MODULES | {name})
    with pytest.raises(pytest.skip.Exception, match=f"{name}.*cannot load MPI library"):
        check_block(Block(0, 1, f"import numpy\nfrom {name} import MPI\n", None), tmp_path)


def test_other_module_that_cannot_load_fails(tmp_path):
    name = "bncore_not_optional_failing"
    _package_failing_on_import(tmp_path, name)
    with pytest.raises(AssertionError, match="failed"):
        check_block(Block(0, 1, f"import {name}\n", None), tmp_path)


@pytest.mark.parametrize("code", [
    pytest.param("import bncore_no_such_module\n", id="unknown-module"),
    pytest.param("from bncore import no_such_name\n", id="missing-name"),
    pytest.param("import numpy\nraise ImportError('something else')\n", id="bare-importerror"),
    pytest.param("import numpy as np\nassert np.sum([1]) == 2\n", id="assertion"),
])
def test_other_errors_fail(code, tmp_path):
    with pytest.raises(AssertionError, match="failed"):
        check_block(Block(0, 1, code, None), tmp_path)


def test_block_errors_point_at_readme_lines(tmp_path):
    result = run_block("x = 1\ny = 1 / 0\n", 40, tmp_path)
    assert result.returncode != 0
    assert 'File "README.md", line 41' in result.stderr


def test_blocks_use_this_checkout_in_a_fresh_folder(tmp_path):
    code = ("import os, bncore\nprint(os.path.dirname(os.path.dirname(bncore.__file__)))\n"
            "print(os.getcwd())\n")
    result = run_block(code, 1, tmp_path)
    assert result.returncode == 0, result.stderr
    package_root, cwd = result.stdout.splitlines()
    assert Path(package_root).resolve() == REPO
    assert Path(cwd).resolve() == tmp_path.resolve()
