"""BatchNorm.save / BatchNorm.load: .npz archives with a JSON config, no
pickle. Round trips over every option, and refusal of anything that is not a
valid layer file - each with a ValueError that says why."""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import bncore
from bncore import _layer_io
from conftest import make_input

VARIANTS = {
    "defaults": (bncore.BatchNorm2d, {}, (4, 3, 5, 5)),
    "keras-like": (bncore.BatchNorm2d, dict(decay=0.99, unbiased_running_var=False, eps=1e-3,
                                            axis=-1), (4, 5, 5, 3)),
    "scale-only": (bncore.BatchNorm1d, dict(center=False, activation="relu"), (8, 3)),
    "center-only": (bncore.BatchNorm1d, dict(scale=False, dtype=np.float64), (6, 3, 4)),
    "no-affine": (bncore.BatchNorm3d, dict(affine=False, momentum=None), (2, 3, 2, 3, 4)),
    "no-tracking": (bncore.BatchNorm, dict(track_running_stats=False,
                                           nonfinite="skip_update"), (3, 3, 2, 2, 2, 2)),
}


def _trained(cls, options, shape):
    bn = cls(3, **options)
    rng = np.random.default_rng(0)
    for key in ("weight", "bias"):
        if getattr(bn, key) is not None:
            getattr(bn, key)[:] = rng.normal(size=3)
    axis = options.get("axis", 1)
    for seed in range(3):
        bn(make_input(shape, bn.dtype, axis, kind="normal", seed=seed))
    return bn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip(variant, training, tmp_path):
    cls, options, shape = VARIANTS[variant]
    bn = _trained(cls, options, shape).train(training)
    path = tmp_path / "layer.bnc"  # any name; nothing is appended
    bn.save(path)
    assert os.listdir(tmp_path) == ["layer.bnc"]  # and no temporary file is left
    loaded = bncore.BatchNorm.load(path)
    assert type(loaded) is cls
    assert loaded.config() == bn.config()
    assert loaded.training == training
    assert repr(loaded) == repr(bn)
    state, want = loaded.state_dict(), bn.state_dict()
    assert list(state) == list(want)
    for key in want:
        assert state[key].dtype == want[key].dtype
        np.testing.assert_array_equal(state[key], want[key], err_msg=key)
    x = make_input(shape, bn.dtype, options.get("axis", 1), kind="normal", seed=9)
    np.testing.assert_array_equal(loaded(x), bn(x))  # same options: same bits
    if training and bn.track_running_stats:
        np.testing.assert_array_equal(loaded.running_var, bn.running_var)


def test_file_objects_and_plain_numpy(tmp_path):
    bn = _trained(*VARIANTS["keras-like"])
    buffer = io.BytesIO()
    bn.save(buffer)
    buffer.seek(0)
    assert bncore.BatchNorm2d.load(buffer).config() == bn.config()
    # an ordinary .npz archive: NumPy reads it without pickle
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as archive:
        config = json.loads(str(archive["bncore_config"]))
        np.testing.assert_array_equal(archive["running_mean"], bn.running_mean)
    assert config["class"] == "BatchNorm2d"
    assert config["format_version"] == _layer_io.FORMAT_VERSION
    assert config["bncore_version"] == bncore.__version__
    assert config["options"]["decay"] == 0.99
    assert config["options"]["dtype"] == "float32"


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "layer.npz"
    bncore.BatchNorm1d(2).save(path)
    bncore.BatchNorm1d(5).save(path)
    assert bncore.BatchNorm.load(path).num_features == 5


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and umask")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_file_gets_the_permissions_of_any_written_file(umask, tmp_path):
    previous = os.umask(umask)
    try:
        np.savez(tmp_path / "plain.npz", a=np.zeros(1))
        bncore.BatchNorm1d(3).save(tmp_path / "layer.npz")
    finally:
        os.umask(previous)
    want = 0o666 & ~umask
    assert os.stat(tmp_path / "plain.npz").st_mode & 0o777 == want  # the oracle
    assert os.stat(tmp_path / "layer.npz").st_mode & 0o777 == want
    assert sorted(os.listdir(tmp_path)) == ["layer.npz", "plain.npz"]


