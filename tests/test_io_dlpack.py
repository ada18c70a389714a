"""DLPack: zero-copy exchange with NumPy and PyTorch, lifetimes, the capsule protocol."""
import gc
import threading
import weakref

import numpy as np
import pytest

import cutegrad
from cutegrad.io import dlpack
from cutegrad.io import dlpack_abi as abi

torch = pytest.importorskip("torch")

DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]


def _values(dtype_name, shape, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-50, 50, size=shape)
    if dtype_name == "bool":
        return arr > 0
    if dtype_name == "uint8":
        arr = arr + 50
    return arr.astype(getattr(cutegrad, dtype_name).np)


def _torch_tensor(arr, dtype_name):
    if dtype_name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


def _torch_as_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(cutegrad.bfloat16.np)
    return t.numpy()


def _one(dtype_name):
    return True if dtype_name == "bool" else 7


def _capsule_name(capsule):
    return abi.capsule_name(id(capsule))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_torch_to_cutegrad_shares_memory(dtype_name):
    src = _torch_tensor(_values(dtype_name, (3, 5)), dtype_name)
    t = cutegrad.from_dlpack(src)
    assert t.dtype is getattr(cutegrad, dtype_name)
    assert t.data_ptr() == src.data_ptr()
    np.testing.assert_array_equal(t.numpy(), _torch_as_numpy(src))
    src[1, 2] = _one(dtype_name)
    assert t[1, 2].item() == src[1, 2].item()
    t[0, 4] = 0
    assert src[0, 4].item() == 0


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_cutegrad_to_torch_shares_memory(dtype_name):
    t = cutegrad.from_numpy(_values(dtype_name, (4, 3), seed=1))
    out = torch.from_dlpack(t)
    assert out.dtype == getattr(torch, dtype_name)
    assert out.data_ptr() == t.data_ptr()
    np.testing.assert_array_equal(_torch_as_numpy(out), t.numpy())
    out[2, 1] = _one(dtype_name)
    assert t[2, 1].item() == out[2, 1].item()
    t[3, 0] = 0
    assert out[3, 0].item() == 0


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_numpy_to_cutegrad_shares_memory(dtype_name):
    arr = _values(dtype_name, (2, 7), seed=2)
    t = cutegrad.from_dlpack(arr)
    assert t.dtype is getattr(cutegrad, dtype_name)
    assert t.data_ptr() == arr.ctypes.data
    arr[1, 3] = _one(dtype_name)
    assert t[1, 3].item() == arr[1, 3].item()
    t[0, 0] = 0
    assert arr[0, 0] == 0


@pytest.mark.parametrize("dtype_name", [d for d in DTYPES if d != "bfloat16"])
def test_cutegrad_to_numpy_shares_memory(dtype_name):
    t = cutegrad.from_numpy(_values(dtype_name, (5, 2), seed=3))
    arr = np.from_dlpack(t)
    assert arr.dtype == t.dtype.np
    assert arr.ctypes.data == t.data_ptr()
    arr[4, 1] = _one(dtype_name)
    assert t[4, 1].item() == arr[4, 1].item()


def test_bfloat16_export_is_described_as_bfloat16():
    # NumPy's DLPack reader has no bfloat16 (the NumPy view of a bf16 tensor
    # is t.numpy()); the capsule must still describe kDLBfloat16 for torch & co.
    t = cutegrad.from_numpy(np.arange(3, dtype=cutegrad.bfloat16.np))
    imp = dlpack.tensor_from_capsule(t.__dlpack__())
    try:
        assert (imp.dtype, imp.ptr, imp.shape) == (cutegrad.bfloat16, t.data_ptr(), (3,))
    finally:
        imp.owner.release()


def _strided_cases():
    base = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    return {
        "transpose": lambda x: x.transpose(0, 2),
        "step slice": lambda x: x[1:, ::2, 1::3],
        "row offset": lambda x: x[2],
        "column": lambda x: x[:, :, 3],
    }, base


