"""Tensor basics: storage sharing, version counter bumps of every in-place op,
in-place semantics (casting, broadcasting), conversions, to/clone/detach."""
import pickle

import numpy as np
import pytest

import cutegrad as cg
from core_harness import FLOAT_DTYPES, f64

INPLACE = [
    ("add_", lambda t: t.add_(1.5)),
    ("add_alpha", lambda t: t.add_(cg.ones(3), alpha=2)),
    ("sub_", lambda t: t.sub_(cg.ones(1))),
    ("mul_", lambda t: t.mul_(2)),
    ("div_", lambda t: t.div_(4)),
    ("pow_", lambda t: t.pow_(2)),
    ("zero_", lambda t: t.zero_()),
    ("fill_", lambda t: t.fill_(3.25)),
    ("fill_tensor", lambda t: t.fill_(cg.tensor(2.0))),
    ("copy_", lambda t: t.copy_(cg.tensor([7.0, 8.0, 9.0]))),
    ("masked_fill_", lambda t: t.masked_fill_(cg.tensor([True, False, True]), -1.0)),
    ("clamp_", lambda t: t.clamp_(0.5, 1.5)),
    ("relu_", lambda t: t.relu_()),
    ("neg_", lambda t: t.neg_()),
    ("exp_", lambda t: t.exp_()),
    ("sqrt_", lambda t: t.sqrt_()),
    ("tanh_", lambda t: t.tanh_()),
    ("sigmoid_", lambda t: t.sigmoid_()),
    ("setitem", lambda t: t.__setitem__(1, 5.0)),
    ("setitem_adv", lambda t: t.__setitem__(cg.tensor([0, 2]), 5.0)),
    ("index_put_", lambda t: t.index_put_((cg.tensor([1]),), cg.tensor([4.0]), accumulate=True)),
    ("iadd", lambda t: t.__iadd__(1.0)),
    ("imul", lambda t: t.__imul__(3.0)),
    ("isub", lambda t: t.__isub__(1.0)),
    ("itruediv", lambda t: t.__itruediv__(2.0)),
    ("abs_", lambda t: t.abs_()),
    ("log_", lambda t: t.log_()),
    ("rsqrt_", lambda t: t.rsqrt_()),
    ("lerp_", lambda t: t.lerp_(cg.ones(3), 0.5)),
    ("addcmul_", lambda t: t.addcmul_(cg.ones(3), cg.full((3,), 2.0), value=0.5)),
    ("addcdiv_", lambda t: t.addcdiv_(cg.ones(3), cg.full((3,), 2.0), value=-1)),
    ("uniform_", lambda t: t.uniform_(0, 1)),
    ("normal_", lambda t: t.normal_()),
]


@pytest.mark.parametrize("name,op", INPLACE, ids=[n for n, _ in INPLACE])
def test_inplace_op_writes_memory_bumps_version_and_returns_self(name, op):
    base = np.array([0.25, 1.0, 2.0])
    t = cg.tensor(base)
    alias = t.view(3)
    v0 = t._version
    out = op(t)
    if name not in ("setitem", "setitem_adv"):
        assert out is t
    assert t._version > v0 and alias._version == t._version  # views share the counter
    np.testing.assert_array_equal(alias.numpy(), t.numpy())


def test_inplace_values():
    t = cg.tensor([0.25, 1.0, 2.0])
    t.add_(cg.ones(3), alpha=2).mul_(2).sub_(1).div_(2)
    np.testing.assert_allclose(t.numpy(), ((np.array([0.25, 1.0, 2.0]) + 2) * 2 - 1) / 2)
    t.clamp_(max=2.0).pow_(2)
    np.testing.assert_allclose(t.numpy(), np.minimum(((np.array([0.25, 1.0, 2.0]) + 2) * 2 - 1) / 2, 2.0) ** 2)


def test_optimizer_style_inplace_values():
    base = np.array([0.25, 1.0, 2.0])
    t = cg.tensor(base, dtype=cg.float64)
    t.lerp_(cg.tensor([1.0, 1.0, 1.0], dtype=cg.float64), 0.25)
    want = base + 0.25 * (1.0 - base)
    t.addcmul_(t, t, value=0.5)
    want = want + 0.5 * want * want
    t.addcdiv_(cg.ones(3, dtype=cg.float64), t, value=-2.0)
    want = want - 2.0 / want
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-12)