class _SingleRankComm:
    """A communicator of one process, standing in for MPI."""

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        np.copyto(recv, np.reshape(send, recv.shape))


def test_sync_batch_norm_saves_in_a_fresh_process(tmp_path):
    from bncore.distributed import SyncBatchNorm

    bn = SyncBatchNorm(3, comm=_SingleRankComm(), momentum=0.3)
    bn(make_input((4, 3, 2), np.float32, 1, kind="normal", seed=1))
    path = tmp_path / "sync.npz"
    bn.save(path)
    # A process that has not imported bncore.distributed, and cannot import
    # mpi4py, still knows the class (building it without MPI is the next
    # test's concern, so an ImportError from the constructor is let pass).
    script = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import bncore\n"
        "assert 'bncore.distributed' not in sys.modules\n"
        "try:\n"
        f"    print(type(bncore.BatchNorm.load({str(path)!r})).__name__)\n"
        "except ImportError as error:\n"  # raised by SyncBatchNorm.__init__
        "    print('SyncBatchNorm' if 'SyncBatchNorm' in str(error) else repr(error))\n"
    )
    # The bncore under test, wherever it is, in the child process too.
    root = os.path.dirname(os.path.dirname(os.path.abspath(bncore.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SyncBatchNorm"]


def test_sync_batch_norm_loads_without_mpi(tmp_path, monkeypatch):
    from bncore.distributed import SyncBatchNorm

    bn = SyncBatchNorm(3, comm=_SingleRankComm(), momentum=0.3)
    for seed in range(2):
        bn(make_input((4, 3, 2), np.float32, 1, kind="normal", seed=seed))
    path = tmp_path / "sync.npz"
    bn.save(path)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now fails
    loaded = bncore.BatchNorm.load(path)
    assert type(loaded) is SyncBatchNorm
    assert loaded.config() == bn.config() and loaded.training is True
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=key)


def test_lazy_layer_is_refused_until_materialized(tmp_path):
    bn = bncore.BatchNorm2d(None)
    with pytest.raises(RuntimeError, match="num_features=None"):
        bn.save(tmp_path / "lazy.npz")
    assert os.listdir(tmp_path) == []
    bn(np.ones((2, 4, 3, 3), np.float32))
    bn.save(tmp_path / "lazy.npz")
    assert bncore.BatchNorm.load(tmp_path / "lazy.npz").num_features == 4


def test_load_through_a_class_returns_that_class_or_refuses(tmp_path):
    path = tmp_path / "layer.npz"
    bncore.BatchNorm1d(3).save(path)
    assert type(bncore.BatchNorm1d.load(path)) is bncore.BatchNorm1d
    with pytest.raises(ValueError, match="holds a BatchNorm1d.*BatchNorm2d.load"):
        bncore.BatchNorm2d.load(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        bncore.BatchNorm.load(tmp_path / "nothing.npz")


# --------------------------------------------------------------------------
# Files that are not valid layer files


def _entries(bn=None):
    """The archive entries a valid file of ``bn`` has (config decoded)."""
    bn = bn if bn is not None else _trained(*VARIANTS["defaults"])
    buffer = io.BytesIO()
    bn.save(buffer)
    buffer.seek(0)
    with np.load(buffer) as archive:
        entries = {key: archive[key] for key in archive.files}
    return json.loads(str(entries.pop("bncore_config"))), entries


def _write(path, config, entries):
    np.savez(path, bncore_config=np.array(json.dumps(config)), **entries)
    return path


def _tamper_config(edit):
    def make(path):
        config, entries = _entries()
        edit(config)
        return _write(path, config, entries)
    return make


def _tamper_entries(edit):
    def make(path):
        config, entries = _entries()
        edit(entries)
        return _write(path, config, entries)
    return make


def _write_bytes(data):
    def make(path):
        path.write_bytes(data)
        return path
    return make


def _set(mapping, key, value):
    mapping[key] = value


def _pickled_entry(path):
    config, entries = _entries()
    entries["weight"] = np.array([{"evil": 1}, 2, 3], dtype=object)
    np.savez(path, bncore_config=np.array(json.dumps(config)), **entries)  # pickles it
    return path


def _other_npz(path):
    np.savez(path, weights=np.ones(3))
    return path


def _npy(path):
    with open(path, "wb") as f:  # np.save(path) would append ".npy"
        np.save(f, np.ones(3))
    return path


def _zip_without_arrays(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    return path


def _config_not_json(path):
    _, entries = _entries()
    np.savez(path, bncore_config=np.array("{not json"), **entries)
    return path


def _config_not_a_string(path):
    _, entries = _entries()
    np.savez(path, bncore_config=np.arange(3), **entries)
    return path


def _truncated(path):
    buffer = io.BytesIO()
    _trained(*VARIANTS["defaults"]).save(buffer)
    path.write_bytes(buffer.getvalue()[:200])
    return path


TAMPERED = {
    "text": (_write_bytes(b"hello, I am not a layer\n"), "not even a zip file"),
    "empty": (_write_bytes(b""), "not even a zip file"),
    "pickle": (_write_bytes(pickle.dumps({"weight": [1.0, 2.0]})), "not even a zip file"),
    "truncated": (_truncated, "not a readable NumPy .npz archive|cannot be read"),
    "npy": (_npy, "single NumPy array"),
    "other npz": (_other_npz, "no 'bncore_config'"),
    "zip without arrays": (_zip_without_arrays, "no 'bncore_config'"),
    "config not json": (_config_not_json, "not valid JSON"),
    "config not a string": (_config_not_a_string, "0-d string"),
    "wrong format": (_tamper_config(lambda c: _set(c, "format", "keras")), "format"),
    "newer version": (_tamper_config(lambda c: _set(c, "format_version", 99)),
                      "layer.npz' was written with layer format version 99.*upgrade bncore"),
    "version not int": (_tamper_config(lambda c: _set(c, "format_version", "1")),
                        "format_version"),
    "unknown class": (_tamper_config(lambda c: _set(c, "class", "LayerNorm")),
                      "'LayerNorm' is not a bncore layer class"),
    "no options": (_tamper_config(lambda c: c.pop("options")), "no 'options'"),
    "bad option": (_tamper_config(lambda c: _set(c["options"], "eps", -1.0)), "eps"),
    "unknown option": (_tamper_config(lambda c: _set(c["options"], "renorm", True)),
                       "renorm"),
    "missing option": (_tamper_config(lambda c: c["options"].pop("decay")),
                       r"lack \['decay'\]"),
    "lazy size": (_tamper_config(lambda c: _set(c["options"], "num_features", None)),
                  "num_features"),
    "training not bool": (_tamper_config(lambda c: _set(c, "training", "yes")),
                          "training"),
    "missing array": (_tamper_entries(lambda e: e.pop("running_var")),
                      r"missing \['running_var'\]"),
    "extra array": (_tamper_entries(lambda e: _set(e, "gamma", np.ones(3, np.float32))),
                    r"unexpected \['gamma'\]"),
    "wrong shape": (_tamper_entries(lambda e: _set(e, "bias", np.zeros(4, np.float32))),
                    r"'bias'.*shape \(4,\)"),
    "wrong dtype": (_tamper_entries(lambda e: _set(e, "weight", np.ones(3, np.float64))),
                    "'weight' is a float64"),
    "count not int": (_tamper_entries(lambda e: _set(e, "num_batches_tracked",
                                                     np.array(2.0))),
                      "num_batches_tracked"),
    "pickled entry": (_pickled_entry, "cannot be read|pickle"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_invalid_files_are_refused(case, tmp_path):
    make, message = TAMPERED[case]
    path = make(tmp_path / "layer.npz")
    with pytest.raises(ValueError, match=message):
        bncore.BatchNorm.load(path)


def test_a_negative_count_is_refused(tmp_path):
    config, entries = _entries()
    entries["num_batches_tracked"] = np.array(-1, np.int64)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bncore.BatchNorm.load(_write(tmp_path / "layer.npz", config, entries))


def test_the_untampered_file_loads(tmp_path):
    """The tampering helpers start from a file that loads: each refusal
    above is due to its one change."""
    config, entries = _entries()
    loaded = bncore.BatchNorm.load(_write(tmp_path / "layer.npz", config, entries))
    assert type(loaded) is bncore.BatchNorm2d