@pytest.mark.parametrize("case", ["transpose", "step slice", "row offset", "column"])
def test_strided_torch_views_import_without_copy(case):
    cases, base = _strided_cases()
    src = cases[case](torch.from_numpy(base.copy()))
    assert not src.is_contiguous() or case == "row offset"
    t = cutegrad.from_dlpack(src)
    assert t.stride() == src.stride()
    assert t.data_ptr() == src.data_ptr()
    np.testing.assert_array_equal(t.numpy(), src.numpy())
    src.fill_(-1)
    assert (t.numpy() == -1).all()


@pytest.mark.parametrize("case", ["transpose", "step slice", "row offset", "column"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_strided_cutegrad_views_export_without_copy(case, dtype_name):
    cases, base = _strided_cases()
    t = cases[case](cutegrad.from_numpy(base.astype(getattr(cutegrad, dtype_name).np)))
    out = torch.from_dlpack(t)
    assert out.stride() == t.stride()
    assert out.data_ptr() == t.data_ptr()
    np.testing.assert_array_equal(_torch_as_numpy(out), t.numpy())
    out.fill_(-3)
    assert (t.numpy().astype(np.float32) == -3).all()


def test_strided_numpy_bfloat16_imports_without_copy():
    arr = np.arange(24, dtype=cutegrad.bfloat16.np).reshape(4, 6)[::2, 1::2]
    t = cutegrad.from_dlpack(arr)
    assert t.dtype is cutegrad.bfloat16
    assert t.data_ptr() == arr.ctypes.data
    assert t.stride() == (12, 2)
    np.testing.assert_array_equal(t.numpy(), arr)


def test_expanded_view_with_zero_stride_round_trips():
    t = cutegrad.from_numpy(np.arange(3, dtype=np.int64)).unsqueeze(0).expand(4, 3)
    out = torch.from_dlpack(t)
    assert out.stride() == (0, 1)
    back = cutegrad.from_dlpack(out)
    assert back.stride() == (0, 1) and back.data_ptr() == t.data_ptr()
    assert back.tolist() == [[0, 1, 2]] * 4


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "int64", "bool"])
def test_zero_dim_tensors_both_ways(dtype_name):
    t = cutegrad.from_numpy(np.array(_one(dtype_name), dtype=getattr(cutegrad, dtype_name).np))
    out = torch.from_dlpack(t)
    assert out.shape == () and out.data_ptr() == t.data_ptr()
    back = cutegrad.from_dlpack(_torch_tensor(np.array(_one(dtype_name), t.dtype.np), dtype_name))
    assert back.shape == () and back.item() == t.item()
    arr = np.array(5, dtype=np.int32)
    view = cutegrad.from_dlpack(arr)
    assert view.shape == () and view.data_ptr() == arr.ctypes.data


def test_empty_tensors_both_ways():
    t = cutegrad.zeros(0, 3)
    assert tuple(torch.from_dlpack(t).shape) == (0, 3)
    back = cutegrad.from_dlpack(torch.zeros(2, 0))
    assert back.shape == (2, 0) and back.dtype is cutegrad.float32


def test_cutegrad_to_cutegrad_shares_memory():
    t = cutegrad.arange(6, dtype=cutegrad.float32)
    u = cutegrad.from_dlpack(t[2:])
    assert u.data_ptr() == t.data_ptr() + 8
    u.fill_(0.0)
    assert t.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_dlpack_device_and_capsule_kinds():
    t = cutegrad.ones(2)
    assert t.__dlpack_device__() == (1, 0)
    assert _capsule_name(t.__dlpack__()) == "dltensor"
    assert _capsule_name(t.__dlpack__(max_version=(0, 8))) == "dltensor"
    assert _capsule_name(t.__dlpack__(max_version=(1, 0))) == "dltensor_versioned"
    for cap in (t.__dlpack__(), t.__dlpack__(max_version=(1, 2))):
        out = torch.utils.dlpack.from_dlpack(cap)
        assert out.data_ptr() == t.data_ptr()
        assert _capsule_name(cap).startswith("used_")


def test_versioned_capsule_flags():
    t = cutegrad.ones(2)
    cap = t.__dlpack__(max_version=(1, 0), copy=True)
    m = abi.DLManagedTensorVersioned.from_address(abi.capsule_pointer(id(cap), abi.NAME_VERSIONED))
    assert (m.version.major, m.flags) == (1, abi.FLAG_IS_COPIED)
    assert m.dl_tensor.data != t.data_ptr()
    cap2 = t.__dlpack__(max_version=(1, 0))
    m2 = abi.DLManagedTensorVersioned.from_address(abi.capsule_pointer(id(cap2), abi.NAME_VERSIONED))
    assert m2.flags == 0 and m2.dl_tensor.data == t.data_ptr()


