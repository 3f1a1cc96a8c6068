"""Hostile weights files: a file must never make the readers read another
file, and must hold finite numbers.

A tiny Keras model (Conv2D ``conv1``, BatchNormalization ``bn``, Dense
``fc``) is saved with Keras' own savers; each hostile variant rewrites one
dataset (or zip member) of a genuine file with h5py / zipfile. Every refusal
must be one line naming the file, the dataset or member and the reason, and
the secret's bytes, which sit in another file, must never come back. The
cases are built so that without their guard the secret *would* be read (an
absolute path, which HDF5's prefixes never rewrite).
"""

import io
import os
import shutil
import zipfile

import h5py
import keras
import numpy as np
import pytest

from translate import safe_files, weights_files
from translate.safe_files import UnsafeFileError

KERNEL = "layers/conv2d/vars/0"  # conv1's kernel in a .weights.h5
VARIANCE = "layers/batch_normalization/vars/3"  # bn's moving variance
KERNEL_SHAPE = (3, 3, 3, 4)
# Finite, distinctive values: were a guard missing, they would load cleanly.
SECRET = (np.arange(108, dtype=np.float32) + 4242.5).reshape(KERNEL_SHAPE)


def _tiny(name="tiny"):
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, keras.layers.Dense(2, name="fc")(x), name=name)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
  """Genuine files of the tiny model, and a secret: raw bytes and an HDF5
  file holding them, outside the weights' directory."""
  d = tmp_path_factory.mktemp("genuine")
  secret_dir = tmp_path_factory.mktemp("secret")
  model = _tiny()
  model.compile("adam", "mse")
  model.optimizer.build(model.trainable_variables)  # optimizer variables too
  out = {"dir": d, "secret_raw": str(secret_dir / "secret.bin"),
         "secret_h5": str(secret_dir / "secret.h5")}
  with open(out["secret_raw"], "wb") as f:
    f.write(SECRET.tobytes())
  with h5py.File(out["secret_h5"], "w") as f:
    f["kernel"] = SECRET
  out["weights.h5"] = str(d / "tiny.weights.h5")
  model.save_weights(out["weights.h5"])
  out["keras"] = str(d / "tiny.keras")
  model.save(out["keras"])
  out["h5"] = str(d / "tiny.h5")
  model.save(out["h5"])  # Keras 3's legacy whole-model saver
  keras.backend.clear_session()
  return out


def _assert_refused(path, *needles, model=True):
  """``read_weights_file`` and ``load_weights_file`` both refuse ``path``
  with one line holding ``needles``; nothing of the secret is returned or
  loaded."""
  with pytest.raises(UnsafeFileError) as e:
    weights_files.read_weights_file(path)
  message = str(e.value)
  assert "\n" not in message and str(path) in message, message
  for needle in needles:
    assert needle in message, message
  if model:
    target = _tiny()
    before = [v.numpy().copy() for v in target.weights]
    with pytest.raises(UnsafeFileError) as e2:
      weights_files.load_weights_file(target, path)
    assert str(e2.value) == message
    for v, b in zip(target.weights, before):
      np.testing.assert_array_equal(v.numpy(), b)  # nothing assigned
  return message


def _rewrite(genuine, tmp_path, name, make, source="weights.h5"):
  """A copy of a genuine file whose dataset ``name`` is replaced:
  ``make(group, leaf)`` creates the new link or dataset."""
  path = str(tmp_path / os.path.basename(genuine[source]))
  shutil.copy(genuine[source], path)
  parent, leaf = name.rsplit("/", 1)
  with h5py.File(path, "a") as f:
    del f[name]
    make(f[parent], leaf)
  return path


