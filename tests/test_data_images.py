"""CIFAR-10 readers (on small archives written in the exact standard formats) and the synthetic image dataset."""

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cutegrad.data import (
    CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataLoader,
    SyntheticImages,
    collate_numpy,
    find_cifar10,
    read_cifar10,
    resolve_image_data,
)

PER_BATCH = 7  # the real files hold 10,000 images each; the layout is what matters


def make_batches(seed=0):
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {n: (rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8), rng.integers(0, 10, size=PER_BATCH).tolist()) for n in names}


def python_batch_bytes(name, data, labels):
    # Same keys and types as the published (Python 2) pickles: byte-string keys and names.
    d = {b"batch_label": f"{name} of 5".encode(), b"labels": labels, b"data": data, b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    return pickle.dumps(d, protocol=2)


def binary_batch_bytes(data, labels):
    return b"".join(bytes([lbl]) + row.tobytes() for row, lbl in zip(data, labels))


def write_python_dir(root, batches):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for n, (data, labels) in batches.items():
        (d / n).write_bytes(python_batch_bytes(n, data, labels))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane"] * 10}, protocol=2))
    return d


def write_binary_dir(root, batches):
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for n, (data, labels) in batches.items():
        (d / f"{n}.bin").write_bytes(binary_batch_bytes(data, labels))
    (d / "batches.meta.txt").write_text("airplane\nautomobile\n")
    return d


def write_tar(path, folder, files):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, raw in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def expected(batches, split):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    x = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32)
    y = np.concatenate([batches[n][1] for n in names]).astype(np.int64)
    return x, y


