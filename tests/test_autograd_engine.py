"""The autograd engine: graph traversal, accumulation, retain_graph,
autograd.grad, grad modes, custom Functions, hooks, the saved-tensor version
check, views and in-place ops on tensors that take part in autograd."""
import threading

import numpy as np
import pytest

import cutegrad as cg
from cutegrad.autograd import Function


def leaf(values, dtype=cg.float64):
    return cg.tensor(values, dtype=dtype, requires_grad=True)


def grad_np(t):
    return t.grad.numpy().astype(np.float64)


class CountingSquare(Function):
    calls = 0

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, g):
        CountingSquare.calls += 1
        (a,) = ctx.saved_tensors
        return 2 * a * g


def test_shared_subgraph_runs_each_node_once_after_all_its_gradients():
    x = leaf([0.3, -0.7])
    CountingSquare.calls = 0
    y = CountingSquare.apply(x * 2)  # y feeds three consumers of different depth
    z = (y.exp() * y.sin() + y * 3).sum() + (y * y.tanh()).sum()
    z.backward()
    assert CountingSquare.calls == 1
    xv = np.array([0.3, -0.7])
    yv = (2 * xv) ** 2
    dz_dy = np.exp(yv) * np.sin(yv) + np.exp(yv) * np.cos(yv) + 3 + np.tanh(yv) + yv * (1 - np.tanh(yv) ** 2)
    np.testing.assert_allclose(grad_np(x), dz_dy * 2 * (2 * xv) * 2, rtol=1e-12)


def test_diamond_with_unequal_path_lengths():
    x = leaf([1.5])
    a = x * 2
    b = a.exp().log().exp().log()  # long path back to a
    c = a * 3  # short path
    (b * c).sum().backward()
    # d/dx (2x * 6x) = 24x
    np.testing.assert_allclose(grad_np(x), [24 * 1.5], rtol=1e-12)


def test_gradient_accumulates_over_uses_and_backward_calls():
    x = leaf([1.0, 2.0])
    y = x * x + x * 3 + x.sum() + x[0]  # x used five times, one through broadcasting
    y.sum().backward()
    # x[0] and x.sum() are broadcast over y's two elements: each contributes 2
    np.testing.assert_allclose(grad_np(x), [2 * 1 + 3 + 2 + 2, 2 * 2 + 3 + 2])
    (x * 10).sum().backward()
    np.testing.assert_allclose(grad_np(x), [9 + 10, 9 + 10])
    assert not x.grad.requires_grad and x.grad.grad_fn is None


def test_leaf_grad_is_not_aliased_between_two_leaves():
    a = leaf([1.0, 2.0])
    b = leaf([3.0, 4.0])
    (a + b).sum().backward()
    a.grad.mul_(5)  # an optimizer's in-place update of one grad
    np.testing.assert_allclose(grad_np(b), [1.0, 1.0])


def test_retain_graph():
    x = leaf([2.0])
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(grad_np(x), 2 * (np.exp(2.0) * 3.0))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward()


def test_second_backward_without_retain_only_fails_where_buffers_were_freed():
    x = leaf([2.0])
    y = (x * 3).sum()  # MulBackward with a Python scalar saves nothing needed... x is saved
    y.backward()
    z = (x + 1).sum()  # a graph without saved tensors can be re-run, as in torch
    z.backward()
    z.backward()
    np.testing.assert_allclose(grad_np(x), [3.0 + 2.0])


def test_backward_with_gradient_argument_on_non_scalar():
    x = leaf([[1.0, 2.0], [3.0, 4.0]])
    y = x * x
    y.backward(cg.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=cg.float64))
    np.testing.assert_allclose(grad_np(x), [[2.0, 0.0], [3.0, 16.0]])
    with pytest.raises(RuntimeError, match="implicitly created only for scalar"):
        (x * 2).backward()
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        (x * 2).backward(cg.ones(3, dtype=cg.float64))


def test_backward_inputs_argument_limits_accumulation():
    a, b = leaf([1.0]), leaf([2.0])
    (a * b).sum().backward(inputs=[a])
    assert b.grad is None
    np.testing.assert_allclose(grad_np(a), [2.0])


