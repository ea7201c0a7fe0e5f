"""bncore: fast, numerically stable batch normalization for CPUs."""

from ._config import show_config
from ._threads import get_num_threads, num_threads, set_num_threads
from ._version import __version__
from .folding import fold_into_conv, fold_into_linear, fold_preceding_into_linear
from .functional import (
    batch_norm,
    batch_norm_backward,
    fold_scale_shift,
    moments,
    release_memory,
)
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .stats import Moments, merge_moments, partial_moments

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Moments",
    "__version__",
    "batch_norm",
    "batch_norm_backward",
    "fold_into_conv",
    "fold_into_linear",
    "fold_preceding_into_linear",
    "fold_scale_shift",
    "get_num_threads",
    "merge_moments",
    "moments",
    "num_threads",
    "partial_moments",
    "release_memory",
    "set_num_threads",
    "show_config",
]