@pytest.mark.parametrize("layout", ["python-dir", "python-tar", "binary-dir", "binary-tar"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_readers(tmp_path, layout, split):
    batches = make_batches()
    if layout == "python-dir":
        write_python_dir(tmp_path, batches)
    elif layout == "binary-dir":
        write_binary_dir(tmp_path, batches)
    elif layout == "python-tar":
        files = {n: python_batch_bytes(n, *b) for n, b in batches.items()}
        write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    else:
        files = {f"{n}.bin": binary_batch_bytes(*b) for n, b in batches.items()}
        write_tar(tmp_path / "cifar-10-binary.tar.gz", "cifar-10-batches-bin", files)
    x, y = read_cifar10(tmp_path, split)
    ex, ey = expected(batches, split)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    # Pixel layout: row r of the file is [R plane | G plane | B plane], each 32x32 row-major.
    first = batches["data_batch_1" if split == "train" else "test_batch"][0][0]
    assert x[0, 1, 2, 3] == first[1024 + 2 * 32 + 3]


def test_cifar_dataset_normalises(tmp_path):
    batches = make_batches(1)
    write_python_dir(tmp_path, batches)
    ds = CIFAR10(tmp_path, "train")
    assert len(ds) == 5 * PER_BATCH
    ex, ey = expected(batches, "train")
    mean = np.array(CIFAR10_MEAN).reshape(3, 1, 1)
    std = np.array(CIFAR10_STD).reshape(3, 1, 1)
    x, y = ds[4]
    assert x.dtype == np.float32 and x.shape == (3, 32, 32)
    np.testing.assert_allclose(x, (ex[4] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    assert y == ey[4]
    bx, by = ds.get_batch(np.array([4, 0]))
    np.testing.assert_allclose(bx[0], x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(by, ey[[4, 0]])
    raw = CIFAR10(tmp_path, "test", normalize=False)
    np.testing.assert_allclose(raw[0][0], expected(batches, "test")[0][0] / 255.0, atol=1e-6)
    xb, yb = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate_numpy)))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == np.int64


def test_find_prefers_extracted_python(tmp_path):
    batches = make_batches()
    assert find_cifar10(tmp_path) is None
    write_binary_dir(tmp_path, batches)
    assert find_cifar10(tmp_path)[0] == "binary"
    d = write_python_dir(tmp_path, batches)
    assert find_cifar10(tmp_path) == ("python", d)
    assert find_cifar10(d) == ("python", d)  # pointing at the folder itself works too


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        read_cifar10(tmp_path)
    with pytest.raises(ValueError, match="split"):
        read_cifar10(tmp_path, "val")
    batches = make_batches()
    d = write_binary_dir(tmp_path / "bin", batches)
    (d / "data_batch_3.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(ValueError, match="whole number of 3073-byte records"):
        read_cifar10(tmp_path / "bin", "train")
    (d / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.bin is missing"):
        read_cifar10(tmp_path / "bin", "train")
    bad_label = binary_batch_bytes(batches["test_batch"][0], [12] * PER_BATCH)
    (d / "test_batch.bin").write_bytes(bad_label)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        read_cifar10(tmp_path / "bin", "test")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "cifar-10-python.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        read_cifar10(tmp_path / "junk")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    batches = make_batches()
    d = write_python_dir(tmp_path, batches)
    (d / "test_batch").write_bytes(pickle.dumps({"data": _Evil(), "labels": []}, protocol=2))
    with pytest.raises(ValueError, match="never contains"):
        read_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(pickle.dumps({b"nothing": 1}, protocol=2))
    with pytest.raises(ValueError, match="lacks the 'data' and 'labels'"):
        read_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(python_batch_bytes("t", np.zeros((3, 100), np.uint8), [0, 1, 2]))
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\]"):
        read_cifar10(tmp_path, "test")
    # A copy re-pickled under Python 3 (str keys) still reads.
    data, labels = batches["test_batch"]
    (d / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": labels}))
    np.testing.assert_array_equal(read_cifar10(tmp_path, "test")[1], labels)


# -- synthetic images ---------------------------------------------------------------------------


def test_synthetic_shapes_dtypes_and_defaults():
    train, test = SyntheticImages("train"), SyntheticImages("test")
    assert (len(train), len(test)) == (50_000, 10_000)
    x, y = train[13]
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64 and y == 3
    # (u8/255 - 0.5)/0.25 spans [-2, 2].
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6
    bx, by = train.get_batch(np.arange(20))
    assert bx.shape == (20, 3, 32, 32) and by.tolist() == [i % 10 for i in range(20)]
    with pytest.raises(IndexError):
        train[50_000]
    with pytest.raises(ValueError, match="split"):
        SyntheticImages("val")


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticImages("train", size=100, seed=5), SyntheticImages("train", size=100, seed=5, cache=False)
    for i in [0, 7, 99]:
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][0], a[i][0])  # second read comes from the cache
    c = SyntheticImages("train", size=100, seed=6)
    t = SyntheticImages("test", size=100, seed=5)
    assert not np.array_equal(a[0][0], c[0][0])
    assert not np.array_equal(a[0][0], t[0][0])
    # Rendering does not depend on which batch an index is fetched in.
    np.testing.assert_array_equal(SyntheticImages("train", 100, 5).get_batch(np.array([42, 3]))[0][0], b[42][0])


def _features(x):
    # Translation-invariant spatial features: the magnitude spectrum of the grey image.
    grey = x.mean(axis=1)
    return np.abs(np.fft.rfft2(grey)).reshape(len(x), -1)


def _ridge_accuracy(xtr, ytr, xte, yte):
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    a = np.hstack([a, np.ones((len(a), 1))])
    b = np.hstack([b, np.ones((len(b), 1))])
    w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ np.eye(10)[ytr])
    return float(((b @ w).argmax(1) == yte).mean())


def test_synthetic_classes_are_learnable_and_not_colour_coded():
    xtr, ytr = SyntheticImages("train", size=3000, seed=0).get_batch(np.arange(3000))
    xte, yte = SyntheticImages("test", size=1000, seed=0).get_batch(np.arange(1000))
    # A linear model on spectral features is far above chance (10%): the classes carry spatial signal.
    assert _ridge_accuracy(_features(xtr), ytr, _features(xte), yte) > 0.5
    # Mean colour alone carries almost none.
    colour_tr, colour_te = xtr.mean(axis=(2, 3)), xte.mean(axis=(2, 3))
    assert _ridge_accuracy(colour_tr, ytr, colour_te, yte) < 0.25


# -- choosing the vit data ----------------------------------------------------------------------


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    monkeypatch.delenv("CUTEGRAD_DATA", raising=False)
    monkeypatch.setenv("CUTEGRAD_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return tmp_path


def test_resolve_image_data_falls_back_to_synthetic(no_local_data):
    lines = []
    d = resolve_image_data(synthetic_train_size=30, synthetic_test_size=10, log=lines.append)
    assert d.name == "synthetic" and d.num_classes == 10
    assert (len(d.train), len(d.test)) == (30, 10)
    assert "CIFAR-10 not found" in lines[0]


@pytest.mark.parametrize("where", ["explicit", "env", "cache", "cwd_data"])
def test_resolve_image_data_finds_cifar(no_local_data, monkeypatch, where):
    root = {"explicit": no_local_data / "mine", "env": no_local_data / "env", "cache": no_local_data / "cache", "cwd_data": Path.cwd() / "data"}[where]
    write_binary_dir(root, make_batches())
    if where == "env":
        monkeypatch.setenv("CUTEGRAD_DATA", str(root))
    lines = []
    d = resolve_image_data(root if where == "explicit" else None, log=lines.append)
    assert d.name == "cifar10" and (len(d.train), len(d.test)) == (5 * PER_BATCH, PER_BATCH)
    assert "CIFAR-10 (binary format)" in lines[0] and str(root) in lines[0]


def test_resolve_image_data_explicit_path_must_hold_cifar(no_local_data):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
        resolve_image_data(no_local_data / "nothing-here", log=lambda m: None)