def test_autograd_grad_and_create_graph_higher_order():
    x = leaf([1.5, -0.5])
    y = (x ** 3).sum()
    (g,) = cg.autograd.grad(y, x, create_graph=True)
    np.testing.assert_allclose(g.detach().numpy(), 3 * np.array([1.5, -0.5]) ** 2)
    assert g.requires_grad
    (gg,) = cg.autograd.grad(g.sum(), x, create_graph=True)
    np.testing.assert_allclose(gg.detach().numpy(), 6 * np.array([1.5, -0.5]))
    (ggg,) = cg.autograd.grad(gg.sum(), x)
    np.testing.assert_allclose(ggg.numpy(), [6.0, 6.0])
    assert x.grad is None  # autograd.grad never touches .grad


def test_autograd_grad_allow_unused_and_multiple_inputs():
    a, b, c = leaf([1.0]), leaf([2.0]), leaf([3.0])
    y = (a * b).sum()
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        cg.autograd.grad(y, [a, c], retain_graph=True)
    ga, gc = cg.autograd.grad(y, [a, c], allow_unused=True, retain_graph=True)
    assert gc is None and ga.item() == 2.0
    ga, gb = cg.autograd.grad([y, (a * 5).sum()], [a, b])
    assert ga.item() == 2.0 + 5.0 and gb.item() == 1.0


def test_autograd_grad_of_non_leaf_intermediate():
    x = leaf([2.0])
    h = x * x
    y = (h * 3).sum()
    (gh,) = cg.autograd.grad(y, h)
    assert gh.item() == 3.0


def test_no_grad_enable_grad_set_grad_enabled_inference_mode():
    x = leaf([1.0])
    with cg.no_grad():
        assert not cg.is_grad_enabled()
        y = x * 2
        assert not y.requires_grad and y.grad_fn is None
        with cg.enable_grad():
            z = x * 2
            assert z.requires_grad
        assert not cg.is_grad_enabled()
    assert cg.is_grad_enabled()
    with cg.set_grad_enabled(False):
        assert not (x * 2).requires_grad
    with cg.inference_mode():
        assert not (x * 2).requires_grad
    with cg.inference_mode(False):
        assert (x * 2).requires_grad

    @cg.no_grad()
    def f(t):
        return t * 2

    assert not f(x).requires_grad and cg.is_grad_enabled()

    @cg.enable_grad()
    def g(t):
        return t * 2

    with cg.no_grad():
        assert g(x).requires_grad


def test_grad_mode_is_thread_local():
    seen = []
    with cg.no_grad():
        t = threading.Thread(target=lambda: seen.append(cg.is_grad_enabled()))
        t.start()
        t.join()
    assert seen == [True]


def test_grad_mode_restored_after_exception():
    with pytest.raises(ZeroDivisionError):
        with cg.no_grad():
            1 / 0
    assert cg.is_grad_enabled()


def test_custom_function_with_saved_tensors_and_non_tensor_args():
    class ScaledMul(Function):
        @staticmethod
        def forward(ctx, a, b, scale):
            ctx.save_for_backward(a, b)
            ctx.scale = scale
            return a * b * scale

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            assert ctx.needs_input_grad == (True, False, False)
            return g * b * ctx.scale, None, None

    a = leaf([1.0, 2.0])
    b = cg.tensor([3.0, 4.0], dtype=cg.float64)
    y = ScaledMul.apply(a, b, 0.5)
    assert y.grad_fn is not None and y.requires_grad
    y.sum().backward()
    np.testing.assert_allclose(grad_np(a), [1.5, 2.0])
    with cg.no_grad():
        assert not ScaledMul.apply(a, b, 2.0).requires_grad


def test_custom_function_wrong_number_of_gradients():
    class Bad(Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, g):
            return g

    a, b = leaf([1.0]), leaf([2.0])
    with pytest.raises(RuntimeError, match="returned 1 gradients, expected 2"):
        Bad.apply(a, b).sum().backward()


def test_custom_function_returning_its_input_is_not_an_alias_of_the_leaf():
    class Identity(Function):
        @staticmethod
        def forward(ctx, a):
            return a

        @staticmethod
        def backward(ctx, g):
            return g * 2

    a = leaf([1.0])
    y = Identity.apply(a)
    assert y is not a and a.is_leaf
    y.sum().backward()
    assert a.grad.item() == 2.0


