"""Type stubs for the compiled layer (bncore/_kernels.pyx).

Every array is a C-contiguous NumPy array; x, y, dy, dx are float32 or
float64 (all the same dtype) holding outer * channels * inner values, the
per-channel statistics the kernels fill are float64 of length channels;
weight, bias and running statistics may be float32 or float64. Outputs are filled in
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
def normalize(x: _Floats, y: _Floats, outer: int, channels: int, inner: int,
              running_mean: _Floats, running_var: _Floats, eps: float,
              weight: _Floats | None, bias: _Floats | None, num_threads: int,
              relu: bool = False) -> None: ...
def relu_mask(x: _Floats, dy: _Floats, out: _Floats, outer: int, channels: int, inner: int,
              mean: _F64, invstd: _F64, weight: _Floats | None, bias: _Floats | None,
              num_threads: int, above: float = 0.0) -> None: ...
def train_forward(x: _Floats, y: _Floats, outer: int, channels: int, inner: int,
                  weight: _Floats | None, bias: _Floats | None, eps: float, mean: _F64, m2: _F64,
                  invstd: _F64, num_threads: int, relu: bool = False) -> None: ...
def backward(x: _Floats, dy: _Floats, dx: _Floats, outer: int, channels: int, inner: int,
             mean: _F64, invstd: _F64, weight: _Floats | None, training: bool,
             grad_weight: _F64, grad_bias: _F64, num_threads: int) -> None: ...
def grad_sums(x: _Floats, dy: _Floats, outer: int, channels: int, inner: int, mean: _F64,
              sum_dy: _F64, sum_dy_dev: _F64, num_threads: int) -> None: ...
def grad_input(x: _Floats, dy: _Floats, dx: _Floats, outer: int, channels: int, inner: int,
               mean: _F64, invstd: _F64, weight: _Floats | None, sum_dy: _F64,
               sum_dy_dev: _F64, count: float, num_threads: int) -> None: ...
def max_threads() -> int: ...
def copy(x: _Floats, y: _Floats, stream: bool, num_threads: int) -> None: ...
def set_stream_min_bytes(nbytes: int) -> int: ...
def half_to_float(src: npt.NDArray[np.float16], dst: npt.NDArray[np.float32]) -> bool: ...
def float_to_half(src: npt.NDArray[np.float32], dst: npt.NDArray[np.float16]) -> bool: ...