# Each hostile dataset: how to make it, what the refusal must say.
HOSTILE = {
    "external storage": (
        lambda g, leaf, s: g.create_dataset(
            leaf, KERNEL_SHAPE, "f4",
            external=[(s["secret_raw"], 0, SECRET.nbytes)]),
        ["external storage", "secret.bin"]),
    "external link": (
        lambda g, leaf, s: g.__setitem__(
            leaf, h5py.ExternalLink(s["secret_h5"], "/kernel")),
        ["external link", "secret.h5"]),
    "virtual dataset": (
        lambda g, leaf, s: g.create_virtual_dataset(leaf, _layout(s)),
        ["virtual dataset", "secret.h5"]),
    "soft link out of the file": (
        # /zz is an external link; the soft link is met first and named.
        lambda g, leaf, s: (g.__setitem__(leaf, h5py.SoftLink("/zz/kernel")),
                            g.file.__setitem__(
                                "zz", h5py.ExternalLink(s["secret_h5"],
                                                        "/"))),
        ["soft link", "/zz/kernel"]),
    "dangling soft link": (
        lambda g, leaf, s: g.__setitem__(leaf, h5py.SoftLink("/nowhere")),
        ["soft link", "/nowhere"]),
    "string dataset": (
        lambda g, leaf, s: g.create_dataset(leaf, data=[b"rm -rf", b"x"]),
        ["strings"]),
    "compound dataset": (
        lambda g, leaf, s: g.create_dataset(
            leaf, data=np.zeros(3, [("a", "f4"), ("b", "i4")])),
        ["compound"]),
    "object references": (
        lambda g, leaf, s: g.create_dataset(leaf, data=[g.file.ref],
                                            dtype=h5py.ref_dtype),
        ["object references"]),
    "plugin filter": (
        # bzip2 (307) is a plugin: reading would search HDF5_PLUGIN_PATH.
        lambda g, leaf, s: _plugin_filtered(g, leaf), ["filter 307"]),
}


def _layout(s):
  layout = h5py.VirtualLayout(KERNEL_SHAPE, "f4")
  layout[...] = h5py.VirtualSource(s["secret_h5"], "kernel", KERNEL_SHAPE)
  return layout


def _plugin_filtered(g, leaf):
  d = g.create_dataset(leaf, KERNEL_SHAPE, "f4", chunks=KERNEL_SHAPE,
                       compression=307, allow_unknown_filter=True)
  d.id.write_direct_chunk((0, 0, 0, 0), SECRET.tobytes())


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_dataset_is_refused(genuine, tmp_path, case):
  make, needles = HOSTILE[case]
  path = _rewrite(genuine, tmp_path, KERNEL,
                  lambda g, leaf: make(g, leaf, genuine))
  _assert_refused(path, "/" + KERNEL, "refused", *needles)


def test_hostile_dataset_in_a_legacy_h5_is_refused(genuine, tmp_path):
  make = HOSTILE["external storage"][0]
  path = _rewrite(genuine, tmp_path, "model_weights/conv1/conv1/kernel",
                  lambda g, leaf: make(g, leaf, genuine), source="h5")
  _assert_refused(path, "/model_weights/conv1/conv1/kernel",
                  "external storage")
  with pytest.raises(UnsafeFileError, match="external storage"):
    weights_files.model_config(path)  # read before any option is merged


def test_named_datatype_is_refused(genuine, tmp_path):
  path = str(tmp_path / "t.weights.h5")
  shutil.copy(genuine["weights.h5"], path)
  with h5py.File(path, "a") as f:
    f["layers/dtype"] = np.dtype("f4")
  _assert_refused(path, "/layers/dtype", "named datatype")


def test_shape_bomb_is_refused(genuine, tmp_path, monkeypatch):
  # A contiguous dataset never written stores 0 bytes and reads as its fill
  # value: the floor is lowered so the test declares 4 MiB, not gigabytes.
  monkeypatch.setattr(safe_files, "_DATASET_BOMB_FLOOR", 1 << 20)
  path = _rewrite(genuine, tmp_path, KERNEL, lambda g, leaf: g.create_dataset(
      leaf, (1 << 20,), "f4"))
  _assert_refused(path, "/" + KERNEL, "declares 4194304 bytes but stores 0",
                  "shape bomb")


def test_relative_external_name_does_not_resolve(genuine, tmp_path,
                                                 monkeypatch):
  """The second line: with the walk's check switched off, a relative
  external-storage name still resolves nowhere (``H5Pset_efile_prefix``
  under os.devnull); without the prefix HDF5 would read it from the working
  directory."""
  shutil.copy(genuine["secret_raw"], tmp_path / "secret.bin")
  monkeypatch.chdir(tmp_path)
  path = _rewrite(genuine, tmp_path, KERNEL, lambda g, leaf: g.create_dataset(
      leaf, KERNEL_SHAPE, "f4", external=[("secret.bin", 0, SECRET.nbytes)]))
  with h5py.File(path) as f:
    np.testing.assert_array_equal(f[KERNEL][()], SECRET)  # unguarded: read
  monkeypatch.setattr(safe_files, "_dataset_problem", lambda *a: None)
  with h5py.File(path) as f:
    with pytest.raises(OSError, match="external raw data file"):
      safe_files.read_array(f["layers/conv2d/vars"], "0", path)