def test_tensor_hooks_change_gradient_and_can_be_removed():
    x = leaf([1.0, 2.0])
    seen = []
    h = x.register_hook(lambda g: seen.append(g.numpy().copy()) or g * 10)
    (x * 3).sum().backward()
    np.testing.assert_allclose(grad_np(x), [30.0, 30.0])
    np.testing.assert_allclose(seen[0], [3.0, 3.0])
    h.remove()
    x.grad = None
    (x * 3).sum().backward()
    np.testing.assert_allclose(grad_np(x), [3.0, 3.0])


def test_hook_on_intermediate_sees_summed_gradient():
    x = leaf([2.0])
    y = x * 3
    seen = []
    y.register_hook(lambda g: seen.append(g.item()))
    (y * y + y).sum().backward()
    assert seen == [2 * 6.0 + 1]
    assert x.grad.item() == 13 * 3


def test_retain_grad_on_non_leaf():
    x = leaf([1.0, 2.0])
    y = x * 2
    y.retain_grad()
    z = y * y
    assert z.grad is None
    z.sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), [4.0, 8.0])
    assert y.grad.grad_fn is None
    x.retain_grad()  # a no-op on leaves
    with pytest.raises(RuntimeError, match="doesn't require gradient"):
        cg.zeros(2).register_hook(lambda g: g)


def test_saved_tensor_modified_in_place_raises_at_backward():
    x = leaf([1.0, 2.0])
    y = x * 1
    z = y * y  # saves y
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    w = x.exp()  # saves its output
    w.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*output 0"):
        w.sum().backward()


def test_in_place_through_a_view_bumps_the_shared_version():
    x = leaf([1.0, 2.0, 3.0])
    y = x * 1
    z = y.sigmoid()  # saves its output z
    v = z[1:]
    v.zero_()
    assert z._version == v._version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_backward_through_views():
    x = leaf(np.arange(6.0).reshape(2, 3))
    y = x.t()[1:].reshape(-1).unsqueeze(0).expand(2, 4)
    (y * cg.tensor([1.0, 2.0, 3.0, 4.0], dtype=cg.float64)).sum().backward()
    want = np.zeros((2, 3))
    # x.t()[1:] is [[x01, x11], [x02, x12]] flattened -> (x01, x11, x02, x12), each used twice
    want[0, 1], want[1, 1], want[0, 2], want[1, 2] = 2, 4, 6, 8
    np.testing.assert_allclose(grad_np(x), want)


def test_in_place_on_non_leaf():
    x = leaf([1.0, 2.0])
    y = x * 3
    y.mul_(x)  # y = 3x^2
    y.add_(1).exp_()
    y.sum().backward()
    xv = np.array([1.0, 2.0])
    np.testing.assert_allclose(grad_np(x), np.exp(3 * xv ** 2 + 1) * 6 * xv, rtol=1e-12)
    z = x * 3
    z.mul_(z)  # z is saved as mul's operand and then overwritten: torch raises too
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    assert y.grad_fn is not None and not y.is_leaf