def test_inplace_into_non_contiguous_view_writes_the_right_elements():
    arr = np.arange(12.0).reshape(3, 4)
    t = cg.tensor(arr)
    t.t()[1:3].mul_(-1)
    arr.T[1:3] *= -1
    t[:, ::2].add_(cg.tensor([100.0, 200.0]))
    arr[:, ::2] += [100.0, 200.0]
    np.testing.assert_array_equal(t.numpy(), arr)


def test_inplace_broadcasting_and_casting_rules():
    t = cg.zeros(2, 3)
    t.add_(cg.tensor([1.0, 2.0, 3.0]))
    assert t.tolist() == [[1, 2, 3], [1, 2, 3]]
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        cg.zeros(3).add_(cg.zeros(2, 3))
    i = cg.tensor([1, 2])
    with pytest.raises(RuntimeError, match="can't be cast"):
        i.mul_(1.5)  # float result into an int tensor
    i.add_(3)
    assert i.dtype is cg.int64 and i.tolist() == [4, 5]
    h = cg.zeros(2, dtype=cg.float16)
    h.add_(cg.tensor([1.0, 2.0], dtype=cg.float32))  # same category: cast down, as torch
    assert h.dtype is cg.float16 and h.tolist() == [1.0, 2.0]
    b = cg.zeros(3, dtype=cg.bfloat16)
    b.copy_(cg.tensor([1, 2, 3]))
    assert b.tolist() == [1.0, 2.0, 3.0]


def test_copy_between_dtypes_and_broadcast():
    t = cg.zeros(2, 3, dtype=cg.int32)
    t.copy_(cg.tensor([1.7, -2.7, 3.0]))
    assert t.tolist() == [[1, -2, 3], [1, -2, 3]]  # truncation toward zero, as torch
    with pytest.raises(TypeError):
        t.copy_([1, 2, 3])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int64, cg.int32, cg.int8, cg.uint8, cg.bool, cg.int16), ids=str)
def test_to_dtype_clone_and_roundtrip(dtype):
    x = cg.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    y = x.to(dtype)
    assert y.dtype is dtype and y.shape == x.shape
    assert x.to(dtype) is not x or dtype is cg.float32
    assert x.to(cg.float32) is x  # no-op conversion returns self, as torch
    np.testing.assert_array_equal(f64(y.to(cg.float64)), np.array(x.tolist()).astype(dtype.np).astype(np.float64))
    c = y.clone()
    assert c.dtype is dtype and c._storage is not y._storage
    np.testing.assert_array_equal(f64(c), f64(y))
    assert x.to(dtype, copy=True)._storage is not x._storage


def test_float_to_int_cast_truncates_and_bool_cast():
    x = cg.tensor([-1.5, -0.5, 0.0, 0.5, 2.9])
    assert x.long().tolist() == [-1, 0, 0, 0, 2]
    assert x.bool().tolist() == [True, True, False, True, True]
    assert cg.tensor([True, False]).float().tolist() == [1.0, 0.0]


def test_to_accepts_tensor_dtype_device_and_keywords():
    x = cg.tensor([1, 2])
    other = cg.zeros(1, dtype=cg.float64)
    assert x.to(other).dtype is cg.float64
    assert x.to("cpu") is x and x.to(cg.device("cpu"), cg.float16).dtype is cg.float16
    assert x.to(dtype=cg.bfloat16).dtype is cg.bfloat16
    assert x.type_as(other).dtype is cg.float64
    assert x.double().dtype is cg.float64 and x.half().dtype is cg.float16 and x.int().dtype is cg.int32
    with pytest.raises(TypeError, match="invalid argument"):
        x.to(3.5)


def test_clone_of_view_is_contiguous_and_independent():
    x = cg.arange(12.0).view(3, 4)
    c = x.t().clone()
    assert c.is_contiguous() and c.shape == (4, 3)
    c[0, 0] = -1.0
    assert x[0, 0].item() == 0.0
    assert cg.tensor(2.5).clone().shape == ()


def test_numpy_shares_memory_and_from_numpy():
    x = cg.zeros(3)
    x.numpy()[1] = 5.0
    assert x.tolist() == [0.0, 5.0, 0.0]
    a = np.arange(4.0)
    t = cg.from_numpy(a)
    a[0] = 9.0
    assert t[0].item() == 9.0 and t.dtype is cg.float64
    with pytest.raises(RuntimeError, match="requires grad"):
        cg.zeros(2, requires_grad=True).numpy()


