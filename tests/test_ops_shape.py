"""Views and shape ops against NumPy: results, which ones share storage (a
write through the view shows in the base), and strides of the views."""
import numpy as np
import pytest

import cutegrad as cg
from core_harness import FLOAT_DTYPES, f64


def _base(shape=(2, 3, 4), dtype=cg.float32):
    arr = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    return arr, cg.tensor(arr, dtype=dtype)


def _shares(view, base):
    """A write through view changes base (checked on a fresh copy of both)."""
    return view._storage is base._storage


def _check(t, arr):
    assert tuple(t.shape) == arr.shape
    np.testing.assert_array_equal(f64(t), arr)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int64, cg.bool), ids=str)
def test_view_reshape_flatten(dtype):
    arr, t = _base(dtype=dtype)
    arr = arr.astype(dtype.np).astype(np.float64)
    for shape in [(6, 4), (-1,), (4, -1, 3), (24, 1), (1, 2, 12)]:
        v = t.view(*shape)
        _check(v, arr.reshape(shape))
        assert _shares(v, t)
        _check(t.reshape(shape), arr.reshape(shape))
    _check(cg.flatten(t), arr.reshape(-1))
    _check(t.flatten(1), arr.reshape(2, 12))
    _check(t.flatten(0, 1), arr.reshape(6, 4))
    _check(cg.tensor(3.0).flatten(), np.array([3.0]))
    _check(t.unflatten(2, (2, 2)), arr.reshape(2, 3, 2, 2))


def test_reshape_of_non_contiguous_copies_view_raises():
    arr, t = _base()
    tt = t.transpose(0, 2)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        tt.view(-1)
    r = tt.reshape(-1)
    _check(r, arr.transpose(2, 1, 0).reshape(-1))
    assert not _shares(r, t)
    # merging dims that are still adjacent in memory stays a view
    s = t[:, :, ::2]
    v = s.transpose(0, 1).reshape(3, 2, 2)
    _check(v, arr[:, :, ::2].transpose(1, 0, 2).reshape(3, 2, 2))
    p = t.permute(1, 0, 2)
    v2 = p.reshape(3, 8)  # (3, 2, 4) with dims 1,2 not mergeable: copy
    _check(v2, arr.transpose(1, 0, 2).reshape(3, 8))


