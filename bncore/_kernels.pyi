"""Type stubs for the compiled layer (bncore/_kernels.pyx).

Every array is a C-contiguous NumPy array; x, y, dy, dx are float32 or
float64 (all the same dtype) holding outer * channels * inner values, the
per-channel arrays are float64 of length channels. Outputs are filled in
place. functional.py validates everything before calling these.
"""

import numpy as np
import numpy.typing as npt

OPENMP_ENABLED: bool
OPENMP_VERSION: int
COMPILER: str

_Floats = npt.NDArray[np.floating]
_F64 = npt.NDArray[np.float64]

def moments(x: _Floats, outer: int, channels: int, inner: int, mean: _F64, m2: _F64,
            num_threads: int) -> None: ...
def normalize(x: _Floats, y: _Floats, outer: int, channels: int, inner: int, mean: _F64,
              invstd: _F64, weight: _F64 | None, bias: _F64 | None,
              num_threads: int) -> None: ...
def train_forward(x: _Floats, y: _Floats, outer: int, channels: int, inner: int,
                  weight: _F64 | None, bias: _F64 | None, eps: float, mean: _F64, m2: _F64,
                  invstd: _F64, num_threads: int) -> None: ...
def backward(x: _Floats, dy: _Floats, dx: _Floats, outer: int, channels: int, inner: int,
             mean: _F64, invstd: _F64, weight: _F64 | None, training: bool,
             grad_weight: _F64, grad_bias: _F64, num_threads: int) -> None: ...
def max_threads() -> int: ...
