"""cutegrad.save / cutegrad.load of whole checkpoints: nested state as torch.save users write it, no pickle."""
import json
import math
import warnings

import numpy as np
import pytest

import cutegrad
from cutegrad.io import SafetensorsError, load_metadata
from cutegrad.io.checkpoint import TREE_KEY

st = pytest.importorskip("safetensors.torch")


def _same(a, b, ordered=True):
    """Deep equality that tells int from float, list from tuple, and compares tensors by dtype, shape and bits
    (a dict subclass such as a state_dict's OrderedDict comes back as a dict, in the same order)."""
    assert type(a) is type(b) or (isinstance(a, dict) and type(b) is dict), (a, b)
    if isinstance(a, cutegrad.Tensor):
        assert a.dtype is b.dtype and tuple(a.shape) == tuple(b.shape)
        np.testing.assert_array_equal(a.detach().numpy().reshape(-1).view(np.uint8),
                                      b.detach().numpy().reshape(-1).view(np.uint8))
    elif isinstance(a, dict):
        assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def _round_trip(obj, tmp_path, **load_kw):
    p = tmp_path / "ckpt.safetensors"
    cutegrad.save(obj, p)
    return cutegrad.load(p, **load_kw)


def test_training_state_round_trip(tmp_path):
    cutegrad.manual_seed(0)
    model = cutegrad.nn.Sequential(cutegrad.nn.Linear(5, 4), cutegrad.nn.ReLU(), cutegrad.nn.Linear(4, 3))
    opt = cutegrad.optim.AdamW(model.parameters(), lr=1e-2)
    model(cutegrad.randn(2, 5)).sum().backward()
    opt.step()
    obj = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3,
           "config": {"lr": 1e-2, "layers": [5, 4, 3], "name": "mlp", "amp": False, "seed": None}}
    back = _round_trip(obj, tmp_path)
    _same(obj, back)
    assert set(back["optim"]["state"]) == {0, 1, 2, 3}  # int keys stay ints
    assert back["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    model2 = cutegrad.nn.Sequential(cutegrad.nn.Linear(5, 4), cutegrad.nn.ReLU(), cutegrad.nn.Linear(4, 3))
    model2.load_state_dict(back["model"])
    opt2 = cutegrad.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(back["optim"])
    _same(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("obj", [
    {"a": [1, 2.0, (3, [4.5, (None,)]), True, "s"]},
    {"ints": 1, "floats": 1.0, "neg": -0.0, "big": 2 ** 70, "tiny": 5e-324},
    {"empty": {}, "nested_empty": {"x": {}, "y": [], "z": ()}},
    [1, (2, 3), {"k": [cutegrad.ones(2)]}],
    (cutegrad.arange(3), {"inner": (cutegrad.zeros(1, 2),)}),
    {1: "int key", 2.5: "float key", (1, "a"): "tuple key", None: "none key", True: "bool key"},
    {"@tensor": "not a tensor", "@": 1, "plain": {"@dict": []}},
    {"special": [math.inf, -math.inf, math.nan]},
    {"dtype": cutegrad.bfloat16, "device": cutegrad.device("cuda:1"), "unicode ✓": "ünï"},
    {},
    {"only": {}},
    "just a string",
    7,
])
def test_nested_values_round_trip_exactly(tmp_path, obj):
    _same(obj, _round_trip(obj, tmp_path))


def test_single_tensor_and_16_bit_tensors(tmp_path):
    rng = np.random.default_rng(1)
    t = cutegrad.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)).to(cutegrad.bfloat16)
    _same(t, _round_trip(t, tmp_path))
    obj = {"bf16": t, "f16": t.to(cutegrad.float16), "i8": cutegrad.arange(4, dtype=cutegrad.int8), "b": t > 0,
           "scalar": cutegrad.tensor(2.5, dtype=cutegrad.bfloat16), "empty": cutegrad.zeros(0, 3), "n": 1}
    _same(obj, _round_trip(obj, tmp_path))


