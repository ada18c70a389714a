"""Random computation graphs, the same in cutegrad and torch: shared
subgraphs, broadcasting, views, and in-place ops on non-leaf tensors and on
views of them. Values and leaf gradients must agree."""
import numpy as np
import pytest

import cutegrad as cg

torch = pytest.importorskip("torch")

SHAPE = (3, 4)


def _ops():
    """(name, arity, fn(m, *tensors)) over module m; every result has SHAPE."""
    return [
        ("add", 2, lambda m, a, b: a + b),
        ("mul", 2, lambda m, a, b: a * b),
        ("sub_bcast", 2, lambda m, a, b: a - b.sum(0, keepdim=True)),
        ("div", 2, lambda m, a, b: a / (b * b + 1)),
        ("tanh", 1, lambda m, a: m.tanh(a)),
        ("sigmoid", 1, lambda m, a: m.sigmoid(a)),
        ("exp_clamped", 1, lambda m, a: m.exp(m.clamp(a, -3, 3))),
        ("softmax", 1, lambda m, a: m.softmax(a, 1)),
        ("matmul", 2, lambda m, a, b: a @ b.t() @ b * 0.1),
        ("transpose_back", 1, lambda m, a: a.t().contiguous().t() * 1.5),
        ("expand_mean", 1, lambda m, a: a.mean(1, keepdim=True).expand(*SHAPE)),
        ("where", 2, lambda m, a, b: m.where(a > b, a, b * 2)),
        ("maximum", 2, lambda m, a, b: m.maximum(a, b + 0.1)),
        ("cat_split", 2, lambda m, a, b: m.cat([a[:, :2], b[:, 2:]], 1)),
        ("stack_sum", 2, lambda m, a, b: m.stack([a, b]).sum(0)),
        ("inplace_mul", 1, lambda m, a: _inplace(lambda t: t.mul_(0.5), a)),
        ("inplace_add_tensor", 2, lambda m, a, b: _inplace(lambda t: t.add_(b), a)),
        ("inplace_row", 2, lambda m, a, b: _inplace(lambda t: t[1].mul_(b[0]), a)),
        ("inplace_col_view", 1, lambda m, a: _inplace(lambda t: t.t()[2].add_(1.0), a)),
        ("setitem_slice", 2, lambda m, a, b: _setitem(a, b)),
        ("inplace_sigmoid", 1, lambda m, a: _inplace(lambda t: t.sigmoid_(), a)),
        ("masked_fill", 1, lambda m, a: a.masked_fill(a < -0.5, 0.25)),
        ("stale_sibling_view", 2, lambda m, a, b: _sibling(a, b)),
        ("stale_view_of_base", 1, lambda m, a: _view_then_base_inplace(a)),
        ("gather_rows", 1, lambda m, a: a[[2, 0, 1]] * 1),
    ]


def _inplace(op, a):
    t = a * 1  # a fresh non-leaf: in-place on it is legal in both frameworks
    op(t)
    return t


def _sibling(a, b):
    t = a * 1
    v = t.t()  # made before the write below: its history must follow it
    t[1:, 2].mul_(b[0, 0])
    return v.t() * 1


def _view_then_base_inplace(a):
    t = a * 1
    v = t[:, 1:3]
    t.sigmoid_()
    return t + v.sum(1, keepdim=True)


def _setitem(a, b):
    t = a.clone()
    t[:, 1:3] = b[:, :2] * 2
    return t


@pytest.mark.parametrize("seed", range(24))
def test_random_graph_matches_torch(seed):
    rng = np.random.default_rng(seed)
    ops = _ops()
    leaves_np = [rng.uniform(-1, 1, SHAPE) for _ in range(3)]
    plan = []
    for step in range(int(rng.integers(4, 10))):
        name, arity, _ = ops[int(rng.integers(0, len(ops)))]
        args = [int(rng.integers(0, 3 + step)) for _ in range(arity)]  # any earlier value: shared subgraphs
        plan.append((name, args))
    weights = rng.standard_normal(SHAPE)
    fns = {name: fn for name, _, fn in ops}

    def run(m, make):
        leaves = [make(v) for v in leaves_np]
        values = list(leaves)
        for name, args in plan:
            values.append(fns[name](m, *[values[i] for i in args]))
        loss = sum((v * make(weights).detach()).sum() for v in values[3:])
        return leaves, values, loss

    c_leaves, c_values, c_loss = run(cg, lambda v: cg.tensor(v, dtype=cg.float64, requires_grad=True))
    t_leaves, t_values, t_loss = run(torch, lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True))
    np.testing.assert_allclose(c_loss.item(), t_loss.item(), rtol=1e-10, err_msg=str(plan))
    c_loss.backward()
    t_loss.backward()
    for i, (c, t) in enumerate(zip(c_leaves, t_leaves)):
        if t.grad is None:
            assert c.grad is None or not np.any(c.grad.numpy()), f"leaf {i}: {plan}"
            continue
        np.testing.assert_allclose(c.grad.numpy(), t.grad.numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=f"leaf {i}: {plan}")
