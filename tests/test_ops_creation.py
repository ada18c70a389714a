"""Factories and the seeded random generator."""
import numpy as np
import pytest

import cutegrad as cg
from core_harness import FLOAT_DTYPES, f64


def test_tensor_infers_dtype_like_torch():
    assert cg.tensor([1, 2]).dtype is cg.int64
    assert cg.tensor([1.0, 2]).dtype is cg.float32
    assert cg.tensor(True).dtype is cg.bool and cg.tensor(3).shape == ()
    assert cg.tensor(np.zeros(2, np.int32)).dtype is cg.int32
    assert cg.tensor(np.zeros(2, np.float16)).dtype is cg.float16
    assert cg.tensor(np.zeros(2, np.float64)).dtype is cg.float64
    assert cg.tensor([[1, 2], [3, 4]], dtype=cg.bfloat16).dtype is cg.bfloat16
    assert cg.tensor([1, 2], dtype="float16").dtype is cg.float16
    assert cg.tensor([cg.tensor(1.0), cg.tensor(2.0)]).tolist() == [1.0, 2.0]
    assert cg.tensor([]).shape == (0,)
    with pytest.raises((TypeError, ValueError), match="ragged"):
        cg.tensor([[1, 2], [3]])


def test_tensor_copies_its_data():
    a = np.zeros(3)
    t = cg.tensor(a)
    a[0] = 1.0
    assert t[0].item() == 0.0
    u = cg.tensor(t)
    u[1] = 5.0
    assert t[1].item() == 0.0 and not u.requires_grad
    assert cg.tensor([1.0], requires_grad=True).requires_grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int64, cg.int32, cg.bool), ids=str)
def test_zeros_ones_full_empty(dtype):
    for shape in [(), (3,), (2, 1, 4)]:
        z = cg.zeros(*shape, dtype=dtype)
        assert z.shape == shape and z.dtype is dtype and not f64(z).any()
        o = cg.ones(shape, dtype=dtype)
        assert (f64(o) == 1).all()
        assert cg.empty(shape, dtype=dtype).shape == shape
    assert (f64(cg.full((2, 2), 1, dtype=dtype)) == 1).all()
    assert cg.zeros([2, 3]).shape == (2, 3) and cg.ones((2,)).dtype is cg.float32


def test_full_infers_dtype_from_fill_value():
    assert cg.full((2,), 3).dtype is cg.int64
    assert cg.full((2,), 3.5).dtype is cg.float32
    assert cg.full((2,), True).dtype is cg.bool
    assert cg.full(3, 1.5).tolist() == [1.5, 1.5, 1.5]


ARANGE = [(5,), (2, 7), (1, 10, 3), (10, 1, -3), (0.0, 1.0, 0.1), (1, 2.5, 0.5), (-1.0, 1.0, 0.25), (0, 0),
          (0.5, 3)]


@pytest.mark.parametrize("args", ARANGE, ids=str)
def test_arange_matches_torch(args):
    torch = pytest.importorskip("torch")
    got = cg.arange(*args)
    want = torch.arange(*args)
    assert got.dtype.name == str(want.dtype).replace("torch.", "")
    np.testing.assert_allclose(f64(got), want.double().numpy(), rtol=1e-6)


def test_arange_dtype_argument_and_errors():
    assert cg.arange(4, dtype=cg.float64).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="step must be nonzero"):
        cg.arange(0, 3, 0)
    with pytest.raises(RuntimeError, match="inconsistent with step sign"):
        cg.arange(0, 3, -1)


def test_linspace_and_eye():
    np.testing.assert_allclose(f64(cg.linspace(-1, 1, 5)), np.linspace(-1, 1, 5))
    assert cg.linspace(0, 1, 1).tolist() == [0.0] and cg.linspace(0, 1, 0).shape == (0,)
    assert cg.linspace(0, 1, 3, dtype=cg.float64).dtype is cg.float64
    np.testing.assert_array_equal(f64(cg.eye(3)), np.eye(3))
    np.testing.assert_array_equal(f64(cg.eye(2, 4)), np.eye(2, 4))
    assert cg.eye(2, dtype=cg.int64).dtype is cg.int64


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_rand_randn_ranges_and_moments(dtype):
    cg.manual_seed(0)
    u = f64(cg.rand(4000, dtype=dtype))
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.03
    n = f64(cg.randn(4000, dtype=dtype))
    assert abs(n.mean()) < 0.08 and abs(n.std() - 1) < 0.08
    assert cg.rand(2, 3, dtype=dtype).dtype is dtype and cg.randn((2, 3)).shape == (2, 3)


def test_randint_randperm():
    cg.manual_seed(1)
    r = cg.randint(-3, 4, (1000,))
    assert r.dtype is cg.int64 and r.numpy().min() == -3 and r.numpy().max() == 3
    assert cg.randint(5, (2, 2)).numpy().max() < 5
    assert cg.randint(0, 2, (3,), dtype=cg.int32).dtype is cg.int32
    p = cg.randperm(10)
    assert sorted(p.tolist()) == list(range(10)) and p.dtype is cg.int64


def test_normal_uniform_in_place():
    cg.manual_seed(2)
    t = cg.zeros(3000, dtype=cg.float64)
    v0 = t._version
    t.normal_(2.0, 0.5)
    assert t._version > v0
    assert abs(t.numpy().mean() - 2.0) < 0.05 and abs(t.numpy().std() - 0.5) < 0.05
    t.uniform_(-3, -1)
    assert t.numpy().min() >= -3 and t.numpy().max() <= -1
    w = cg.zeros(5, requires_grad=True)
    with cg.no_grad():
        w.uniform_(0, 1)  # init under no_grad leaves it a leaf
    assert w.is_leaf and w.requires_grad


def test_manual_seed_reproduces_every_random_op():
    def draw():
        return (cg.rand(5).tolist(), cg.randn(3).tolist(), cg.randint(0, 100, (4,)).tolist(),
                cg.randperm(6).tolist(), cg.dropout(cg.ones(8), 0.5).tolist(), cg.zeros(3).normal_().tolist())
    cg.manual_seed(1234)
    a = draw()
    cg.manual_seed(1234)
    b = draw()
    assert a == b
    assert draw() != a
    assert cg.initial_seed() == 1234


def test_generator_objects_have_their_own_state():
    g = cg.Generator().manual_seed(7)
    a = cg.rand(4, generator=g).tolist()
    cg.manual_seed(99)
    cg.rand(10)
    g2 = cg.Generator().manual_seed(7)
    assert cg.rand(4, generator=g2).tolist() == a
    state = g.get_state()
    x = cg.randn(3, generator=g).tolist()
    g.set_state(state)
    assert cg.randn(3, generator=g).tolist() == x
    assert g.initial_seed() == 7


def test_rand_like_randn_like():
    x = cg.zeros(2, 3, dtype=cg.float64)
    assert cg.rand_like(x).dtype is cg.float64 and cg.randn_like(x).shape == (2, 3)


def test_shape_argument_errors():
    with pytest.raises(RuntimeError, match="negative dimension"):
        cg.zeros(2, -1)
    with pytest.raises(TypeError, match="sequence of ints"):
        cg.ones(2.5)
    with pytest.raises(TypeError):
        cg.randint(0, 5)