def test_scalar_conversions():
    assert cg.tensor(2.5).item() == 2.5 and isinstance(cg.tensor(3).item(), int)
    assert cg.tensor([1.5], dtype=cg.bfloat16).item() == 1.5
    assert float(cg.tensor([2.0])) == 2.0 and int(cg.tensor(7)) == 7
    assert bool(cg.tensor([1.0])) and not bool(cg.tensor(0))
    assert [10, 20, 30][cg.tensor(1)] == 20
    with pytest.raises(TypeError):
        [1, 2][cg.tensor(1.0)]
    assert cg.tensor([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]
    assert cg.tensor([1.5], dtype=cg.float16).tolist() == [1.5]
    assert [v.item() for v in cg.tensor([4, 5])] == [4, 5]
    with pytest.raises(TypeError):
        len(cg.tensor(1.0))


def test_format_spec_formats_one_element_tensors():
    assert f"{cg.tensor(1.23456):.3f}" == "1.235" and f"{cg.tensor([7]):>3}" == "  7"
    assert f"{cg.tensor([1, 2])}" == "tensor([1, 2])"


def test_repr_shows_dtype_and_grad_state():
    assert repr(cg.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    assert "dtype=cutegrad.float16" in repr(cg.tensor([1.0], dtype=cg.float16))
    assert "requires_grad=True" in repr(cg.zeros(1, requires_grad=True))
    assert "grad_fn=<" in repr(cg.zeros(1, requires_grad=True) * 2)


def test_pickle_roundtrip():
    x = cg.tensor([[1.0, 2.0]], dtype=cg.bfloat16)
    y = pickle.loads(pickle.dumps(x))
    assert y.dtype is cg.bfloat16 and y.tolist() == [[1.0, 2.0]]
    assert pickle.loads(pickle.dumps(cg.float16)) is cg.float16


def test_dtype_objects():
    assert cg.float is cg.float32 and cg.double is cg.float64 and cg.half is cg.float16 and cg.long is cg.int64
    assert cg.float32.is_floating_point and not cg.int32.is_floating_point
    assert cg.bfloat16.itemsize == 2 and cg.zeros(3, dtype=cg.int8).element_size() == 1
    assert repr(cg.bfloat16) == "cutegrad.bfloat16"
    assert cg.zeros(2).is_floating_point() and not cg.zeros(2, dtype=cg.bool).is_floating_point()


def test_default_dtype():
    assert cg.get_default_dtype() is cg.float32
    cg.set_default_dtype(cg.float64)
    try:
        assert cg.tensor([1.5]).dtype is cg.float64 and cg.zeros(1).dtype is cg.float64
        assert (cg.tensor([1]) / 2).dtype is cg.float64
    finally:
        cg.set_default_dtype(cg.float32)
    with pytest.raises(TypeError):
        cg.set_default_dtype(cg.int64)


def test_device_objects():
    d = cg.device("cpu")
    assert d == "cpu" and str(d) == "cpu" and d.type == "cpu" and d.index is None
    assert cg.zeros(1).device == d and not cg.zeros(1).is_cuda
    assert cg.device("cuda:1").index == 1 and cg.device(0) == cg.device("cuda:0")
    with pytest.raises(ValueError, match="unknown device type"):
        cg.device("tpu")
    with pytest.raises(ValueError, match="bad device index"):
        cg.device("cuda:x")


def test_new_factories_and_like():
    x = cg.zeros(2, dtype=cg.float64)
    assert x.new_zeros(3).dtype is cg.float64 and x.new_ones(2, 2).shape == (2, 2)
    assert x.new_full((2,), 7.0).tolist() == [7.0, 7.0]
    assert x.new_tensor([1, 2]).dtype is cg.float64
    assert cg.zeros_like(x).dtype is cg.float64 and cg.ones_like(x, dtype=cg.int32).dtype is cg.int32
    assert cg.full_like(x, 3).tolist() == [3.0, 3.0] and cg.empty_like(x).shape == (2,)


def test_tensor_constructor_is_not_public():
    with pytest.raises(TypeError, match="cutegrad.tensor"):
        cg.Tensor([1, 2])