def test_transpose_permute_t_movedim_are_views_with_permuted_strides():
    arr, t = _base()
    for v, want in [(t.transpose(0, 2), arr.transpose(2, 1, 0)), (t.permute(2, 0, 1), arr.transpose(2, 0, 1)),
                    (t.permute((1, 2, 0)), arr.transpose(1, 2, 0)), (t.transpose(-1, -2), arr.swapaxes(-1, -2)),
                    (cg.movedim(t, 0, -1), np.moveaxis(arr, 0, -1)), (t.mT, arr.swapaxes(-1, -2)),
                    (t.T, arr.transpose(2, 1, 0))]:
        _check(v, want)
        assert _shares(v, t)
    assert t.transpose(0, 2).stride() == (1, 4, 12)
    m = cg.tensor(arr[0])
    _check(m.t(), arr[0].T)
    _check(cg.tensor([1.0, 2.0]).t(), np.array([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="<= 2 dimensions"):
        t.t()


def test_expand_and_broadcast_to():
    arr = np.arange(3.0).reshape(3, 1)
    t = cg.tensor(arr)
    e = t.expand(2, 3, 4)
    _check(e, np.broadcast_to(arr, (2, 3, 4)))
    assert e.stride() == (0, 1, 0) and _shares(e, t)
    _check(t.expand(-1, 5), np.broadcast_to(arr, (3, 5)))
    _check(cg.broadcast_to(t, (3, 2)), np.broadcast_to(arr, (3, 2)))
    _check(t.expand_as(cg.zeros(3, 7)), np.broadcast_to(arr, (3, 7)))
    with pytest.raises(RuntimeError, match="must match the existing size"):
        t.expand(4, 4)


def test_unsqueeze_squeeze():
    arr = np.arange(6.0).reshape(2, 1, 3)
    t = cg.tensor(arr)
    for d in range(-4, 4):
        _check(t.unsqueeze(d), np.expand_dims(arr, d))
        assert _shares(t.unsqueeze(d), t)
    _check(t.squeeze(), arr.reshape(2, 3))
    _check(t.squeeze(1), arr.reshape(2, 3))
    _check(t.squeeze(0), arr)  # not size 1: unchanged
    _check(cg.squeeze(t, (0, 1)), arr.reshape(2, 3))
    _check(cg.tensor([[5.0]]).squeeze(), np.array(5.0))
    with pytest.raises(IndexError):
        t.unsqueeze(4)


BASIC_KEYS = [0, -1, (1,), slice(None), slice(1, None), slice(None, None, 2), (slice(None), 1),
              (Ellipsis, 0), (Ellipsis, slice(1, 3)), (None,), (0, None, slice(None), None),
              (slice(None), None, Ellipsis), (1, 2, 3), (-2, slice(0, 3, 2), -1), (slice(5, 9),),
              (slice(-100, 100),), (Ellipsis,), (slice(None), slice(2, 2)), (None, Ellipsis, None),
              (0, Ellipsis, None, 1)]


@pytest.mark.parametrize("key", BASIC_KEYS, ids=repr)
def test_basic_indexing_matches_numpy_and_is_a_view(key):
    arr, t = _base()
    v = t[key]
    _check(v, arr[key])
    assert _shares(v, t)


def test_basic_indexing_strides_offsets_compose():
    arr, t = _base((5, 6, 7))
    v = t[1:, ::2][..., 3:][::2, 1]
    _check(v, arr[1:, ::2][..., 3:][::2, 1])
    w = t.transpose(0, 2)[2:5, None, 1::3]
    _check(w, arr.transpose(2, 1, 0)[2:5, None, 1::3])
    assert _shares(w, t)


def test_writes_through_views_reach_the_base():
    arr, t = _base()
    t[1, :, 2] = 100.0
    arr[1, :, 2] = 100.0
    t.transpose(0, 1)[0] = -1.0
    arr.transpose(1, 0, 2)[0] = -1.0
    v = t.view(6, 4)
    v[5] = cg.tensor([7.0, 8.0, 9.0, 10.0])
    arr.reshape(6, 4)[5] = [7, 8, 9, 10]
    _check(t, arr)


def test_contiguous_copies_only_when_needed():
    arr, t = _base()
    assert t.contiguous() is t
    tt = t.transpose(0, 1)
    assert not tt.is_contiguous()
    c = tt.contiguous()
    assert c.is_contiguous() and not _shares(c, t)
    _check(c, arr.transpose(1, 0, 2))
    assert t[:, :1].is_contiguous() is False and t[:1].is_contiguous()


def test_split_chunk_unbind_narrow_select():
    arr, t = _base((7, 4))
    parts = t.split(3)
    assert [tuple(p.shape) for p in parts] == [(3, 4), (3, 4), (1, 4)]
    for p, w in zip(parts, np.split(arr, [3, 6])):
        _check(p, w)
        assert _shares(p, t)
    parts = t.split([1, 4, 2], dim=0)
    for p, w in zip(parts, np.split(arr, [1, 5])):
        _check(p, w)
    parts = t.split(3, dim=1)
    _check(parts[1], arr[:, 3:])
    ch = t.chunk(3)
    assert [p.shape[0] for p in ch] == [3, 3, 1]
    ch = t.chunk(2, dim=-1)
    _check(ch[0], arr[:, :2])
    assert [p.shape[0] for p in cg.zeros(6).chunk(4)] == [2, 2, 2]  # torch: fewer chunks than asked
    ub = t.unbind(1)
    assert len(ub) == 4
    for i, u in enumerate(ub):
        _check(u, arr[:, i])
    _check(t.narrow(0, 2, 3), arr[2:5])
    _check(t.narrow(1, -2, 2), arr[:, 2:])
    _check(t.select(1, -1), arr[:, -1])
    with pytest.raises(RuntimeError, match="sum exactly"):
        t.split([3, 3])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int32,), ids=str)
def test_cat_and_stack(dtype):
    rng = np.random.default_rng(0)
    a = rng.integers(-5, 5, (2, 3)).astype(np.float64)
    b = rng.integers(-5, 5, (4, 3)).astype(np.float64)
    c = rng.integers(-5, 5, (2, 1)).astype(np.float64)
    ta, tb, tc = (cg.tensor(x, dtype=dtype) for x in (a, b, c))
    _check(cg.cat([ta, tb]), np.concatenate([a, b]))
    _check(cg.cat((ta, tc), dim=-1), np.concatenate([a, c], axis=1))
    _check(cg.concat([ta, ta, ta], 1), np.concatenate([a, a, a], 1))
    _check(cg.stack([ta, ta + 1]), np.stack([a, a + 1]))
    _check(cg.stack([ta, ta], dim=-1), np.stack([a, a], axis=-1))
    _check(cg.stack([ta, ta], dim=1), np.stack([a, a], axis=1))
    assert cg.cat([ta, tb]).dtype is dtype


def test_cat_promotes_dtypes_and_skips_legacy_empty():
    out = cg.cat([cg.tensor([1, 2]), cg.tensor([0.5])])
    assert out.dtype is cg.float32 and out.tolist() == [1.0, 2.0, 0.5]
    out = cg.cat([cg.zeros(2, 3), cg.zeros(0)])
    assert out.shape == (2, 3)


def test_repeat_matches_numpy_tile():
    arr = np.arange(6.0).reshape(2, 3)
    t = cg.tensor(arr)
    _check(t.repeat(2, 3), np.tile(arr, (2, 3)))
    _check(t.repeat(2, 1, 1), np.tile(arr, (2, 1, 1)))
    _check(cg.tensor([1.0, 2.0]).repeat(3), np.tile([1.0, 2.0], 3))


def test_as_strided_window_view():
    t = cg.arange(10.0)
    w = t.as_strided((4, 3), (2, 1), 1)
    _check(w, np.lib.stride_tricks.as_strided(np.arange(1.0, 10.0), (4, 3), (16, 8)))
    assert _shares(w, t)