def test_flat_dict_stays_a_plain_safetensors_file(tmp_path):
    sd = {"w": cutegrad.ones(2, 3), "b": cutegrad.arange(3, dtype=cutegrad.int64)}
    p = tmp_path / "flat.safetensors"
    cutegrad.save(sd, p)
    assert TREE_KEY not in load_metadata(p)
    back = st.load_file(str(p))
    assert back["w"].tolist() == [[1.0] * 3] * 2 and back["b"].tolist() == [0, 1, 2]
    _same(sd, cutegrad.load(p), ordered=False)  # a plain file's tensors come back in the writer's order


def test_nested_file_is_readable_by_safetensors_under_flattened_names(tmp_path):
    obj = {"model": {"fc.weight": cutegrad.ones(2)}, "optim": {"state": {0: {"exp_avg": cutegrad.zeros(2)}}},
           "step": 9}
    p = tmp_path / "n.safetensors"
    cutegrad.save(obj, p, metadata={"note": "hi"})
    back = st.load_file(str(p))
    assert sorted(back) == ["model.fc.weight", "optim.state.0.exp_avg"]
    meta = load_metadata(p)
    assert meta["note"] == "hi"
    assert json.loads(meta[TREE_KEY])["step"] == 9


def test_colliding_paths_get_unique_names_and_shared_tensors_are_stored_once(tmp_path):
    a, b = cutegrad.ones(2), cutegrad.zeros(2)
    obj = {"x.y": a, "x": {"y": b}, "again": a, "__metadata__": b}
    p = tmp_path / "c.safetensors"
    cutegrad.save(obj, p)
    assert len(st.load_file(str(p))) == 2
    back = cutegrad.load(p)
    _same(obj, back)
    assert back["again"] is back["x.y"]


def test_map_location_forms(tmp_path):
    p = tmp_path / "m.safetensors"
    cutegrad.save({"w": cutegrad.ones(2), "n": 1}, p)
    for loc in ("cpu", cutegrad.device("cpu"), {"cuda:0": "cpu"}, None):
        assert cutegrad.load(p, map_location=loc)["w"].device.type == "cpu"
    seen = []

    def fn(t, where):
        seen.append(where)
        return t * 2

    assert cutegrad.load(p, map_location=fn)["w"].tolist() == [2.0, 2.0]
    assert seen == ["cpu"]
    assert cutegrad.load(p, map_location=lambda t, where: None)["w"].tolist() == [1.0, 1.0]
    with pytest.raises(TypeError, match="map_location returned a str"):
        cutegrad.load(p, map_location=lambda t, where: "cpu")
    with pytest.raises(TypeError, match="map_location must be"):
        cutegrad.load(p, map_location=3.5)
    with pytest.raises(ValueError, match="unknown device type 'tpu'"):
        cutegrad.load(p, map_location="tpu")


def test_saved_device_is_recorded_and_remapped(tmp_path):
    # A file as save() writes it from CUDA tensors; remapping sends them to the CPU.
    p = tmp_path / "d.safetensors"
    tree = {"w": {"@tensor": "w", "device": "cuda:1"}, "v": {"@tensor": "v"}}
    cutegrad.io.save_file({"w": cutegrad.ones(2), "v": cutegrad.zeros(1)}, p, {TREE_KEY: json.dumps(tree)})
    seen = {}
    out = cutegrad.load(p, map_location=lambda t, where: seen.setdefault(where, t))
    assert set(seen) == {"cuda:1", "cpu"} and out["w"].tolist() == [1.0, 1.0]
    assert cutegrad.load(p, map_location={"cuda:1": "cpu"})["w"].device.type == "cpu"


@pytest.mark.parametrize("weights_only", [True, False, None])
def test_weights_only_is_accepted_and_changes_nothing(tmp_path, weights_only):
    obj = {"a": cutegrad.ones(1), "b": (1, 2)}
    _same(obj, _round_trip(obj, tmp_path, weights_only=weights_only))
    with pytest.raises(TypeError, match="weights_only must be a bool or None"):
        _round_trip(obj, tmp_path, weights_only="yes")


