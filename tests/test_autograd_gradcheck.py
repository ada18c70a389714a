"""Every differentiable op's backward against central finite differences
(cutegrad.autograd.gradcheck, float64), and second derivatives
(gradgradcheck) for a representative set."""
import numpy as np
import pytest

import cutegrad as cg
from cutegrad.autograd import gradcheck, gradgradcheck

R = np.random.default_rng(77)


def x(*shape, lo=-2.0, hi=2.0):
    return cg.tensor(R.uniform(lo, hi, size=shape), dtype=cg.float64, requires_grad=True)


def away_from(*shape, kinks=(0.0,), margin=0.2, lo=-2.0, hi=2.0):
    """Inputs at least `margin` from the op's kinks, so finite differences are valid."""
    v = R.uniform(lo, hi, size=shape)
    for k in kinks:
        near = np.abs(v - k) < margin
        v[near] = k + np.sign(v[near] - k + 1e-12) * margin * 1.5
    return cg.tensor(v, dtype=cg.float64, requires_grad=True)


def idx(hi, *shape):
    return cg.tensor(R.integers(0, hi, size=shape))


# id -> (fn, inputs factory)
CASES = {
    "add_bcast": (lambda a, b: a + b, lambda: (x(2, 3), x(3))),
    "add_alpha": (lambda a, b: cg.add(a, b, alpha=-1.5), lambda: (x(2, 1), x(3))),
    "sub": (lambda a, b: a - b, lambda: (x(3, 1), x(1, 2))),
    "mul": (lambda a, b: a * b, lambda: (x(2, 3), x(2, 1))),
    "div": (lambda a, b: a / b, lambda: (x(2, 3), x(3, lo=0.5, hi=2))),
    "scalar_ops": (lambda a: (3 - a) * 2.5 / (a * a + 1) + 1, lambda: (x(4),)),
    "pow_tt": (lambda a, b: a ** b, lambda: (x(2, 3, lo=0.3), x(3))),
    "pow_ts": (lambda a: a ** 3 + a ** -1.5, lambda: (x(4, lo=0.3),)),
    "pow_st": (lambda a: 1.7 ** a, lambda: (x(4),)),
    "maximum": (cg.maximum, lambda: (x(2, 3), x(3))),
    "minimum": (cg.minimum, lambda: (x(2, 3), x(2, 1))),
    "exp": (cg.exp, lambda: (x(5),)),
    "log": (cg.log, lambda: (x(5, lo=0.2),)),
    "sqrt": (cg.sqrt, lambda: (x(5, lo=0.2),)),
    "rsqrt": (cg.rsqrt, lambda: (x(5, lo=0.2),)),
    "abs": (cg.abs, lambda: (away_from(5),)),
    "neg": (cg.neg, lambda: (x(5),)),
    "tanh": (cg.tanh, lambda: (x(5),)),
    "sigmoid": (cg.sigmoid, lambda: (x(5, lo=-5, hi=5),)),
    "relu": (cg.relu, lambda: (away_from(6),)),
    "gelu": (cg.gelu, lambda: (x(6, lo=-4, hi=4),)),
    "gelu_tanh": (lambda a: cg.gelu(a, approximate="tanh"), lambda: (x(6, lo=-4, hi=4),)),
    "silu": (cg.silu, lambda: (x(6, lo=-5, hi=5),)),
    "sin_cos": (lambda a: cg.sin(a) + cg.cos(a), lambda: (x(4),)),
    "erf": (cg.erf, lambda: (x(5),)),
    "log1p_expm1": (lambda a: cg.log1p(a) * cg.expm1(a), lambda: (x(4, lo=-0.5),)),
    "reciprocal_square": (lambda a: cg.reciprocal(a) + cg.square(a), lambda: (x(4, lo=0.3),)),
    "clamp": (lambda a: cg.clamp(a, -0.5, 0.5), lambda: (away_from(8, kinks=(-0.5, 0.5), margin=0.1),)),
    "where": (lambda a, b: cg.where(cg.tensor([True, False, True]), a, b), lambda: (x(2, 3), x(3))),
    "masked_fill": (lambda a: a.masked_fill(cg.tensor([False, True, False]), 2.0), lambda: (x(2, 3),)),
    "masked_fill_tensor_value": (lambda a, v: a.masked_fill(cg.tensor([[False, True, False], [True, True, False]]), v),
                                 lambda: (x(2, 3), x())),
    "sum": (lambda a: a.sum((0, 2), keepdim=True), lambda: (x(2, 3, 2),)),
    "sum_all": (lambda a: a.sum(), lambda: (x(2, 3),)),
    "mean": (lambda a: a.mean(-1), lambda: (x(2, 3),)),
    "max_all": (lambda a: a.max(), lambda: (x(2, 3),)),
    "max_dim": (lambda a: a.max(1).values, lambda: (x(3, 4),)),
    "min_dim_keep": (lambda a: a.min(0, keepdim=True)[0], lambda: (x(3, 4),)),
    "amax": (lambda a: cg.amax(a, (0, 1)), lambda: (x(2, 3, 2),)),
    "amin": (lambda a: cg.amin(a, 1, keepdim=True), lambda: (x(2, 3),)),
    "prod": (lambda a: cg.prod(a, 1), lambda: (x(2, 3, lo=0.5),)),
    "prod_with_zeros": (lambda a: cg.prod(a * cg.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]],
                                                        dtype=cg.float64), 1), lambda: (x(3, 3),)),
    "prod_all": (lambda a: cg.prod(a), lambda: (x(2, 3, lo=0.5),)),
    "remainder": (lambda a, b: a % b, lambda: (away_from(5, kinks=(-2.0, -1.0, 0.0, 1.0, 2.0), margin=0.1),
                                               cg.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=cg.float64,
                                                         requires_grad=True))),
    "var": (lambda a: a.var(1), lambda: (x(2, 4),)),
    "var_tuple": (lambda a: cg.var(a, (0, 2), correction=0, keepdim=True), lambda: (x(2, 3, 2),)),
    "std": (lambda a: a.std(), lambda: (x(2, 3),)),
    "logsumexp": (lambda a: cg.logsumexp(a, (0, 1)), lambda: (x(2, 3, 2),)),
    "matmul": (cg.matmul, lambda: (x(2, 3), x(3, 2))),
    "matmul_bcast": (cg.matmul, lambda: (x(2, 1, 2, 3), x(2, 3, 2))),
    "matmul_vec": (cg.matmul, lambda: (x(3), x(2, 3, 2))),
    "matmul_dot": (cg.matmul, lambda: (x(4), x(4))),
    "bmm": (cg.bmm, lambda: (x(2, 2, 3), x(2, 3, 2))),
    "linear": (cg.linear, lambda: (x(2, 3), x(4, 3), x(4))),
    "softmax": (lambda a: cg.softmax(a, 1), lambda: (x(2, 4),)),
    "log_softmax": (lambda a: cg.log_softmax(a, 0), lambda: (x(3, 2),)),
    "cross_entropy": (lambda a: cg.cross_entropy(a, cg.tensor([0, 2, 1])), lambda: (x(3, 4),)),
    "cross_entropy_ls_ignore": (lambda a: cg.cross_entropy(a, cg.tensor([[0, 2], [1, 1]]), ignore_index=1,
                                                           label_smoothing=0.2), lambda: (x(2, 3, 2),)),
    "cross_entropy_weight_sum": (lambda a: cg.cross_entropy(a, cg.tensor([0, 2, 1]), reduction="sum",
                                                            weight=cg.tensor([1.0, 0.5, 2.0], dtype=cg.float64)),
                                 lambda: (x(3, 3),)),
    "cross_entropy_probs": (lambda a, p: cg.cross_entropy(a, cg.softmax(p, 1), label_smoothing=0.1),
                            lambda: (x(2, 3), x(2, 3))),
    "nll_none": (lambda a: cg.nll_loss(a, cg.tensor([1, 0]), reduction="none"), lambda: (x(2, 3),)),
    "mse": (cg.mse_loss, lambda: (x(2, 3), x(2, 3))),
    "layer_norm": (lambda a, w, b: cg.layer_norm(a, (4,), w, b), lambda: (x(2, 4), x(4), x(4))),
    "layer_norm_2d_noaffine": (lambda a: cg.layer_norm(a, (2, 3)), lambda: (x(2, 2, 3),)),
    "rms_norm": (lambda a, w: cg.rms_norm(a, (3,), w), lambda: (x(3, 3), x(3))),
    "embedding": (lambda w: cg.embedding(cg.tensor([[0, 2], [2, 2]]), w), lambda: (x(3, 2),)),
    "dropout": (lambda a: cg.dropout(a, 0.4, generator=cg.Generator().manual_seed(3)), lambda: (x(8),)),
    "sdpa": (lambda q, k, v: cg.scaled_dot_product_attention(q, k, v), lambda: (x(1, 2, 2), x(1, 3, 2), x(1, 3, 2))),
    "sdpa_causal": (lambda q, k, v: cg.scaled_dot_product_attention(q, k, v, is_causal=True),
                    lambda: (x(3, 2), x(3, 2), x(3, 2))),
    "sdpa_masks": (lambda q, k, v, m: cg.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.7),
                   lambda: (x(2, 2), x(3, 2), x(3, 2), x(2, 3))),
    "sdpa_bool_mask": (lambda q, k, v: cg.scaled_dot_product_attention(
        q, k, v, attn_mask=cg.tensor([[True, False, True], [True, True, False]])), lambda: (x(2, 2), x(3, 2), x(3, 2))),
    "cat": (lambda a, b: cg.cat([a, b, a], 1), lambda: (x(2, 1), x(2, 2))),
    "stack": (lambda a, b: cg.stack([a, b], 1), lambda: (x(2, 2), x(2, 2))),
    "gather": (lambda a: cg.gather(a, 1, cg.tensor([[0, 0, 2], [1, 2, 2]])), lambda: (x(2, 3),)),
    "index_select": (lambda a: cg.index_select(a, 0, cg.tensor([1, 1, 0])), lambda: (x(2, 3),)),
    "scatter_add": (lambda a, s: cg.scatter_add(a, 0, cg.tensor([[1, 0], [1, 1]]), s), lambda: (x(2, 2), x(2, 2))),
    "scatter_add_small_index": (lambda a, s: cg.scatter_add(a, 0, cg.tensor([[1, 0]]), s), lambda: (x(2, 3), x(2, 3))),
    "index_add": (lambda a, s: cg.index_add(a, 1, cg.tensor([2, 0, 2]), s), lambda: (x(2, 3), x(2, 3))),
    "adv_index": (lambda a: a[cg.tensor([1, 0, 1]), 1:], lambda: (x(2, 3),)),
    "mask_index": (lambda a: a[cg.tensor([[True, False, True], [False, False, True]])], lambda: (x(2, 3),)),
    "clone": (lambda a: a.clone() * a, lambda: (x(3),)),
    "views": (lambda a: a.view(3, 2).t()[1:, None].reshape(-1).expand(2, 3).flatten(),
              lambda: (x(2, 3),)),
    "permute_transpose": (lambda a: a.permute(2, 0, 1).transpose(0, 1).contiguous(), lambda: (x(2, 2, 3),)),
    "slicing": (lambda a: a[..., ::2][1:, None, 0], lambda: (x(3, 2, 3),)),
    "squeeze_unsqueeze": (lambda a: a.squeeze(1).unsqueeze(0), lambda: (x(2, 1, 3),)),
    "split_chunk_unbind": (lambda a: a.split(2, 1)[1] * a.chunk(2)[0] + a.unbind(0)[1][None], lambda: (x(2, 3),)),
    "repeat": (lambda a: a.repeat(2, 3), lambda: (x(2, 1),)),
    "narrow_select": (lambda a: a.narrow(1, 1, 2).select(0, -1), lambda: (x(2, 3),)),
    "as_strided": (lambda a: a.as_strided((2, 2), (1, 2), 1), lambda: (x(6),)),
    "tril": (lambda a: cg.tril(a), lambda: (x(3, 3),)),
    "movedim": (lambda a: cg.movedim(a, 0, -1), lambda: (x(2, 3, 1),)),
    "setitem": (lambda a, v: _setitem(a, v), lambda: (x(3, 4), x(2))),
    "inplace_chain": (lambda a: _inplace_chain(a), lambda: (x(2, 3, lo=0.3),)),
    "multi_output_max": (lambda a: cg.max(a, 0), lambda: (x(3, 2),)),
    "sort": (lambda a: cg.sort(a, 1, descending=True).values, lambda: (x(2, 4),)),
    "topk": (lambda a: cg.topk(a, 2, 0).values, lambda: (x(4, 2),)),
    "cumsum": (lambda a: cg.cumsum(a, 1), lambda: (x(2, 4),)),
    "norm_2": (lambda a: cg.norm(a, dim=1), lambda: (x(2, 3),)),
    "norm_3": (lambda a: cg.norm(a, 3, dim=0, keepdim=True), lambda: (away_from(3, 2),)),
    "norm_1": (lambda a: cg.norm(a, 1), lambda: (away_from(2, 3),)),
    "flip": (lambda a: cg.flip(a, (0, 1)), lambda: (x(2, 3),)),
    "lerp": (lambda a, b, w: cg.lerp(a, b, w), lambda: (x(2, 3), x(3), x(2, 1))),
    "addcmul_addcdiv": (lambda a, b, c: cg.addcdiv(cg.addcmul(a, b, c, value=0.5), b, c, value=2),
                        lambda: (x(2, 3), x(2, 3), x(3, lo=0.5))),
    "log2_log10": (lambda a: cg.log2(a) * cg.log10(a), lambda: (x(4, lo=0.2),)),
    "outer": (cg.outer, lambda: (x(3), x(2))),
    "masked_select": (lambda a: cg.masked_select(a, cg.tensor([True, False, True])), lambda: (x(2, 3),)),
    "inplace_optimizer_ops": (lambda a, b: _optimizer_ops(a, b), lambda: (x(3), x(3, lo=0.5))),
}


