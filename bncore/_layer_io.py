"""Saving and loading batch-norm layers as NumPy ``.npz`` archives.

A layer file is an ordinary ``.npz`` archive (``numpy.load`` opens it) with

* ``bncore_config``: a 0-d string array holding JSON: the format name and
  version, the bncore version that wrote it, the layer's class name, every
  constructor option (``BatchNorm.config()``) and its training flag;
* the layer's state dict, under PyTorch's keys: ``weight`` and ``bias``
  (when present), ``running_mean``, ``running_var`` in the layer's dtype,
  and ``num_batches_tracked`` as a 0-d int64 array.

Nothing is pickled, and files are read with ``allow_pickle=False``, so a
file cannot run code when loaded. Everything is checked before a layer is
returned: a file that is not a layer file, comes from a newer format, or
has missing, extra or misshapen entries raises ValueError.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import zipfile
from typing import IO, TYPE_CHECKING, Any, Union

import numpy as np

from ._version import __version__

if TYPE_CHECKING:
    from .modules import BatchNorm

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "save"]

#: Where save/load accept a file: a path or an open binary file.
PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]

#: The format's name, written into every file.
FORMAT = "bncore.BatchNorm"
#: Raised whenever the layout changes; files from a newer version are refused.
FORMAT_VERSION = 1
#: The archive entry that holds the JSON config.
CONFIG_KEY = "bncore_config"

#: Random names tried for the temporary file (64 random bits each: a clash is
#: all but impossible, so running out means something else is wrong).
_TEMPORARY_ATTEMPTS = 100

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, an empty zip
_NPY_MAGIC = b"\x93NUMPY"


def save(layer: BatchNorm, file: PathOrFile) -> None:
    """Write ``layer`` to ``file``: a path (used exactly as given, no
    ``.npz`` appended; written to a temporary file in the same directory
    and renamed, so an interrupted save leaves no half-written file) or a
    binary file object."""
    state = layer.state_dict()  # raises for a lazy layer that has no size yet
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bncore_version": __version__,
        "class": type(layer).__name__,
        "options": layer.config(),
        "training": layer.training,
    }
    entries: dict[str, Any] = {CONFIG_KEY: np.array(json.dumps(config, allow_nan=False)),
                               **state}
    if not isinstance(file, (str, os.PathLike)):
        np.savez(file, **entries)
        return
    path = os.fspath(file)
    handle, temporary = _create_temporary(os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **entries)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _create_temporary(directory: str) -> tuple[int, str]:
    """A new file in ``directory``, opened for writing: its descriptor and path.

    Created with mode 0o666 less the umask, as ``open()`` creates files,
    so the saved file gets the permissions any other written file gets
    (``tempfile.mkstemp`` would make it 0o600, private to its owner).
    ``O_EXCL`` makes the name ours alone; a random suffix keeps it free.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_TEMPORARY_ATTEMPTS):
        temporary = os.path.join(directory, f".bncore-{secrets.token_hex(8)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(
        f"could not create a temporary file in {directory!r}: {_TEMPORARY_ATTEMPTS} "
        "random names were all taken"
    )


