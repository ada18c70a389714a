"""cutegrad.save / cutegrad.load of flat state dicts (and the save_file layer under them): interchange with safetensors.torch, atomic writes, corrupt files."""
import json
import os
import stat

import numpy as np
import pytest

import cutegrad
from cutegrad.io import SafetensorsError, load_metadata
from cutegrad.io import safetensors_file

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
SHAPES = [(3, 5), (7,), (), (2, 0, 3), (1, 1, 4), (2, 3, 5)]


def _random_array(dtype_name, shape, rng):
    """Random bit patterns: floats include NaNs with payloads, infinities, -0 and subnormals."""
    npd = getattr(cutegrad, dtype_name).np
    if dtype_name == "bool":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    n = int(np.prod(shape)) * npd.itemsize
    return np.frombuffer(rng.bytes(n), dtype=np.uint8).view(npd).reshape(shape).copy()


def _cg_bytes(t):
    return np.ascontiguousarray(t.detach().numpy()).reshape(-1).view(np.uint8).tobytes()


def _torch_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _torch_dtype(name):
    return getattr(torch, name)


def _torch_tensor(arr, dtype_name):
    if dtype_name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


def test_cutegrad_to_torch_every_dtype_bit_identical(tmp_path):
    rng = np.random.default_rng(0)
    sd = {f"{d}_{i}": cutegrad.from_numpy(_random_array(d, s, rng)) for d in DTYPES for i, s in enumerate(SHAPES)}
    path = tmp_path / "cg.safetensors"
    cutegrad.save(sd, path)
    back = st.load_file(str(path))
    assert set(back) == set(sd)
    for name, t in sd.items():
        assert back[name].dtype == _torch_dtype(t.dtype.name), name
        assert tuple(back[name].shape) == tuple(t.shape), name
        assert _torch_bytes(back[name]) == _cg_bytes(t), name


def test_torch_to_cutegrad_every_dtype_bit_identical(tmp_path):
    rng = np.random.default_rng(1)
    sd = {}
    for d in DTYPES:
        for i, s in enumerate(SHAPES):
            sd[f"{d}_{i}"] = _torch_tensor(_random_array(d, s, rng), d)
    path = tmp_path / "torch.safetensors"
    st.save_file(sd, str(path))
    for mmap in (False, True):
        back = cutegrad.load(path, mmap=mmap)
        assert set(back) == set(sd)
        for name, t in sd.items():
            assert back[name].dtype is getattr(cutegrad, str(t.dtype).split(".")[1]), name
            assert tuple(back[name].shape) == tuple(t.shape), name
            assert _cg_bytes(back[name]) == _torch_bytes(t), name