def test_in_place_on_a_view_rewrites_the_base_history():
    x = leaf([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = x * 1
    row = y[1]
    row.mul_(10)  # CopySlices on y
    y.t()[0].zero_()  # a view of a view, non-contiguous
    (y * y).sum().backward()
    want = np.array([[0.0, 2 * 2.0, 2 * 3.0], [0.0, 2 * 500.0, 2 * 600.0]])
    np.testing.assert_allclose(grad_np(x), want)


def test_write_into_a_view_with_a_value_that_requires_grad():
    x = leaf([1.0, 2.0, 3.0, 4.0])
    v = leaf([7.0, 8.0])
    y = x * 2
    y[1:3] = v * v
    y.sum().backward()
    np.testing.assert_allclose(grad_np(x), [2.0, 0.0, 0.0, 2.0])
    np.testing.assert_allclose(grad_np(v), [14.0, 16.0])


def test_setitem_with_autograd_basic_and_advanced_keys():
    x = leaf(np.arange(12.0).reshape(3, 4))
    v = leaf([1.0, 2.0])
    y = x.clone()
    y[0, :2] = v
    y[cg.tensor([2, 2]), cg.tensor([0, 3])] = v * 3
    y[y > 9] = 0.0  # row 2 is now [3, 9, 10, 6]: only the 10 is masked
    (y * cg.tensor(np.arange(1.0, 13.0).reshape(3, 4))).sum().backward()
    want = np.arange(1.0, 13.0).reshape(3, 4)
    want[0, :2] = 0
    want[2, [0, 3]] = 0
    want[2, 2] = 0
    np.testing.assert_allclose(grad_np(x), want)
    np.testing.assert_allclose(grad_np(v), [1.0 + 3 * 9, 2.0 + 3 * 12])


def test_in_place_on_leaf_requiring_grad_raises_but_no_grad_allows_it():
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        x.add_(1)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        x[0] = 5.0
    with pytest.raises(RuntimeError, match="view of a leaf Variable"):
        x[:1].mul_(2)
    with cg.no_grad():
        x.mul_(2)
    np.testing.assert_allclose(x.detach().numpy(), [2.0, 4.0])
    assert x.is_leaf and x.requires_grad


def test_detach_shares_storage_and_cuts_the_graph():
    x = leaf([1.0, 2.0])
    d = (x * 2).detach()
    assert not d.requires_grad and d.grad_fn is None
    d2 = x.detach()
    d2[0] = 9.0
    assert x[0].item() == 9.0
    with pytest.raises(RuntimeError, match="modified by an inplace"):
        y = x * x
        x.detach().add_(1)
        y.sum().backward()


def test_requires_grad_rules():
    assert not cg.zeros(2).requires_grad
    x = cg.zeros(2).requires_grad_()
    assert x.requires_grad and x.is_leaf
    y = x + 1
    assert y.requires_grad and not y.is_leaf
    with pytest.raises(RuntimeError, match="leaf variables"):
        y.requires_grad = False
    assert not (x > 0).requires_grad
    assert not x.argmax().requires_grad
    with pytest.raises(RuntimeError, match="floating point"):
        cg.zeros(2, dtype=cg.int64).requires_grad_()


def test_gradient_dtype_follows_the_leaf_through_casts():
    x = cg.tensor([1.0, 2.0], requires_grad=True)  # float32
    (x.double() * 3).sum().backward()
    assert x.grad.dtype is cg.float32
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 3.0])
    h = cg.tensor([1.0, 2.0], dtype=cg.bfloat16, requires_grad=True)
    (h.float() * h.float()).sum().backward()
    assert h.grad.dtype is cg.bfloat16
    np.testing.assert_allclose(h.grad.float().numpy(), [2.0, 4.0])


def test_embedding_padding_idx_gets_no_gradient():
    w = leaf(np.ones((4, 2)))
    cg.embedding(cg.tensor([1, 2, 1, 0]), w, padding_idx=1).sum().backward()
    np.testing.assert_allclose(grad_np(w), [[1, 1], [0, 0], [1, 1], [0, 0]])


def test_max_gradient_ties():
    x = leaf([1.0, 3.0, 3.0])
    x.max().backward()
    np.testing.assert_allclose(grad_np(x), [0.0, 0.5, 0.5])  # full reduction: evenly split, as torch
    y = leaf([[3.0, 3.0]])
    y.max(1).values.sum().backward()
    np.testing.assert_allclose(grad_np(y), [[1.0, 0.0]])  # with dim: to the returned index


def test_deep_graph_does_not_recurse():
    x = leaf([1.0])
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(grad_np(x), [1.0001 ** 5000], rtol=1e-9)


def test_graph_is_freed_after_backward():
    import gc
    import weakref
    x = leaf(np.ones(4))
    y = (x.exp() * 2).sum()
    node_ref = weakref.ref(y.grad_fn)
    y.backward()
    del y
    gc.collect()
    assert node_ref() is None


def test_leaf_grad_owns_dense_memory_after_expanding_backward():
    x = leaf(np.ones((2, 3)))
    x.sum().backward()  # the sum's gradient is an expand (stride 0)
    assert x.grad.is_contiguous() and x.grad.stride() == (3, 1)
    x.grad.add_(cg.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=cg.float64))
    np.testing.assert_allclose(grad_np(x), [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]])
    w = leaf(np.ones((3, 1)))
    (w.expand(3, 4) * 2).mean().backward()
    assert w.grad.is_contiguous()


def test_leaf_grad_does_not_alias_the_callers_gradient_or_retained_grads():
    x = leaf([1.0, 2.0])
    y = x + 0
    y.retain_grad()
    g = cg.tensor([5.0, 6.0], dtype=cg.float64)
    y.backward(g)
    x.grad.mul_(0)
    assert g.tolist() == [5.0, 6.0] and y.grad.tolist() == [5.0, 6.0]