def load(layer_class: type[BatchNorm], file: PathOrFile) -> BatchNorm:
    """Read a layer written by :func:`save`, as the class named in the
    file, which must be ``layer_class`` or one of its subclasses."""
    name = repr(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else "the file"
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as opened:  # a missing file stays FileNotFoundError
            return _load(layer_class, opened, name)
    return _load(layer_class, file, name)


def _load(layer_class: type[BatchNorm], file: IO[bytes], name: str) -> BatchNorm:
    def refuse(why: str) -> ValueError:
        return ValueError(f"{name} is not a valid bncore layer file: {why}")

    # A damaged archive can fail with any of these, when opened or when an
    # entry is read; every one means the same thing here.
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError)
    # np.load guesses the kind of file from its first bytes; look first, so
    # that anything but a zip archive gets a plain answer (np.load's own for
    # other bytes is an invitation to unpickle them).
    start = file.tell()
    magic = file.read(len(_NPY_MAGIC))
    file.seek(start)
    if magic.startswith(_NPY_MAGIC):
        raise refuse("it holds a single NumPy array (.npy), not a .npz archive")
    if not magic.startswith(_ZIP_MAGIC):
        raise refuse("it is not a NumPy .npz archive (not even a zip file)")
    try:
        archive = np.load(file, allow_pickle=False)
    except unreadable as error:
        raise refuse(f"it is not a readable NumPy .npz archive ({error})") from error
    with archive:
        if CONFIG_KEY not in archive.files:
            raise refuse(f"it has no {CONFIG_KEY!r} entry (an .npz archive from "
                         "something else?)")
        try:
            entries = {key: archive[key] for key in archive.files}
        except unreadable as error:
            raise refuse(f"an entry cannot be read ({error})") from error
    config = _parse_config(entries.pop(CONFIG_KEY), refuse, name)
    cls = _saved_class(layer_class, config["class"], refuse)
    options = config["options"]
    if not isinstance(options, dict):
        raise refuse(f"'options' must be a JSON object, got {options!r}")
    num_features = options.get("num_features")
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise refuse(f"options['num_features'] must be an integer, got {num_features!r}")
    training = config.get("training")
    if not isinstance(training, bool):
        raise refuse(f"'training' must be true or false, got {training!r}")
    try:
        layer = cls(**options)
    except (TypeError, ValueError) as error:
        raise refuse(f"its options do not make a {cls.__name__}: {error}") from error
    missing = sorted(layer.config().keys() - options.keys())
    if missing:
        raise refuse(f"its options lack {missing}")

    expected = set(layer._state_keys())
    missing, extra = sorted(expected - entries.keys()), sorted(entries.keys() - expected)
    if missing or extra:
        raise refuse(f"its arrays do not match the {cls.__name__} its options describe: "
                     f"missing {missing}, unexpected {extra}")
    for key, value in entries.items():
        want = np.dtype(np.int64) if key == "num_batches_tracked" else layer.param_dtype
        shape = () if key == "num_batches_tracked" else (layer.num_features,)
        if value.dtype != want or value.shape != shape:
            raise refuse(f"{key!r} is a {value.dtype} array of shape {value.shape}, "
                         f"expected {want} of shape {shape}")
    layer.load_state_dict(entries)
    return layer.train(training)


def _parse_config(value: np.ndarray, refuse: Any, name: str) -> dict[str, Any]:
    if value.dtype.kind != "U" or value.shape != ():
        raise refuse(f"{CONFIG_KEY!r} must be a 0-d string array, got a {value.dtype} "
                     f"array of shape {value.shape}")
    try:
        config = json.loads(str(value))
    except ValueError as error:
        raise refuse(f"{CONFIG_KEY!r} is not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else config
        raise refuse(f"its format is {found!r}, expected {FORMAT!r}")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise refuse(f"its format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{name} was written with layer format version {version} (by bncore "
            f"{config.get('bncore_version', '?')}); this bncore ({__version__}) reads "
            f"versions up to {FORMAT_VERSION}: upgrade bncore to load it"
        )
    for key in ("class", "options"):
        if key not in config:
            raise refuse(f"its config has no {key!r}")
    return config


def _saved_class(layer_class: type[BatchNorm], name: Any, refuse: Any) -> type[BatchNorm]:
    """The class called ``name`` among bncore's layers and their subclasses,
    which must be ``layer_class`` or a subclass of it."""
    # distributed defines SyncBatchNorm, whose files must load in a process
    # that has not imported it yet; importing the module needs no MPI (it
    # imports mpi4py inside functions only).
    from . import distributed  # noqa: F401
    from .modules import BatchNorm

    classes: dict[str, type[BatchNorm]] = {}
    pending: list[type[BatchNorm]] = [BatchNorm]
    while pending:
        cls = pending.pop()
        classes.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    if name not in classes:
        raise refuse(f"its class {name!r} is not a bncore layer class")
    cls = classes[name]
    if not issubclass(cls, layer_class):
        raise ValueError(f"the file holds a {name}, which {layer_class.__name__}.load "
                         f"cannot return: load it with {name}.load or BatchNorm.load")
    return cls