def test_non_contiguous_and_offset_views_are_written_contiguously(tmp_path):
    base = cutegrad.from_numpy(np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    views = {
        "transposed": base.transpose(0, 2),
        "strided": base[:, ::2, 1::3],
        "offset": base[1],
        "expanded": cutegrad.from_numpy(np.arange(3, dtype=np.int64)).unsqueeze(0).expand(4, 3),
        "bf16_t": base.to(cutegrad.bfloat16).permute(2, 0, 1),
    }
    path = tmp_path / "views.safetensors"
    cutegrad.save(views, path)
    back = st.load_file(str(path))
    for name, v in views.items():
        ref = np.ascontiguousarray(v.numpy())
        got = back[name]
        if name == "bf16_t":
            got = got.view(torch.int16).numpy().view(cutegrad.bfloat16.np)
        else:
            got = got.numpy()
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_tensor_requiring_grad_is_saved_as_its_values(tmp_path):
    w = cutegrad.from_numpy(np.linspace(-1, 1, 6, dtype=np.float32)).requires_grad_()
    cutegrad.save({"w": w}, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(st.load_file(str(tmp_path / "w.safetensors"))["w"].numpy(), w.detach().numpy())


def test_metadata_both_ways(tmp_path):
    from safetensors import safe_open
    meta = {"format": "pt", "step": "120", "note": "ünïcode ✓"}
    p = tmp_path / "m.safetensors"
    cutegrad.save({"x": cutegrad.ones(2)}, p, metadata=meta)
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == meta
    assert load_metadata(p) == meta
    q = tmp_path / "m2.safetensors"
    st.save_file({"x": torch.ones(2)}, str(q), metadata={"made_by": "torch"})
    assert load_metadata(q) == {"made_by": "torch"}
    cutegrad.save({"x": cutegrad.ones(2)}, tmp_path / "none.safetensors")
    assert load_metadata(tmp_path / "none.safetensors") == {}


def test_layout_follows_the_reference_writer(tmp_path):
    sd = {"b_u8": cutegrad.ones(3, dtype=cutegrad.uint8), "a_f64": cutegrad.ones(1, dtype=cutegrad.float64),
          "c_f16": cutegrad.ones(5, dtype=cutegrad.float16), "a_f32": cutegrad.ones(2)}
    p = tmp_path / "layout.safetensors"
    cutegrad.save(sd, p)
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    order = sorted((v["data_offsets"][0], k) for k, v in header.items())
    assert [k for _, k in order] == ["a_f64", "a_f32", "c_f16", "b_u8"]
    for k, v in header.items():
        assert v["data_offsets"][0] % sd[k].element_size() == 0


def test_files_are_byte_identical_to_the_reference_writer(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {f"{name}{d}": _random_array(d, shape, rng)
              for d in DTYPES for name, shape in (("w_", (3, 2)), ("b_", (5,)), ("é_", (0, 2)), ("s_", ()))}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    cutegrad.save({k: cutegrad.from_numpy(a) for k, a in arrays.items()}, ours, metadata={"format": "pt"})
    st.save_file({k: _torch_tensor(a, k.split("_", 1)[1]) for k, a in arrays.items()}, str(theirs),
                 metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_empty_state_dict_round_trips(tmp_path):
    p = tmp_path / "empty.safetensors"
    cutegrad.save({}, p)
    assert st.load_file(str(p)) == {}
    assert cutegrad.load(p) == {}
    st.save_file({}, str(tmp_path / "empty_torch.safetensors"))
    assert cutegrad.load(tmp_path / "empty_torch.safetensors") == {}


def test_loaded_tensors_are_independent_and_writable(tmp_path):
    p = tmp_path / "w.safetensors"
    cutegrad.save({"a": cutegrad.zeros(4), "b": cutegrad.zeros(4)}, p)
    one, two = cutegrad.load(p), cutegrad.load(p)
    one["a"].fill_(3.0)
    assert two["a"].tolist() == [0.0] * 4 and one["b"].tolist() == [0.0] * 4


def test_mmap_load_is_copy_on_write(tmp_path):
    p = tmp_path / "mm.safetensors"
    cutegrad.save({"a": cutegrad.arange(8, dtype=cutegrad.float32)}, p)
    before = p.read_bytes()
    t = cutegrad.load(p, mmap=True)["a"]
    t.add_(1.0)
    assert t.tolist() == [float(i + 1) for i in range(8)]
    assert p.read_bytes() == before
    assert cutegrad.load(p)["a"].tolist() == [float(i) for i in range(8)]


def test_new_file_gets_the_umask_mode_and_replaced_file_keeps_its_mode(tmp_path):
    p = tmp_path / "mode.safetensors"
    old = os.umask(0o027)
    try:
        cutegrad.save({"a": cutegrad.ones(1)}, p)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    os.chmod(p, 0o604)
    cutegrad.save({"a": cutegrad.zeros(1)}, p)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o604


# --- atomic write -------------------------------------------------------------------
def _dir_listing(d):
    return sorted(os.listdir(d))


@pytest.mark.parametrize("fail_at", ["data", "replace", "interrupt"])
def test_failed_save_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, fail_at):
    p = tmp_path / "ckpt.safetensors"
    cutegrad.save({"w": cutegrad.ones(3), "v": cutegrad.ones(2)}, p)
    before, listing = p.read_bytes(), _dir_listing(tmp_path)

    if fail_at == "data":
        real = safetensors_file._host_bytes
        calls = []

        def second_tensor_fails(t):
            calls.append(t)
            if len(calls) == 2:
                raise OSError("disk full (simulated)")
            return real(t)
        monkeypatch.setattr(safetensors_file, "_host_bytes", second_tensor_fails)
        expected = OSError
    elif fail_at == "replace":
        def no_rename(src, dst):
            raise OSError("rename failed (simulated)")
        monkeypatch.setattr(safetensors_file.os, "replace", no_rename)
        expected = OSError
    else:
        def interrupted(fd):
            raise KeyboardInterrupt
        monkeypatch.setattr(safetensors_file.os, "fsync", interrupted)
        expected = KeyboardInterrupt

    with pytest.raises(expected):
        cutegrad.save({"w": cutegrad.zeros(3), "v": cutegrad.zeros(2)}, p)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert _dir_listing(tmp_path) == listing
    assert cutegrad.load(p)["w"].tolist() == [1.0, 1.0, 1.0]


def test_failed_first_save_creates_nothing(tmp_path, monkeypatch):
    def fails(t):
        raise OSError("simulated")
    monkeypatch.setattr(safetensors_file, "_host_bytes", fails)
    with pytest.raises(OSError):
        cutegrad.save({"w": cutegrad.ones(3)}, tmp_path / "new.safetensors")
    assert _dir_listing(tmp_path) == []


@pytest.mark.parametrize("state_dict, metadata, error, match", [
    ({"a": np.ones(2)}, None, TypeError, "'a' is a ndarray, not a cutegrad Tensor"),
    ({1: None}, None, TypeError, "names must be str"),
    ({"__metadata__": None}, None, ValueError, "reserved"),
    ([("a", None)], None, TypeError, "mapping"),
    ({}, {"k": 1}, TypeError, "metadata must map str to str"),
    ({}, "meta", TypeError, "metadata must be a mapping"),
])
def test_save_file_rejects_bad_arguments_before_writing(tmp_path, state_dict, metadata, error, match):
    with pytest.raises(error, match=match):
        cutegrad.io.save_file(state_dict, tmp_path / "bad.safetensors", metadata=metadata)
    assert _dir_listing(tmp_path) == []


# --- corrupt and truncated files ----------------------------------------------------
def _file(header, data=b"", pad=True, length=None):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        head += b" " * (-(8 + len(head)) % 8)
    n = len(head) if length is None else length
    return n.to_bytes(8, "little") + head + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

CORRUPT = {
    "empty file": (b"", "truncated: 0 bytes"),
    "short length field": (b"\x08\x00\x00", "truncated: 3 bytes"),
    "header longer than file": (_file({"a": F32x2}, bytes(8), length=4096), "truncated: the header claims 4096"),
    "oversized header length": (_file({}, length=2 ** 62), "corrupted header length"),
    "header not utf-8": (_file(b'{"\xff\xfe": 1}'), "not UTF-8"),
    "header not an object start": (_file(b'["a"]'), "does not start with '{'"),
    "bad json": (_file(b'{"a": {"dtype": "F32",'), "invalid JSON"),
    "duplicate tensor name": (_file(b'{"a": %s, "a": %s}' % (json.dumps(F32x2).encode(), json.dumps(F32x2).encode()),
                                    bytes(8)), "duplicate key 'a'"),
    "entry not an object": (_file({"a": [1, 2]}), "expected an object"),
    "entry missing data_offsets": (_file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "missing ['data_offsets']"),
    "entry with unknown field": (_file({"a": dict(F32x2, extra=1)}, bytes(8)), "unexpected ['extra']"),
    "unknown dtype": (_file({"a": dict(F32x2, dtype="F33")}, bytes(8)), "unknown dtype 'F33'"),
    "dtype cutegrad lacks": (_file({"a": dict(F32x2, dtype="U32")}, bytes(8)), "U32 is valid safetensors"),
    "dtype not a string": (_file({"a": dict(F32x2, dtype=4)}, bytes(8)), "unknown dtype 4"),
    "negative extent": (_file({"a": dict(F32x2, shape=[-2])}, bytes(8)), "non-negative ints"),
    "float extent": (_file({"a": dict(F32x2, shape=[2.0])}, bytes(8)), "non-negative ints"),
    "bool extent": (_file({"a": dict(F32x2, shape=[True, 2])}, bytes(8)), "non-negative ints"),
    "shape not a list": (_file({"a": dict(F32x2, shape=2)}, bytes(8)), "shape must be a list"),
    "three offsets": (_file({"a": dict(F32x2, data_offsets=[0, 4, 8])}, bytes(8)), "two non-negative ints"),
    "negative offset": (_file({"a": dict(F32x2, data_offsets=[-8, 0])}, bytes(8)), "two non-negative ints"),
    "offsets reversed": (_file({"a": dict(F32x2, data_offsets=[8, 0])}, bytes(8)), "end before they begin"),
    "size mismatch": (_file({"a": dict(F32x2, shape=[3])}, bytes(8)), "needs 12 bytes but data_offsets"),
    "offset past the data": (_file({"a": dict(F32x2, data_offsets=[8, 16])}, bytes(8)), "ends at data byte 16"),
    "overlapping tensors": (_file({"a": F32x2, "b": dict(F32x2, shape=[1], data_offsets=[4, 8])}, bytes(8)),
                            "overlaps tensor 'a'"),
    "gap between tensors": (_file({"a": dict(F32x2, shape=[1], data_offsets=[0, 4]),
                                   "b": dict(F32x2, shape=[1], data_offsets=[8, 12])}, bytes(12)),
                            "bytes [4, 8) before tensor 'b' belong to no tensor"),
    "trailing bytes": (_file({"a": F32x2}, bytes(12)), "4 bytes after the last tensor"),
    "truncated data": (_file({"a": F32x2}, bytes(5)), "ends at data byte 8 but the file holds only 5"),
    "metadata not strings": (_file({"__metadata__": {"k": 3}}), "'__metadata__' must map strings to strings"),
    "metadata not an object": (_file({"__metadata__": ["k"]}), "'__metadata__' must map strings to strings"),
    "header is a number": (_file(b"{} 1"), "invalid JSON"),
}


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises_naming_file_and_problem(tmp_path, case, mmap):
    raw, match = CORRUPT[case]
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(raw)
    with pytest.raises(SafetensorsError) as info:
        cutegrad.load(p, mmap=mmap)
    msg = str(info.value)
    assert msg.startswith(str(p) + ": "), msg
    assert match in msg, msg
    assert isinstance(info.value, ValueError)


def test_the_reference_reader_agrees_the_valid_fixture_is_valid(tmp_path):
    # The corrupt cases above are mutations of this file; it must itself be fine.
    p = tmp_path / "ok.safetensors"
    p.write_bytes(_file({"a": F32x2, "__metadata__": {"k": "v"}}, np.array([1.5, -2], np.float32).tobytes()))
    assert st.load_file(str(p))["a"].tolist() == [1.5, -2.0]
    assert cutegrad.load(p)["a"].tolist() == [1.5, -2.0]


def test_every_truncation_of_a_valid_file_is_reported(tmp_path):
    p = tmp_path / "full.safetensors"
    cutegrad.save({"a": cutegrad.arange(5, dtype=cutegrad.int32), "b": cutegrad.ones(2, 3, dtype=cutegrad.bfloat16)},
                  p, metadata={"k": "v"})
    raw = p.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in range(len(raw)):
        cut.write_bytes(raw[:n])
        with pytest.raises(SafetensorsError):
            cutegrad.load(cut)


def test_random_header_corruption_never_escapes_as_another_error(tmp_path):
    p = tmp_path / "full.safetensors"
    cutegrad.save({"a": cutegrad.arange(6, dtype=cutegrad.int64), "b": cutegrad.ones(3, dtype=cutegrad.float16)}, p)
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    rng = np.random.default_rng(7)
    bad = tmp_path / "bad.safetensors"
    rejected = 0
    for _ in range(400):
        mutated = bytearray(raw)
        for pos in rng.integers(0, 8 + n, size=rng.integers(1, 4)):
            mutated[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(mutated))
        try:
            out = cutegrad.load(bad)
        except SafetensorsError:
            rejected += 1
            continue
        # Whatever loads must be self-consistent with the header it came from.
        for t in out.values():
            assert t.numpy().nbytes == t.numel() * t.element_size()
    assert rejected > 300


def test_load_to_unknown_device_names_it(tmp_path):
    p = tmp_path / "d.safetensors"
    cutegrad.save({"a": cutegrad.ones(1)}, p)
    with pytest.raises(ValueError, match="unknown device type 'tpu'"):
        cutegrad.load(p, map_location="tpu")