def test_read_array_checks_on_its_own(genuine, tmp_path):
  """Opened without ``open_hdf5`` (no walk), ``read_array`` still refuses a
  dataset with external storage instead of reading the secret."""
  make = HOSTILE["external storage"][0]
  path = _rewrite(genuine, tmp_path, KERNEL,
                  lambda g, leaf: make(g, leaf, genuine))
  with h5py.File(path) as f:
    np.testing.assert_array_equal(f[KERNEL][()], SECRET)  # h5py reads it
    with pytest.raises(UnsafeFileError, match="external storage"):
      safe_files.read_array(f["layers/conv2d/vars"], "0", path)


@pytest.mark.parametrize("source,name", [
    ("weights.h5", KERNEL), ("h5", "model_weights/conv1/conv1/kernel")])
def test_reads_are_guarded_without_the_walk(genuine, tmp_path, monkeypatch,
                                            source, name):
  """Both readers read every array through ``read_array``: with the walk
  switched off, its own check still refuses external storage."""
  make = HOSTILE["external storage"][0]
  path = _rewrite(genuine, tmp_path, name,
                  lambda g, leaf: make(g, leaf, genuine), source=source)
  monkeypatch.setattr(safe_files, "_walk", lambda f, label: None)
  _assert_refused(path, "/" + name, "external storage")


@pytest.mark.parametrize("source,name,where,label", [
    ("weights.h5", KERNEL, "conv1/vars/0", ""),
    ("h5", "model_weights/conv1/conv1/kernel", "conv1/kernel", ""),
    ("keras", KERNEL, "conv1/vars/0", " (model.weights.h5)"),
])
def test_nan_kernel_is_refused(genuine, tmp_path, source, name, where, label):
  kernel = np.ones(KERNEL_SHAPE, np.float32)
  kernel.flat[[0, 5, 50]] = np.nan
  path = _rewrite_values(genuine, tmp_path, source, name, kernel)
  message = _assert_refused(path, f"weights file {path}{label} holds NaN in "
                            f"{where} (3 of 108 values)")
  assert "Inf" not in message


@pytest.mark.parametrize("source,name,where", [
    ("weights.h5", VARIANCE, "bn/vars/3"),
    ("h5", "model_weights/bn/bn/moving_variance", "bn/moving_variance"),
])
def test_inf_moving_variance_is_refused(genuine, tmp_path, source, name,
                                        where):
  path = _rewrite_values(genuine, tmp_path, source, name,
                         np.array([1, np.inf, 1, 1], np.float32))
  _assert_refused(path, f"holds Inf in {where} (1 of 4 values)")


def _rewrite_values(genuine, tmp_path, source, name, values):
  """A genuine file with dataset ``name`` holding ``values`` (in the zipped
  model.weights.h5 of a ``.keras``)."""
  if source != "keras":
    return _rewrite(genuine, tmp_path, name,
                    lambda g, leaf: g.create_dataset(leaf, data=values),
                    source=source)
  members = _members(genuine["keras"])
  h5 = io.BytesIO(members["model.weights.h5"])
  with h5py.File(h5, "a") as f:
    f[name][...] = values
  members["model.weights.h5"] = h5.getvalue()
  return _zip(tmp_path / "x.keras", members)


def test_check_finite_messages():
  a = np.zeros(10, np.float32)
  a[:2] = np.nan
  a[5] = -np.inf
  with pytest.raises(UnsafeFileError, match=r"^weights file f holds NaN and "
                     r"Inf in x/y \(2 NaN and 1 Inf of 10 values\)"):
    safe_files.check_finite("f", "x/y", a)
  safe_files.check_finite("f", "i", np.array([1, 2], np.int64))
  safe_files.check_finite("f", "b", np.array([True]))