@pytest.mark.parametrize("obj, match", [
    ({"model": cutegrad.nn.Linear(2, 2)}, r"Linear at 'model'.*Save its state_dict\(\)"),
    ({"a": {"b": [1, object()]}}, r"builtins.object at 'a.b.1'"),
    ({"arr": np.ones(2)}, r"ndarray at 'arr'.*from_numpy"),
    ({"s": {1, 2}}, r"builtins.set at 's'"),
    ({"f": lambda: 0}, r"function at 'f'"),
    ({"k": {cutegrad.ones(1): 1}}, r"key of type Tensor"),
    ({"k": {frozenset(): 1}}, r"key of type frozenset"),
])
def test_unsupported_objects_are_refused_before_writing(tmp_path, obj, match):
    with pytest.raises(TypeError, match=match):
        cutegrad.save(obj, tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_refuses_reserved_metadata_and_non_files(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        cutegrad.save({"n": 1}, tmp_path / "x.safetensors", metadata={TREE_KEY: "{}"})
    with pytest.raises(TypeError, match="file path .* or a binary file object, got int"):
        cutegrad.save({"n": 1}, 3)
    with pytest.raises(TypeError, match="got list"):
        cutegrad.load([])


def test_file_objects_as_torch_save_takes_them(tmp_path):
    import io
    obj = {"model": {"w": cutegrad.arange(4, dtype=cutegrad.float32)}, "step": 7, "t": (1, None)}
    buf = io.BytesIO()
    cutegrad.save(obj, buf)
    buf.seek(0)
    _same(obj, cutegrad.load(buf))
    flat = {"a": cutegrad.ones(2, dtype=cutegrad.bfloat16)}
    buf = io.BytesIO()
    cutegrad.save(flat, buf)
    p = tmp_path / "same.safetensors"
    cutegrad.save(flat, p)
    assert buf.getvalue() == p.read_bytes()  # the same bytes as the file
    with open(p, "rb") as f:
        _same(flat, cutegrad.load(f))
    with pytest.raises(ValueError, match="mmap=True needs a file path"):
        cutegrad.load(io.BytesIO(p.read_bytes()), mmap=True)
    with pytest.raises(SafetensorsError, match="<file object>: truncated"):
        cutegrad.load(io.BytesIO(p.read_bytes()[:20]))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_suffix_warns_that_the_format_is_safetensors(tmp_path, suffix):
    p = tmp_path / ("ckpt" + suffix)
    with pytest.warns(UserWarning, match="safetensors files, not PyTorch's pickle format"):
        cutegrad.save({"w": cutegrad.ones(1)}, p)
    assert st.load_file(str(p))["w"].tolist() == [1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cutegrad.save({"w": cutegrad.ones(1)}, tmp_path / "ok.safetensors")


def test_torch_pickle_file_is_refused_without_unpickling(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "torch.pt"
    marker = tmp_path / "ran"
    # An object whose unpickling would run code: loading must never do it.
    torch.save({"evil": _Evil(str(marker))}, p)
    with pytest.raises(SafetensorsError, match="PyTorch torch.save file"):
        cutegrad.load(p)
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(SafetensorsError, match="never unpickles"):
        cutegrad.load(p)
    assert not marker.exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("tree, match", [
    ("{not json", "invalid JSON"),
    (json.dumps({"w": {"@tensor": "missing"}}), "does not hold"),
    (json.dumps({"w": {"@bogus": 1}}), "unknown tag '@bogus'"),
    (json.dumps({"w": {"@tuple": 3}}), "bad @tuple"),
    (json.dumps({"w": {"@dict": [[[1], 2]]}}), "unhashable dict key"),
    (json.dumps({"w": {"@float": "1e400"}}), "bad @float"),
    (json.dumps({"w": {"@dtype": "complex64"}}), "unknown dtype"),
    (json.dumps({"w": {"@tuple": [], "x": 1}}), "extra keys"),
    (json.dumps({"w": {"@tensor": "w", "device": "tpu"}}), "unknown device type"),
    (json.dumps({"n": 1}), "not in its structure"),
])
def test_corrupt_structure_raises(tmp_path, tree, match):
    p = tmp_path / "c.safetensors"
    cutegrad.io.save_file({"w": cutegrad.ones(1)}, p, {TREE_KEY: tree})
    with pytest.raises(SafetensorsError, match=match):
        cutegrad.load(p)


def test_mmap_load_of_nested_checkpoint(tmp_path):
    obj = {"model": {"w": cutegrad.arange(6, dtype=cutegrad.float32)}, "step": 2}
    _same(obj, _round_trip(obj, tmp_path, mmap=True))