def test_copy_argument_on_import():
    src = torch.arange(4.0)
    c = cutegrad.from_dlpack(src, copy=True)
    assert c.data_ptr() != src.data_ptr() and c.tolist() == [0.0, 1.0, 2.0, 3.0]
    src[0] = 9
    assert c[0].item() == 0.0
    assert cutegrad.from_dlpack(src, copy=False).data_ptr() == src.data_ptr()


def test_negative_strides_are_copied_or_refused():
    arr = np.arange(6, dtype=np.float32)[::-1]
    t = cutegrad.from_dlpack(arr)
    assert t.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert all(s >= 0 for s in t.stride())
    with pytest.raises(BufferError, match="negative strides.*copy=False"):
        cutegrad.from_dlpack(arr, copy=False)


def test_read_only_producer_is_copied_or_refused():
    arr = np.arange(4, dtype=np.int32)
    arr.flags.writeable = False
    t = cutegrad.from_dlpack(arr)
    assert t.data_ptr() != arr.ctypes.data and t.tolist() == [0, 1, 2, 3]
    t.fill_(1)
    assert arr.tolist() == [0, 1, 2, 3]
    with pytest.raises(BufferError, match="read-only.*copy=False"):
        cutegrad.from_dlpack(arr, copy=False)


# --- lifetimes ----------------------------------------------------------------------
def test_torch_producer_deleted_before_cutegrad_consumer():
    src = torch.arange(1000, dtype=torch.float64)
    t = cutegrad.from_dlpack(src)[10:20]
    del src
    gc.collect()
    junk = [torch.full((1000,), -1.0, dtype=torch.float64) for _ in range(20)]
    assert t.tolist() == [float(i) for i in range(10, 20)]
    del junk


def test_numpy_producer_is_released_when_the_last_view_dies():
    arr = np.arange(10, dtype=np.int64)
    ref = weakref.ref(arr)
    t = cutegrad.from_dlpack(arr)
    view = t[3:5]
    del arr, t
    gc.collect()
    assert ref() is not None
    assert view.tolist() == [3, 4]
    del view
    gc.collect()
    assert ref() is None


def test_cutegrad_producer_deleted_before_torch_consumer():
    t = cutegrad.arange(8, dtype=cutegrad.int32)
    ref = weakref.ref(t._storage)
    out = torch.from_dlpack(t)
    del t
    gc.collect()
    assert ref() is not None
    assert out.tolist() == list(range(8))
    del out
    gc.collect()
    assert ref() is None


def test_cutegrad_producer_deleted_before_numpy_consumer():
    t = cutegrad.arange(5, dtype=cutegrad.float32)
    ref = weakref.ref(t._storage)
    arr = np.from_dlpack(t)
    del t
    gc.collect()
    assert arr.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    del arr
    gc.collect()
    assert ref() is None


def test_consumer_released_from_another_thread():
    t = cutegrad.ones(4)
    ref = weakref.ref(t._storage)
    box = [torch.from_dlpack(t)]
    del t
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    gc.collect()
    assert ref() is None


def test_unconsumed_capsule_releases_the_storage():
    t = cutegrad.ones(3)
    ref = weakref.ref(t._storage)
    caps = [t.__dlpack__(), t.__dlpack__(max_version=(1, 0))]
    del t
    gc.collect()
    assert ref() is not None
    del caps
    gc.collect()
    assert ref() is None


def test_unconsumed_capsule_dropped_while_an_exception_propagates():
    t = cutegrad.ones(3)
    ref = weakref.ref(t._storage)

    def fails(x):
        cap = x.__dlpack__()  # noqa: F841  (dies with the frame, during unwinding)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        fails(t)
    del t
    gc.collect()
    assert ref() is None


def test_capsule_consumed_twice_is_refused():
    cap = cutegrad.ones(2).__dlpack__()
    first = cutegrad.from_dlpack(cap)
    with pytest.raises(BufferError, match="already consumed"):
        cutegrad.from_dlpack(cap)
    assert first.tolist() == [1.0, 1.0]