def test_copy_from_a_leaf_routes_the_gradient_to_it():
    v = leaf([1.0, 2.0, 3.0])
    y = cg.zeros(3, dtype=cg.float64)
    y.copy_(v)
    assert y.requires_grad and y.grad_fn is not None
    (y * 2).sum().backward()
    np.testing.assert_allclose(grad_np(v), [2.0, 2.0, 2.0])


def test_overwriting_a_non_leaf_with_constants_gives_zero_gradient_like_torch():
    x = leaf([1.0, 2.0])
    y = x * 2
    y.fill_(0.0)
    assert y.requires_grad
    (y * 3).sum().backward()
    np.testing.assert_allclose(grad_np(x), [0.0, 0.0])
    x.grad = None
    z = x * 2
    z.zero_().add_(x)
    (z * 3).sum().backward()
    np.testing.assert_allclose(grad_np(x), [3.0, 3.0])


def test_autograd_grad_through_a_deep_chain():
    x = leaf([1.0])
    y = x
    for _ in range(3000):
        y = y * 1.0001
    (g,) = cg.autograd.grad(y.sum(), x)
    np.testing.assert_allclose(g.numpy(), [1.0001 ** 3000], rtol=1e-9)


def test_retain_grad_follows_in_place_ops_like_torch():
    x = leaf([1.0, 2.0])
    y = x * 2
    y.retain_grad()
    y.mul_(3)
    (y * 5).sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), [5.0, 5.0])  # gradient of the final y
    np.testing.assert_allclose(grad_np(x), [30.0, 30.0])
    b = x * 1
    b.retain_grad()
    b[0] = 7.0  # CopySlices: b's new history
    (b * 4).sum().backward()
    np.testing.assert_allclose(b.grad.numpy(), [4.0, 4.0])


@pytest.mark.parametrize("op", [cg.relu, lambda t: cg.clamp(t, min=0.0), lambda t: cg.where(t > 0, t, 0.0)],
                         ids=["relu", "clamp", "where"])
def test_masked_out_positions_get_zero_not_nan_from_infinite_gradients(op):
    x = leaf([-1.0, 2.0])
    (op(x) * cg.tensor([float("inf"), 1.0], dtype=cg.float64)).sum().backward()
    assert grad_np(x).tolist() == [0.0, 1.0]


def test_set_grad_enabled_as_a_plain_call_like_torch():
    cg.set_grad_enabled(False)
    assert not cg.is_grad_enabled() and not (leaf([1.0]) * 2).requires_grad
    cg.set_grad_enabled(True)
    assert cg.is_grad_enabled()

    @cg.set_grad_enabled(False)
    def f():
        return cg.is_grad_enabled()

    assert cg.is_grad_enabled() and f() is False and cg.is_grad_enabled()
    with cg.no_grad():
        with cg.set_grad_enabled(True):
            assert cg.is_grad_enabled()
        assert not cg.is_grad_enabled()


def test_views_made_before_an_in_place_write_follow_the_new_history():
    x = leaf([[1.0, 2.0], [3.0, 4.0]])
    b = (x * 1).t()
    b[0].mul_(3)  # writes through a sibling view of b's base
    (b * b).sum().backward()
    np.testing.assert_allclose(grad_np(x), [[18.0, 4.0], [54.0, 8.0]])
    x.grad = None
    base = x * 1
    row = base[1]
    base.mul_(2)  # in place on the base itself
    (row * row).sum().backward()
    np.testing.assert_allclose(grad_np(x), [[0.0, 0.0], [24.0, 32.0]])


def test_write_into_a_view_of_a_non_contiguous_root():
    w = cg.arange(12.0, dtype=cg.float64).reshape(3, 4)
    d = w.t().detach()  # a root tensor that is not contiguous
    v = leaf([1.0, 2.0, 3.0])
    d[1] = v * v
    (d * cg.arange(12.0, dtype=cg.float64).reshape(4, 3)).sum().backward()
    np.testing.assert_allclose(grad_np(v), [2 * 1.0 * 3, 2 * 2.0 * 4, 2 * 3.0 * 5])