def test_check_finite_sees_bfloat16(tmp_path):
  """Keras 3 saves bfloat16 variables as 2-byte opaque data tagged
  ``dtype="bfloat16"``: such a file passes the walk, and NaN/Inf in it are
  found from the bit patterns (as is ml_dtypes' own bfloat16)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  inputs = keras.Input((3,))
  model = keras.Model(inputs, keras.layers.Dense(2, name="fc",
                                                 dtype="bfloat16")(inputs))
  path = str(tmp_path / "bf16.weights.h5")
  model.save_weights(path)
  stored = weights_files.read_weights_file(path)["fc"]
  assert stored[0].dtype.itemsize == 2  # read as written: opaque bfloat16
  with h5py.File(path, "a") as f:
    f["layers/dense/vars/1"][...] = np.array([np.nan, np.inf],
                                             ml_dtypes.bfloat16)
  _assert_refused(path, "holds NaN and Inf in fc/vars/1", model=False)
  with pytest.raises(UnsafeFileError, match="holds Inf in t"):
    safe_files.check_finite("f", "t", np.array([1, np.inf],
                                               ml_dtypes.bfloat16))


def test_check_finite_tree_names_the_leaf():
  variables = {"params": {"conv1": {"kernel": np.ones(3, np.float32),
                                    "bias": np.array([0, np.nan])}},
               "batch_stats": {"bn": {"var": np.ones(2, np.float32)}}}
  with pytest.raises(UnsafeFileError, match=r"holds NaN in "
                     r"params/conv1/bias \(1 of 2 values\)"):
    safe_files.check_finite_tree("x.msgpack", variables)
  variables["params"]["conv1"]["bias"] = np.zeros(2)
  safe_files.check_finite_tree("x.msgpack", variables)


def _members(path):
  with zipfile.ZipFile(path) as z:
    return {i.filename: z.read(i) for i in z.infolist()}


def _zip(path, members, infos=()):
  """A zip of ``members`` (name -> bytes), stored as Keras writes them, plus
  ``infos``: (ZipInfo, bytes) pairs written as given."""
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
    for info, data in infos:
      z.writestr(info, data)
  return str(path)


def _patch_central(path, name, offset, value):
  """ORs ``value`` into the byte at ``offset`` of member ``name``'s
  central-directory entry (flags that zipfile cannot write)."""
  data = bytearray(open(path, "rb").read())
  i = data.index(b"PK\x01\x02")
  while data[i + 46:i + 46 + len(name)] != name.encode():
    i = data.index(b"PK\x01\x02", i + 1)
  data[i + offset] |= value
  open(path, "wb").write(bytes(data))


def _info(name, **attrs):
  info = zipfile.ZipInfo(name)
  for k, v in attrs.items():
    setattr(info, k, v)
  return info


@pytest.mark.parametrize("extra,needles", [
    (_info("../evil"), ["'../evil'", "'..' component"]),
    (_info("assets/../../evil"), ["'..' component"]),
    (_info("/etc/cron.d/x"), ["absolute path"]),
    (_info("assets\\..\\evil"), ["backslash"]),
    (_info("evil.py"), ["'evil.py'", "not a member Keras writes"]),
    (_info("config.json"), ["'config.json' appears twice"]),
    (_info("assets/link", external_attr=0o120777 << 16), ["symbolic link"]),
    (_info("assets/x"), ["encrypted"]),
    (_info("assets/y"), ["compression method 99"]),
])
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_hostile_keras_member_is_refused(genuine, tmp_path, extra, needles):
  path = _zip(tmp_path / "x.keras", _members(genuine["keras"]),
              [(extra, b"{}")])
  if "encrypted" in needles:
    _patch_central(path, extra.filename, 8, 0x1)  # general purpose flags
  if "compression method 99" in needles:
    _patch_central(path, extra.filename, 10, 99)  # compression method
  _assert_refused(path, "zip member", *needles)
  with pytest.raises(UnsafeFileError):
    weights_files.model_config(path)  # the CLI reads the config first


def test_zip_bomb_member_is_refused(genuine, tmp_path):
  members = _members(genuine["keras"])
  path = str(tmp_path / "bomb.keras")
  with zipfile.ZipFile(path, "w") as z:
    for name in ("metadata.json", "config.json"):
      z.writestr(name, members[name])
    with z.open(_info("model.weights.h5",
                      compress_type=zipfile.ZIP_DEFLATED), "w") as f:
      for _ in range(24):  # 24 MiB of zeros: about 24 KB deflated
        f.write(bytes(1 << 20))
  _assert_refused(path, "'model.weights.h5'", "zip bomb")


@pytest.mark.parametrize("cap,member", [("_ZIP_MAX_JSON", "config.json"),
                                        ("_ZIP_MAX_MEMBER",
                                         "model.weights.h5")])
def test_oversized_member_is_refused(genuine, monkeypatch, cap, member):
  """The absolute caps (64 MiB of JSON, 16 GiB otherwise), lowered here to
  1000 bytes: the genuine members are larger."""
  monkeypatch.setattr(safe_files, cap, 1000)
  size = len(_members(genuine["keras"])[member])
  _assert_refused(genuine["keras"], f"'{member}'",
                  f"declares {size} bytes (more than 1000)")


def test_member_read_is_bounded_by_its_header(genuine, monkeypatch):
  """A member stream longer than its header says is refused, and never read
  past the declared size plus one byte."""
  reads = []

  class Lying(io.BytesIO):
    def read(self, n=-1):
      reads.append(n)
      return super().read(n)

  real_open = zipfile.ZipFile.open
  monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info, *a: Lying(
      real_open(self, info).read() + bytes(1 << 20)))
  with pytest.raises(UnsafeFileError, match="not the .* its header declares"):
    weights_files.read_weights_file(genuine["keras"])
  assert reads and all(0 < n <= (1 << 20) for n in reads), reads


def test_external_storage_inside_a_keras_zip_is_refused(genuine, tmp_path):
  """The zipped model.weights.h5 is read from memory; an absolute external
  path in it would still be read from disk without the check."""
  members = _members(genuine["keras"])
  h5 = io.BytesIO(members["model.weights.h5"])
  with h5py.File(h5, "a") as f:
    del f[KERNEL]
    f.create_dataset(KERNEL, KERNEL_SHAPE, "f4", external=[(
        genuine["secret_raw"], 0, SECRET.nbytes)])
  members["model.weights.h5"] = h5.getvalue()
  path = _zip(tmp_path / "ext.keras", members)
  _assert_refused(path, f"{path} (model.weights.h5)", "/" + KERNEL,
                  "external storage")


def test_genuine_keras3_files_pass(genuine):
  """What Keras 3's savers write (optimizer variables included) passes every
  check and loads."""
  for source in ("weights.h5", "keras", "h5"):
    stored = weights_files.read_weights_file(genuine[source])
    assert sorted(stored) == ["bn", "conv1", "fc"], (source, sorted(stored))
    weights_files.load_weights_file(_tiny(), genuine[source])
  members = safe_files.read_keras_zip(genuine["keras"])
  assert set(members) == {"config.json", "model.weights.h5"}
  safe_files.check_hdf5(io.BytesIO(members["model.weights.h5"]), "x")


def test_genuine_tf_keras_files_pass(tmp_path):
  tf_keras = pytest.importorskip("tf_keras")
  inputs = tf_keras.Input((8, 8, 3))
  x = tf_keras.layers.Conv2D(4, 3, name="conv1")(inputs)
  x = tf_keras.layers.BatchNormalization(name="bn")(x)
  x = tf_keras.layers.GlobalAveragePooling2D()(x)
  model = tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="fc")(x))
  for name in ("tf.h5", "tf.weights.h5", "tf_weights_only.h5"):
    path = str(tmp_path / name)
    if name == "tf.h5":
      model.save(path)
    else:
      model.save_weights(path)
    safe_files.check_hdf5(path, path)
    stored = weights_files.read_weights_file(path)
    assert len(stored) == 3, (name, sorted(stored))
    weights_files.load_weights_file(_tiny(), path)


def _from_keras_refuses(path, *needles):
  """``translate.from_keras(path)`` (the whole-model route, no registered
  model) refuses ``path`` in one line naming it, before Keras loads it."""
  import translate  # pylint: disable=g-import-not-at-top
  with pytest.raises(UnsafeFileError) as e:
    translate.from_keras(path)
  message = str(e.value)
  assert "\n" not in message and str(path) in message, message
  for needle in needles:
    assert needle in message, message


def test_from_keras_refuses_external_storage_in_a_keras_zip(genuine,
                                                            tmp_path):
  members = _members(genuine["keras"])
  h5 = io.BytesIO(members["model.weights.h5"])
  with h5py.File(h5, "a") as f:
    del f[KERNEL]
    f.create_dataset(KERNEL, KERNEL_SHAPE, "f4", external=[(
        genuine["secret_raw"], 0, SECRET.nbytes)])
  members["model.weights.h5"] = h5.getvalue()
  _from_keras_refuses(_zip(tmp_path / "ext.keras", members),
                      "/" + KERNEL, "external storage")


def test_from_keras_refuses_an_external_link_in_a_whole_model_h5(genuine,
                                                                 tmp_path):
  make = HOSTILE["external link"][0]
  path = _rewrite(genuine, tmp_path, "model_weights/conv1/conv1/kernel",
                  lambda g, leaf: make(g, leaf, genuine), source="h5")
  _from_keras_refuses(path, "external link", "secret.h5")


@pytest.mark.parametrize("source,name,where", [
    ("keras", KERNEL, "conv1/kernel"),
    ("h5", "model_weights/bn/bn/moving_variance", "bn/moving_variance"),
])
def test_from_keras_refuses_non_finite_values(genuine, tmp_path, source,
                                              name, where):
  values = (np.full(KERNEL_SHAPE, np.nan, np.float32) if source == "keras"
            else np.array([1, np.inf, 1, 1], np.float32))
  path = _rewrite_values(genuine, tmp_path, source, name, values)
  _from_keras_refuses(path, f"in {where}")