# --- bad input ----------------------------------------------------------------------
def test_export_errors():
    w = cutegrad.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad.*detach"):
        w.__dlpack__()
    t = cutegrad.ones(2)
    with pytest.raises(BufferError, match="stream must be None"):
        t.__dlpack__(stream=5)
    with pytest.raises(BufferError, match="cannot export a cpu tensor to cuda:0"):
        t.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError, match="device type 8"):
        t.__dlpack__(dl_device=(8, 0))
    with pytest.raises(TypeError, match="dl_device"):
        t.__dlpack__(dl_device="cpu")
    assert _capsule_name(t.__dlpack__(dl_device=(1, 0), stream=-1)) == "dltensor"


def test_import_errors():
    with pytest.raises(TypeError, match="__dlpack__ or a DLPack capsule, got list"):
        cutegrad.from_dlpack([1, 2])
    with pytest.raises(BufferError, match="no cutegrad equivalent"):
        cutegrad.from_dlpack(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(BufferError, match="no cutegrad equivalent"):
        cutegrad.from_dlpack(np.zeros(2, dtype=np.uint32))
    with pytest.raises(TypeError, match="expected a DLPack capsule"):
        dlpack.tensor_from_capsule(object())


def test_unsupported_major_version_calls_the_deleter_and_refuses():
    t = cutegrad.ones(2)
    ref = weakref.ref(t._storage)
    cap = t.__dlpack__(max_version=(1, 0))
    m = abi.DLManagedTensorVersioned.from_address(abi.capsule_pointer(id(cap), abi.NAME_VERSIONED))
    m.version.major = 2
    del t
    with pytest.raises(BufferError, match="version 2.1 is not supported"):
        cutegrad.from_dlpack(cap)
    del cap
    gc.collect()
    assert ref() is None


# --- device-generic core (no GPU needed: nothing dereferences the address) ----------
def test_cuda_capsule_becomes_a_cuda_tensor_over_the_same_address():
    owner = cutegrad.ones(1)._storage  # stands for the producer's allocation
    ref = weakref.ref(owner)
    cap = dlpack.capsule_for(0x7F0000001000, (2, 3), (1, 2), cutegrad.float16, abi.kDLCUDA, 1, owner,
                             byte_offset=256, versioned=True)
    del owner
    t = cutegrad.from_dlpack(cap)
    assert t.device == cutegrad.device("cuda:1") and t.is_cuda
    assert (t.shape, t.stride(), t.dtype) == ((2, 3), (1, 2), cutegrad.float16)
    assert t.data_ptr() == 0x7F0000001000 + 256
    assert t.__dlpack_device__() == (2, 1)
    gc.collect()
    assert ref() is not None
    again = dlpack.tensor_from_capsule(t.__dlpack__(stream=-1))
    assert (again.ptr, again.device_type, again.device_id, again.strides) == (t.data_ptr(), abi.kDLCUDA, 1, (1, 2))
    again.owner.release()
    del t, again
    gc.collect()
    assert ref() is None


def test_unknown_device_type_is_refused_after_releasing_the_producer():
    owner = cutegrad.ones(1)._storage
    ref = weakref.ref(owner)
    cap = dlpack.capsule_for(0x1000, (2,), (1,), cutegrad.float32, 14, 0, owner)
    del owner
    with pytest.raises(BufferError, match="device type 14"):
        cutegrad.from_dlpack(cap)
    gc.collect()
    assert ref() is None


@pytest.mark.gpu
def test_torch_cuda_tensors_both_ways():
    import cutegrad.cuda
    if not (torch.cuda.is_available() and cutegrad.cuda.is_available()):
        pytest.skip("needs a CUDA GPU visible to both torch and cutegrad")
    src = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    t = cutegrad.from_dlpack(src)
    assert t.is_cuda and t.data_ptr() == src.data_ptr() and t.stride() == (4, 1)
    back = torch.from_dlpack(t)
    assert back.data_ptr() == src.data_ptr()
    back.add_(1)
    torch.cuda.synchronize()
    assert src[0, 0].item() == 1.0