def test_shape_metadata():
    t = cg.zeros(2, 3, 5)
    assert t.shape == (2, 3, 5) and t.size() == (2, 3, 5) and t.size(-1) == 5 and t.size(1) == 3
    assert t.stride() == (15, 5, 1) and t.stride(0) == 15
    assert t.ndim == 3 and t.dim() == 3 and t.numel() == 30 and t.shape.numel() == 30
    assert len(t) == 2 and t[1:].storage_offset() == 15
    assert isinstance(t.shape, cg.Size) and repr(t.shape) == "cutegrad.Size([2, 3, 5])"
    assert cg.zeros(3, 1, 2).stride() == (2, 2, 1)


def _pieces_loss(parts, weights):
    """sum_i sum(parts[i] * weights[i]) over the pieces whose weight is not None."""
    total = None
    for p, w in zip(parts, weights):
        if w is not None:
            term = (p * cg.tensor(w)).sum()
            total = term if total is None else total + term
    return total


@pytest.mark.parametrize("how", ["unbind", "split", "split_sizes", "chunk"])
@pytest.mark.parametrize("used", ["all", "some"])
def test_pieces_gradients_land_in_their_regions(how, used):
    """split / chunk / unbind share one backward node: every piece's gradient lands in its own
    region of x.grad, unused pieces' regions are zero, and the pieces are still views of x."""
    rng = np.random.default_rng(11)
    arr = rng.standard_normal((4, 7, 3))
    x = cg.tensor(arr, dtype=cg.float64, requires_grad=True)
    parts, nps = {
        "unbind": (lambda: x.unbind(1), lambda a: [a[:, i] for i in range(7)]),
        "split": (lambda: x.split(3, dim=1), lambda a: np.split(a, [3, 6], axis=1)),
        "split_sizes": (lambda: x.split([2, 0, 5], dim=1), lambda a: np.split(a, [2, 2], axis=1)),
        "chunk": (lambda: x.chunk(2, dim=-1), lambda a: np.split(a, [2], axis=2)),
    }[how]
    parts = parts()
    assert all(_shares(p, x) for p in parts)
    weights = [rng.standard_normal(p.shape) for p in parts]
    if used == "some":
        weights = [w if i % 2 == 0 else None for i, w in enumerate(weights)]
    _pieces_loss(parts, weights).backward()
    expect = np.zeros_like(arr)
    for region, w in zip(nps(expect), weights):
        if w is not None:
            region += w
    np.testing.assert_array_equal(f64(x.grad), expect)


def test_pieces_hooks_double_backward_and_in_place_writes():
    rng = np.random.default_rng(12)
    arr = rng.standard_normal((3, 4))
    x = cg.tensor(arr, dtype=cg.float64, requires_grad=True)
    a, b, c = x.unbind(1)[:3]
    seen = []
    b.register_hook(lambda g: seen.append(f64(g)) or g * 2)
    (a * a + b * b).sum().backward(create_graph=True)  # x.grad = 2x in columns 0, 1 (times 2 for the hook)
    expect = np.zeros_like(arr)
    expect[:, 0], expect[:, 1] = 2 * arr[:, 0], 4 * arr[:, 1]
    np.testing.assert_allclose(f64(x.grad.detach()), expect, rtol=1e-12)
    np.testing.assert_allclose(seen[0], 2 * arr[:, 1], rtol=1e-12)
    # d/dx of sum(2 x0 + 4 x1); the hook doubles b's gradient again on this pass (torch: 8 too)
    (gg,) = cg.autograd.grad(x.grad.sum(), x)
    np.testing.assert_allclose(f64(gg), np.outer(np.ones(3), [2, 8, 0, 0]), rtol=1e-12)

    y = cg.tensor(arr, dtype=cg.float64, requires_grad=True)
    base = y * 1
    p0, p1 = base.split(2, dim=1)
    p1.mul_(3)  # (torch refuses this; cutegrad's views allow it) the other piece's history follows
    (p0.sum() + p1.sum()).backward()
    np.testing.assert_allclose(f64(y.grad), np.outer(np.ones(3), [1, 1, 3, 3]), rtol=1e-12)


def test_pieces_gradient_follows_the_input_layout():
    """unbind of a transposed view: the gradient reaching the tensor before the transpose is
    contiguous (laid out like the input's memory), so the reshape before it needs no copy."""
    rng = np.random.default_rng(13)
    arr = rng.standard_normal((2, 5, 12))
    x = cg.tensor(arr, dtype=cg.float64, requires_grad=True)
    r = x.reshape(2, 5, 3, 2, 2)
    seen = []
    r.register_hook(lambda g: seen.append(g))
    q, k, v = r.transpose(1, 3).unbind(2)  # (2, 2, 5, 2) each
    weights = [rng.standard_normal(q.shape) for _ in range(3)]
    _pieces_loss((q, k, v), weights).backward()
    assert seen[0].shape == (2, 5, 3, 2, 2) and seen[0].is_contiguous()
    expect = np.stack(weights, axis=2).transpose(0, 3, 2, 1, 4).reshape(2, 5, 12)
    np.testing.assert_array_equal(f64(x.grad), expect)