def _setitem(a, v):
    b = a * 1
    b[1, 1:3] = v
    b[cg.tensor([0, 2]), 0] = v * 2
    return b


def _optimizer_ops(a, b):
    m = a * 1
    m.lerp_(b, 0.1).addcmul_(a, b, value=0.3).addcdiv_(a, b, value=-0.2)
    return m


def _inplace_chain(a):
    b = a.clone()
    b.mul_(2).add_(a).sqrt_()
    b[0].exp_()
    return b


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck(name):
    fn, make = CASES[name]
    assert gradcheck(fn, make())


GRADGRAD = ["gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "softmax", "log_softmax", "layer_norm", "rms_norm",
            "matmul", "exp", "div", "pow_tt", "cross_entropy", "sdpa", "mse", "logsumexp", "prod_with_zeros",
            "multi_output_max", "setitem", "inplace_chain", "cumsum", "norm_2", "var", "where", "gather"]


@pytest.mark.parametrize("name", GRADGRAD)
def test_gradgradcheck(name):
    fn, make = CASES[name]
    assert gradgradcheck(fn, make())


def test_gradcheck_detects_a_wrong_backward():
    class WrongSquare(cg.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a * a

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            return g * a  # should be 2 * a * g

    with pytest.raises(AssertionError, match="gradcheck failed"):
        gradcheck(WrongSquare.apply, (x(3),))
    assert gradcheck(WrongSquare.apply, (x(3),), raise_exception=False) is False


def test_gradcheck_rejects_float32_inputs():
    with pytest.raises(ValueError, match="float64"):
        gradcheck(cg.exp, (cg.ones(2, requires_grad=True),))


def test_gradcheck_of_non_contiguous_and_0_dim_inputs():
    base = cg.tensor(R.uniform(-1, 1, (3, 4)), dtype=cg.float64)
    t = base.t().detach().requires_grad_()  # a non-contiguous leaf
    assert not t.is_contiguous()
    assert gradcheck(lambda a: (a * a).sum(0), (t,))
    assert gradcheck(lambda a: a.exp() * 2, (x(),))


def test_gradcheck_overlapping_as_strided_windows():
    assert gradcheck(lambda a: a.as_strided((4, 3), (2, 1), 1) ** 2, (x(10),))