class SinCos(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a.sin(), a.cos(), a.argmax()

    @staticmethod
    def backward(ctx, g_sin, g_cos, g_idx):
        (a,) = ctx.saved_tensors
        return g_sin * a.cos() - g_cos * a.sin()


def test_custom_function_with_several_outputs():
    x = leaf([0.5, 1.0])
    s, c, i = SinCos.apply(x)
    assert s.requires_grad and c.requires_grad and not i.requires_grad
    (s * 2 + c * 3 + s).sum().backward()
    xv = np.array([0.5, 1.0])
    np.testing.assert_allclose(grad_np(x), 3 * np.cos(xv) - 3 * np.sin(xv), rtol=1e-12)
    x.grad = None
    s, c, _ = SinCos.apply(x)
    s.sum().backward()  # c unused: its gradient arrives as zeros
    np.testing.assert_allclose(grad_np(x), np.cos(xv), rtol=1e-12)
    assert cg.autograd.gradcheck(lambda a: SinCos.apply(a)[:2], (leaf([0.3, -0.8]),))


class SeesAccumulateFlag(Function):
    """Identity whose backward records grad_mode.state.accumulate_into_leaves."""
    seen = []

    @staticmethod
    def forward(ctx, a):
        return a * 1

    @staticmethod
    def backward(ctx, g):
        from cutegrad.autograd import grad_mode
        SeesAccumulateFlag.seen.append(grad_mode.state.accumulate_into_leaves)
        return g


def _flag_during(run):
    from cutegrad.autograd import grad_mode
    SeesAccumulateFlag.seen = []
    run()
    assert grad_mode.state.accumulate_into_leaves is False, "the flag must not outlive the backward"
    return SeesAccumulateFlag.seen


def test_accumulate_into_leaves_only_while_backward_sums_every_leaf_into_grad():
    x = leaf([1.0, 2.0])
    loss = lambda: SeesAccumulateFlag.apply(x).sum()  # noqa: E731
    assert _flag_during(lambda: loss().backward()) == [True]
    assert _flag_during(lambda: cg.autograd.backward(loss(), inputs=[x])) == [False]
    assert _flag_during(lambda: cg.autograd.grad(loss(), x)) == [False]
    assert _flag_during(lambda: loss().backward(create_graph=True)) == [False]


def test_accumulate_flag_is_restored_after_a_nested_backward_and_an_error():
    from cutegrad.autograd import grad_mode
    x, y = leaf([1.0, 2.0]), leaf([3.0])
    seen = []

    def hook(g):
        with cg.enable_grad():  # a nested autograd.grad inside the outer backward
            cg.autograd.grad((y * y).sum(), y)
        seen.append(grad_mode.state.accumulate_into_leaves)
        return g

    out = SeesAccumulateFlag.apply(x)
    out.register_hook(hook)
    assert _flag_during(lambda: out.sum().backward()) == [True]
    assert seen == [True]

    class Fails(Function):
        @staticmethod
        def forward(ctx, a):
            return a * 1

        @staticmethod
        def backward(ctx, g):
            raise ValueError("backward failed")

    with pytest.raises(ValueError, match="backward failed"):
        Fails.apply(x).sum().backward()
    assert grad_mode.state.accumulate_into_leaves is False


def test_linear_weight_gradient_adds_into_an_existing_grad_during_backward():
    """The fused linear's weight-gradient GEMM adds into .grad in place (beta = 1) under a plain
    backward(); with inputs=, a leaf hook or create_graph the values are the same, out of place."""
    F = cg.nn.functional
    rng = np.random.default_rng(4)
    xv, wv, bv = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    expect = 2 * np.ones((3, 5)).T @ xv
    for how in ("backward", "inputs", "hook", "create_graph"):
        x, w, b = leaf(xv), leaf(wv), leaf(bv)
        F.linear(x, w, b).sum().backward()
        first = w.grad
        if how == "hook":
            w.register_hook(lambda g: g)
        y = F.linear(x, w, b).sum()
        if how == "inputs":
            y.backward(inputs=[w, b])
        else:
            y.backward(create_graph=how == "create_graph")
        assert (w.grad is first) == (how == "backward"), how
        np.testing.assert_allclose(w.grad.detach().numpy(), expect, rtol=1e-12)
        np.testing.assert_allclose(b.grad.detach().numpy(), [6.0] * 5, rtol=1e-12)
