"""Differential tests against PyTorch CPU: the same NumPy inputs go through
cutegrad and torch; outputs, output dtypes and input gradients (for a random
cotangent) must agree. Most ops are written once, as `lambda m, ...` over the
module `m` (cutegrad or torch), since cutegrad keeps torch's names."""
import numpy as np
import pytest

import cutegrad as cg

torch = pytest.importorskip("torch")
F = torch.nn.functional
ATOL = {np.float64: 1e-10, np.float32: 2e-5}


def _fn(m):
    """The functional namespace: torch.nn.functional or cutegrad itself."""
    return F if m is torch else cg


def _run(lib, op, arrays, grad_mask, cotangent_seed):
    """Build inputs in lib, run op, backprop a fixed random cotangent."""
    ins = []
    for arr, g in zip(arrays, grad_mask):
        if lib is torch:
            t = torch.from_numpy(np.array(arr))
            ins.append(t.requires_grad_(g))
        else:
            ins.append(cg.tensor(np.array(arr), requires_grad=g))
    out = op(lib, *ins)
    outs = out if isinstance(out, tuple) else (out,)
    grads = None
    if any(grad_mask):
        rng = np.random.default_rng(cotangent_seed)
        total = 0
        for o in outs:
            if not o.dtype.is_floating_point:
                continue
            c = rng.standard_normal(tuple(o.shape)).astype(np.float64)
            ct = torch.from_numpy(c).to(o.dtype) if lib is torch else cg.tensor(c, dtype=o.dtype)
            total = total + (o * ct).sum()
        if isinstance(total, int):  # no differentiable output (argmax, comparisons)
            return outs, None
        if lib is torch:
            grads = torch.autograd.grad(total, [t for t, g in zip(ins, grad_mask) if g], allow_unused=True)
        else:
            grads = cg.autograd.grad(total, [t for t, g in zip(ins, grad_mask) if g], allow_unused=True)
    return outs, grads


def _np(t):
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        t = t.detach()
        return t.to(torch.float64).numpy() if t.dtype.is_floating_point else t.numpy()
    t = t.detach()
    return t.numpy().astype(np.float64) if t.dtype.is_floating_point else t.numpy()


def _same_dtype(cg_t, th_t):
    return str(th_t.dtype).replace("torch.", "") == cg_t.dtype.name


def assert_parity(op, arrays, grad_mask=None, rtol=1e-7, atol=None, seed=0):
    grad_mask = grad_mask if grad_mask is not None else [a.dtype.kind == "f" for a in arrays]
    atol = atol if atol is not None else ATOL.get(arrays[0].dtype.type, 1e-6)
    c_outs, c_grads = _run(cg, op, arrays, grad_mask, seed)
    t_outs, t_grads = _run(torch, op, arrays, grad_mask, seed)
    assert len(c_outs) == len(t_outs)
    for c, t in zip(c_outs, t_outs):
        assert tuple(c.shape) == tuple(t.shape), f"shape {tuple(c.shape)} vs torch {tuple(t.shape)}"
        assert _same_dtype(c, t), f"dtype {c.dtype} vs torch {t.dtype}"
        np.testing.assert_allclose(_np(c), _np(t), rtol=rtol, atol=atol, equal_nan=True, err_msg="forward")
    if c_grads is not None:
        for i, (c, t) in enumerate(zip(c_grads, t_grads)):
            if t is None:
                assert c is None or not np.any(_np(c)), f"grad {i}: torch has none"
                continue
            assert c is not None, f"grad {i}: cutegrad has none"
            assert tuple(c.shape) == tuple(t.shape)
            np.testing.assert_allclose(_np(c), _np(t), rtol=rtol * 10, atol=atol * 10, err_msg=f"grad {i}")


R = np.random.default_rng(2024)


def r(*shape, lo=-2.0, hi=2.0, dtype=np.float64):
    return R.uniform(lo, hi, size=shape).astype(dtype)


def ints(hi, *shape, lo=0):
    return R.integers(lo, hi, size=shape).astype(np.int64)


# (id, op, arrays-maker); arrays are float64 unless stated
CASES = [
    ("add_bcast", lambda m, a, b: m.add(a, b), lambda: [r(3, 1, 5), r(4, 1)]),
    ("add_alpha", lambda m, a, b: m.add(a, b, alpha=2.5), lambda: [r(3, 4), r(4)]),
    ("sub_alpha", lambda m, a, b: m.sub(a, b, alpha=-0.5), lambda: [r(3, 4), r(3, 1)]),
    ("mul", lambda m, a, b: a * b, lambda: [r(2, 3, 4), r(3, 1)]),
    ("div", lambda m, a, b: a / b, lambda: [r(5, 3), r(3, lo=0.5, hi=2)]),
    ("rdiv_scalar", lambda m, a: 3.0 / a, lambda: [r(4, lo=0.5)]),
    ("rsub_scalar", lambda m, a: 1 - a, lambda: [r(4)]),
    ("pow_tt", lambda m, a, b: a ** b, lambda: [r(3, 4, lo=0.2), r(4)]),
    ("pow_ts", lambda m, a: a ** 3, lambda: [r(7)]),
    ("pow_st", lambda m, a: 2.0 ** a, lambda: [r(7)]),
    ("pow_half", lambda m, a: m.pow(a, 0.5), lambda: [r(7, lo=0.1)]),
    ("pow_zero_base", lambda m, a, b: m.pow(a, b), lambda: [np.array([0.0, 0.0, 2.0]), np.array([2.0, 1.0, 0.0])]),
    ("maximum_ties", lambda m, a, b: m.maximum(a, b), lambda: [np.array([1.0, 2.0, 3.0]), np.array([1.0, 5.0, 0.0])]),
    ("minimum_bcast", lambda m, a, b: m.minimum(a, b), lambda: [r(3, 4), r(1, 4)]),
    ("exp", lambda m, a: m.exp(a), lambda: [r(3, 5)]),
    ("log", lambda m, a: m.log(a), lambda: [r(3, 5, lo=0.1)]),
    ("sqrt", lambda m, a: m.sqrt(a), lambda: [r(3, 5, lo=0.1)]),
    ("rsqrt", lambda m, a: m.rsqrt(a), lambda: [r(3, 5, lo=0.1)]),
    ("abs", lambda m, a: m.abs(a), lambda: [r(3, 5)]),
    ("neg", lambda m, a: -a, lambda: [r(3, 5)]),
    ("tanh", lambda m, a: m.tanh(a), lambda: [r(3, 5)]),
    ("sigmoid", lambda m, a: m.sigmoid(a), lambda: [r(3, 5, lo=-8, hi=8)]),
    ("relu", lambda m, a: m.relu(a), lambda: [r(3, 5)]),
    ("gelu", lambda m, a: _fn(m).gelu(a), lambda: [r(3, 5, lo=-4, hi=4)]),
    ("gelu_tanh", lambda m, a: _fn(m).gelu(a, approximate="tanh"), lambda: [r(3, 5, lo=-4, hi=4)]),
    ("silu", lambda m, a: _fn(m).silu(a), lambda: [r(3, 5, lo=-6, hi=6)]),
    ("sin_cos", lambda m, a: m.sin(a) * m.cos(a), lambda: [r(6)]),
    ("erf", lambda m, a: m.erf(a), lambda: [r(6)]),
    ("log1p_expm1", lambda m, a: m.log1p(a) + m.expm1(a), lambda: [r(6, lo=-0.5)]),
    ("reciprocal_square", lambda m, a: m.reciprocal(a) + m.square(a), lambda: [r(6, lo=0.5)]),
    ("clamp", lambda m, a: m.clamp(a, -0.5, 0.7), lambda: [r(4, 5)]),
    ("clamp_min", lambda m, a: m.clamp(a, min=0.1), lambda: [r(4, 5)]),
    ("where", lambda m, a, b: m.where(a > 0, a, b), lambda: [r(3, 4), r(4)]),
    ("where_scalar", lambda m, a: m.where(a > 0, a, 0.0), lambda: [r(3, 4)]),
    ("uint8_wraps_scalars", lambda m, a: (m.where(a > 1, a, -3), m.clamp(a, min=-3, max=3), a.masked_fill(a > 2, -1)),
     lambda: [np.array([0, 1, 2, 4], dtype=np.uint8)]),
    ("masked_fill", lambda m, a: a.masked_fill(a < 0, -1.5), lambda: [r(3, 4)]),
    ("masked_fill_bcast", lambda m, a: a.masked_fill(m.tensor([[True], [False]]), 1.0), lambda: [r(3)]),
    ("comparisons", lambda m, a, b: (a < b, a <= b, a == b, a != b, a > b, a >= b),
     lambda: [np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0])]),
    ("sum_all", lambda m, a: a.sum(), lambda: [r(3, 4, 5)]),
    ("sum_dims_keep", lambda m, a: a.sum((0, 2), keepdim=True), lambda: [r(3, 4, 5)]),
    ("mean_neg_dim", lambda m, a: a.mean(-1), lambda: [r(3, 4, 5)]),
    ("max_all", lambda m, a: a.max(), lambda: [r(3, 4)]),
    ("max_all_ties", lambda m, a: a.max(), lambda: [np.array([[1.0, 3.0], [3.0, 0.0]])]),
    ("max_dim", lambda m, a: tuple(a.max(1)), lambda: [r(3, 4, 5)]),
    ("min_dim_keep", lambda m, a: tuple(a.min(0, keepdim=True)), lambda: [r(3, 4)]),
    ("amax_tuple", lambda m, a: m.amax(a, (0, 1)), lambda: [r(3, 4, 2)]),
    ("amin_ties", lambda m, a: m.amin(a, 1), lambda: [np.array([[2.0, 2.0, 5.0], [1.0, 0.0, 0.0]])]),
    ("argmax_dim", lambda m, a: m.argmax(a, 1), lambda: [r(3, 4)]),
    ("argmin_all", lambda m, a: m.argmin(a), lambda: [r(3, 4)]),
    ("var_dim", lambda m, a: a.var(1), lambda: [r(3, 6)]),
    ("var_biased", lambda m, a: m.var(a, (0, 1), unbiased=False, keepdim=True), lambda: [r(3, 6, 2)]),
    ("std_all", lambda m, a: a.std(), lambda: [r(3, 6)]),
    ("std_correction", lambda m, a: m.std(a, 0, correction=0), lambda: [r(3, 6)]),
    ("logsumexp", lambda m, a: m.logsumexp(a, (1, 2)), lambda: [r(3, 4, 5)]),
    ("logsumexp_keep", lambda m, a: m.logsumexp(a, -1, keepdim=True), lambda: [r(3, 4)]),
    ("prod", lambda m, a: m.prod(a, 1), lambda: [r(3, 4, lo=0.5)]),
    ("prod_zeros", lambda m, a: m.prod(a, 1), lambda: [np.array([[0.0, 2.0, 3.0], [0.0, 0.0, 4.0], [1.0, 2.0, 3.0]])]),
    ("prod_all_zero", lambda m, a: m.prod(a), lambda: [np.array([[0.0, 2.0], [1.5, 3.0]])]),
    ("remainder", lambda m, a, b: a % b, lambda: [r(3, 4, lo=-5, hi=5), r(4, lo=0.5, hi=2)]),
    ("sign_floor", lambda m, a: m.sign(a) * a + m.floor(a) * 0 + a.round(), lambda: [r(5)]),
    ("matmul_bcast", lambda m, a, b: a @ b, lambda: [r(2, 1, 4, 3), r(5, 3, 2)]),
    ("matmul_vec_mat", lambda m, a, b: m.matmul(a, b), lambda: [r(3), r(2, 3, 4)]),
    ("matmul_mat_vec", lambda m, a, b: m.matmul(a, b), lambda: [r(2, 4, 3), r(3)]),
    ("matmul_dot", lambda m, a, b: m.matmul(a, b), lambda: [r(5), r(5)]),
    ("bmm", lambda m, a, b: m.bmm(a, b), lambda: [r(3, 2, 4), r(3, 4, 5)]),
    ("mm", lambda m, a, b: m.mm(a, b), lambda: [r(2, 4), r(4, 5)]),
    ("linear", lambda m, x, w, b: _fn(m).linear(x, w, b), lambda: [r(2, 3, 4), r(5, 4), r(5)]),
    ("softmax", lambda m, a: m.softmax(a, 1), lambda: [r(3, 4, 5)]),
    ("log_softmax", lambda m, a: m.log_softmax(a, -1), lambda: [r(3, 4, 5)]),
    ("ce_idx", lambda m, x, t: _fn(m).cross_entropy(x, t), lambda: [r(6, 5), ints(5, 6)]),
    ("ce_kdim_ignore", lambda m, x, t: _fn(m).cross_entropy(x, t, ignore_index=1),
     lambda: [r(2, 4, 3, 2), ints(4, 2, 3, 2)]),
    ("ce_smooth_sum", lambda m, x, t: _fn(m).cross_entropy(x, t, label_smoothing=0.2, reduction="sum"),
     lambda: [r(6, 5), ints(5, 6)]),
    ("ce_smooth_ignore_mean", lambda m, x, t: _fn(m).cross_entropy(x, t, label_smoothing=0.3, ignore_index=0),
     lambda: [r(8, 5), ints(5, 8)]),
    ("ce_weight_smooth", lambda m, x, t, w: _fn(m).cross_entropy(x, t, weight=w.detach(), label_smoothing=0.1),
     lambda: [r(6, 4), ints(4, 6), r(4, lo=0.2)]),
    ("ce_weight_none", lambda m, x, t, w: _fn(m).cross_entropy(x, t, weight=w.detach(), reduction="none",
                                                                     ignore_index=2),
     lambda: [r(6, 4), ints(4, 6), r(4, lo=0.2)]),
    ("ce_probs", lambda m, x, p: _fn(m).cross_entropy(x, p, label_smoothing=0.1), lambda: [r(5, 4), r(5, 4, lo=0)]),
    ("ce_probs_weight", lambda m, x, p, w: _fn(m).cross_entropy(x, p, weight=w.detach()), lambda: [r(5, 4), r(5, 4, lo=0),
                                                                                          r(4, lo=0.2)]),
    ("ce_unbatched", lambda m, x, t: _fn(m).cross_entropy(x, t), lambda: [r(5), np.array(2)]),
    ("nll", lambda m, x, t: _fn(m).nll_loss(x, t, reduction="sum"), lambda: [r(6, 5), ints(5, 6)]),
    ("mse", lambda m, a, b: _fn(m).mse_loss(a, b), lambda: [r(3, 4), r(3, 4)]),
    ("mse_none", lambda m, a, b: _fn(m).mse_loss(a, b, reduction="none"), lambda: [r(3, 4), r(3, 4)]),
    ("layer_norm", lambda m, x, w, b: _fn(m).layer_norm(x, (5,), w, b), lambda: [r(3, 4, 5), r(5), r(5)]),
    ("layer_norm_2d", lambda m, x, w, b: _fn(m).layer_norm(x, (4, 5), w, b, eps=1e-3),
     lambda: [r(3, 4, 5), r(4, 5), r(4, 5)]),
    ("layer_norm_plain", lambda m, x: _fn(m).layer_norm(x, (6,)), lambda: [r(2, 6)]),
    ("rms_norm", lambda m, x, w: _fn(m).rms_norm(x, (5,), w), lambda: [r(3, 4, 5), r(5)]),
    ("rms_norm_eps", lambda m, x: _fn(m).rms_norm(x, (3, 5), eps=1e-4), lambda: [r(2, 3, 5)]),
    ("embedding", lambda m, i, w: _fn(m).embedding(i, w), lambda: [ints(7, 3, 4), r(7, 5)]),
    ("embedding_repeat_pad", lambda m, i, w: _fn(m).embedding(i, w, padding_idx=1),
     lambda: [np.array([[1, 2, 1], [2, 2, 0]]), r(4, 3)]),
    ("sdpa", lambda m, q, k, v: _fn(m).scaled_dot_product_attention(q, k, v), lambda: [r(2, 3, 4, 5), r(2, 3, 6, 5),
                                                                                     r(2, 3, 6, 7)]),
    ("sdpa_causal", lambda m, q, k, v: _fn(m).scaled_dot_product_attention(q, k, v, is_causal=True),
     lambda: [r(2, 5, 4), r(2, 5, 4), r(2, 5, 3)]),
    ("sdpa_causal_rect", lambda m, q, k, v: _fn(m).scaled_dot_product_attention(q, k, v, is_causal=True),
     lambda: [r(1, 3, 4), r(1, 6, 4), r(1, 6, 3)]),
    ("sdpa_bool_mask", lambda m, q, k, v: _fn(m).scaled_dot_product_attention(
        q, k, v, attn_mask=m.tensor([[True, False, True], [False, True, True]])),
     lambda: [r(2, 2, 4), r(2, 3, 4), r(2, 3, 5)]),
    ("sdpa_additive_scale", lambda m, q, k, v, am: _fn(m).scaled_dot_product_attention(
        q, k, v, attn_mask=am, scale=0.25), lambda: [r(2, 2, 3, 4), r(2, 2, 5, 4), r(2, 2, 5, 4), r(2, 1, 3, 5)]),
    ("cat", lambda m, a, b: m.cat([a, b], 1), lambda: [r(2, 3), r(2, 5)]),
    ("stack", lambda m, a, b: m.stack([a, b], -1), lambda: [r(2, 3), r(2, 3)]),
    ("gather", lambda m, a, i: m.gather(a, 1, i), lambda: [r(3, 5), ints(5, 3, 4)]),
    ("gather_small_index", lambda m, a, i: m.gather(a, 0, i), lambda: [r(4, 5), ints(4, 2, 3)]),
    ("index_select", lambda m, a, i: m.index_select(a, 0, i), lambda: [r(4, 3), np.array([3, 0, 3, 1])]),
    ("adv_index", lambda m, a, i: a[i], lambda: [r(5, 3), np.array([[0, 4], [4, 4]])]),
    ("adv_index_two", lambda m, a, i, j: a[i, :, j], lambda: [r(4, 3, 5), np.array([0, 3, 3]), np.array([1, 1, 4])]),
    ("mask_index", lambda m, a: a[a > 0], lambda: [r(4, 5)]),
    ("one_hot", lambda m, i: _fn(m).one_hot(i, 6), lambda: [ints(6, 3, 2)]),
    ("scatter_add", lambda m, a, i, s: m.scatter_add(a, 1, i, s), lambda: [r(3, 4), ints(4, 3, 2), r(3, 2)]),
    ("scatter_add_small_index", lambda m, a, i, s: a.scatter_add(0, i, s.detach()), lambda: [r(3, 4), ints(3, 2, 3),
                                                                                   r(4, 5)]),
    ("index_add", lambda m, a, i, s: m.index_add(a, 0, i, s), lambda: [r(4, 3), np.array([1, 1, 0]), r(3, 3)]),
    ("index_add_alpha", lambda m, a, i, s: a.index_add(1, i, s, alpha=-2.5), lambda: [r(3, 4), np.array([3, 0, 3]),
                                                                                     r(3, 3)]),
    ("to_float32", lambda m, a: a.to(m.float32) * 2, lambda: [r(3, 4)]),
    ("clone_detach", lambda m, a: a.clone() * a.detach(), lambda: [r(3)]),
    ("views", lambda m, a: a.view(4, 6).t()[1:, ::2].reshape(-1).unsqueeze(0).expand(3, -1).flatten(),
     lambda: [r(2, 3, 4)]),
    ("permute_transpose", lambda m, a: a.permute(2, 0, 1).transpose(0, 2).contiguous() * 2, lambda: [r(2, 3, 4)]),
    ("slices", lambda m, a: a[1, ..., None, ::2] + a[:1, 1:2, -1:, None], lambda: [r(3, 4, 5)]),
    ("squeeze", lambda m, a: a.squeeze(1).unsqueeze(0) * a.squeeze(), lambda: [r(3, 1, 4)]),
    ("split_chunk_unbind", lambda m, a: tuple(a.split(2, 1)) + tuple(a.chunk(2, 0)) + a.unbind(1),
     lambda: [r(4, 5)]),
    ("split_sizes", lambda m, a: tuple(a.split([1, 3, 1], 1)), lambda: [r(2, 5)]),
    ("chunk_uneven", lambda m, a: a.chunk(4), lambda: [r(6, 2)]),
    ("repeat", lambda m, a: a.repeat(2, 1, 3), lambda: [r(2, 3)]),
    ("narrow_select", lambda m, a: a.narrow(1, 1, 2).select(0, -1), lambda: [r(3, 4)]),
    ("movedim", lambda m, a: m.movedim(a, 0, 2) * 1, lambda: [r(2, 3, 4)]),
    ("tril_triu", lambda m, a: m.tril(a, -1) + m.triu(a, 1), lambda: [r(4, 5)]),
    ("max_binary_method", lambda m, a, b: a.max(b), lambda: [r(3), r(3)]),
    ("sort", lambda m, a: tuple(m.sort(a, 1)), lambda: [r(3, 5)]),
    ("sort_desc_ties_nan", lambda m, a: tuple(m.sort(a, dim=0, descending=True, stable=True)),
     lambda: [np.array([1.0, 3.0, np.nan, 3.0, -1.0, 1.0])]),
    ("sort_asc_ties", lambda m, a: tuple(a.sort(stable=True)), lambda: [np.array([2.0, 1.0, 2.0, 1.0, np.nan])]),
    ("argsort", lambda m, a: m.argsort(a, 0, descending=True), lambda: [r(4, 3)]),
    ("topk", lambda m, a: tuple(m.topk(a, 2, 1)), lambda: [r(3, 5)]),
    ("topk_smallest", lambda m, a: tuple(a.topk(3, 0, largest=False)), lambda: [r(6, 2)]),
    ("cumsum", lambda m, a: m.cumsum(a, 1), lambda: [r(3, 5)]),
    ("cumsum_neg_dim", lambda m, a: a.cumsum(-3), lambda: [r(2, 3, 4)]),
    ("norm_fro", lambda m, a: a.norm(), lambda: [r(3, 4)]),
    ("norm_p1_dim", lambda m, a: m.norm(a, 1, dim=1), lambda: [r(3, 4)]),
    ("norm_p3_keep", lambda m, a: m.norm(a, 3, dim=0, keepdim=True), lambda: [r(3, 4)]),
    ("norm_inf", lambda m, a: m.norm(a, float("inf"), dim=1), lambda: [r(3, 4)]),
    ("norm_negative_p", lambda m, a: m.norm(a, -2, dim=1), lambda: [r(3, 4, lo=0.5)]),
    ("norm_zero_vector", lambda m, a: a.norm(dim=1), lambda: [np.array([[0.0, 0.0], [3.0, 4.0]])]),
    ("flip", lambda m, a: m.flip(a, (0, 2)), lambda: [r(2, 3, 4)]),
    ("lerp", lambda m, a, b: m.lerp(a, b, 0.3), lambda: [r(3, 4), r(4)]),
    ("lerp_tensor_weight", lambda m, a, b, w: m.lerp(a, b, w), lambda: [r(3, 4), r(3, 4), r(4)]),
    ("addcmul_addcdiv", lambda m, a, b, c: m.addcdiv(m.addcmul(a, b, c, value=0.5), b, c, value=-2),
     lambda: [r(3, 4), r(3, 4), r(4, lo=0.5)]),
    ("log2_log10", lambda m, a: m.log2(a) + m.log10(a), lambda: [r(5, lo=0.1)]),
    ("outer", lambda m, a, b: m.outer(a, b), lambda: [r(3), r(4)]),
    ("masked_select", lambda m, a: m.masked_select(a, a > 0), lambda: [r(3, 4)]),
    ("masked_select_bcast", lambda m, a: m.masked_select(a, m.tensor([True, False, True, True])), lambda: [r(3, 4)]),
    ("nonzero", lambda m, a: m.nonzero(a > 0), lambda: [r(3, 4)]),
    ("nonzero_tuple", lambda m, a: m.nonzero(a > 0, as_tuple=True), lambda: [r(3, 4)]),
    ("clamp_min_max", lambda m, a: m.clamp_min(a, -0.5) + m.clamp_max(a, 0.5), lambda: [r(4, 5)]),
    ("var_mean", lambda m, a: m.var_mean(a, 1), lambda: [r(3, 4)]),
    ("std_mean", lambda m, a: m.std_mean(a, (0, 1), keepdim=True), lambda: [r(3, 4)]),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_match_torch(case, dtype):
    _, op, make = case
    arrays = [a.astype(dtype) if a.dtype == np.float64 else a for a in make()]
    rtol = 1e-7 if dtype == np.float64 else 2e-5
    assert_parity(op, arrays, rtol=rtol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in
                                  ("add_bcast", "mul", "div", "exp", "gelu", "silu", "softmax", "log_softmax",
                                   "layer_norm", "rms_norm", "matmul_bcast", "sum_dims_keep", "mean_neg_dim",
                                   "sdpa_causal", "ce_idx", "var_dim")], ids=lambda c: c[0])
def test_half_precision_forward_matches_torch(case, dtype):
    """Half-precision forwards: same output dtype as torch, values within a
    couple of ulps (torch CPU may round intermediates differently)."""
    _, op, make = case
    arrays = make()
    tdt = getattr(torch, dtype)
    cdt = getattr(cg, dtype)
    c_ins = [cg.tensor(a, dtype=cdt) if a.dtype.kind == "f" else cg.tensor(a) for a in arrays]
    t_ins = [torch.from_numpy(a).to(tdt) if a.dtype.kind == "f" else torch.from_numpy(a) for a in arrays]
    c_out, t_out = op(cg, *c_ins), op(torch, *t_ins)
    assert _same_dtype(c_out, t_out)
    tol = 4e-3 if dtype == "float16" else 3e-2
    np.testing.assert_allclose(_np(c_out), _np(t_out), rtol=tol, atol=tol)


# --- errors where torch raises ------------------------------------------------------
ERROR_CASES = [
    ("broadcast", lambda m: m.zeros(2, 3) + m.zeros(4, 3)),
    ("matmul_inner", lambda m: m.zeros(2, 3) @ m.zeros(4, 5)),
    ("matmul_0d", lambda m: m.matmul(m.zeros(()), m.zeros(3))),
    ("bmm_batch", lambda m: m.bmm(m.zeros(2, 3, 4), m.zeros(3, 4, 5))),
    ("view_bad", lambda m: m.zeros(2, 3).view(4, 2)),
    ("view_noncontig", lambda m: m.zeros(2, 3).t().view(6)),
    ("two_inferred", lambda m: m.zeros(6).reshape(-1, -1)),
    ("permute_dup", lambda m: m.zeros(2, 3).permute(0, 0)),
    ("expand_bad", lambda m: m.zeros(2, 3).expand(4, 3)),
    ("index_oob", lambda m: m.zeros(2, 3)[2]),
    ("index_too_many", lambda m: m.zeros(2, 3)[0, 0, 0]),
    ("adv_index_oob", lambda m: m.zeros(4)[m.tensor([0, 4])]),
    ("gather_oob", lambda m: m.gather(m.zeros(2, 3), 1, m.tensor([[3]]))),
    ("gather_neg", lambda m: m.gather(m.zeros(2, 3), 1, m.tensor([[-1]]))),
    ("gather_float_index", lambda m: m.gather(m.zeros(2, 3), 1, m.zeros(2, 3))),
    ("index_select_oob", lambda m: m.index_select(m.zeros(3), 0, m.tensor([3]))),
    ("index_select_2d_index", lambda m: m.index_select(m.zeros(3), 0, m.tensor([[0]]))),
    ("cat_mismatch", lambda m: m.cat([m.zeros(2, 3), m.zeros(2, 4)])),
    ("cat_empty_list", lambda m: m.cat([])),
    ("stack_mismatch", lambda m: m.stack([m.zeros(2), m.zeros(3)])),
    ("dim_oob", lambda m: m.zeros(2, 3).sum(2)),
    ("dup_dims", lambda m: m.zeros(2, 3).sum((0, 0))),
    ("mean_int", lambda m: m.tensor([1, 2]).mean()),
    ("requires_grad_int", lambda m: m.tensor([1, 2]).requires_grad_()),
    ("bool_sub", lambda m: m.tensor([True]) - m.tensor([False])),
    ("bool_sub_mixed", lambda m: m.tensor([1.5]) - m.tensor([True])),
    ("sub_python_bool", lambda m: m.tensor([1, 2]) - True),
    ("bool_neg", lambda m: -m.tensor([True])),
    ("int_neg_pow", lambda m: m.tensor([2]) ** -1),
    ("int_floordiv_zero", lambda m: m.tensor([4, 2]) // m.tensor([2, 0])),
    ("int_remainder_zero", lambda m: m.tensor([4, 2]) % 0),
    ("softmax_int", lambda m: m.softmax(m.tensor([1, 2]), 0)),
    ("where_nonbool", lambda m: m.where(m.tensor([1, 0]), m.zeros(2), m.ones(2))),
    ("masked_fill_nonbool", lambda m: m.zeros(2).masked_fill(m.tensor([1, 0]), 1.0)),
    ("masked_fill_inplace_grows", lambda m: m.zeros(3).masked_fill_(m.tensor([[True], [False]]), 1.0)),
    ("ce_target_oob", lambda m: _fn(m).cross_entropy(m.zeros(2, 3), m.tensor([0, 3]))),
    ("ce_target_neg", lambda m: _fn(m).cross_entropy(m.zeros(2, 3), m.tensor([0, -1]))),
    ("ce_target_shape", lambda m: _fn(m).cross_entropy(m.zeros(2, 3), m.tensor([0, 1, 2]))),
    ("ce_smoothing", lambda m: _fn(m).cross_entropy(m.zeros(2, 3), m.tensor([0, 1]), label_smoothing=1.5)),
    ("ce_reduction", lambda m: _fn(m).cross_entropy(m.zeros(2, 3), m.tensor([0, 1]), reduction="avg")),
    ("layer_norm_shape", lambda m: _fn(m).layer_norm(m.zeros(2, 3), (4,))),
    ("layer_norm_weight", lambda m: _fn(m).layer_norm(m.zeros(2, 3), (3,), m.ones(4))),
    ("embedding_oob", lambda m: _fn(m).embedding(m.tensor([5]), m.zeros(5, 2))),
    ("embedding_float_idx", lambda m: _fn(m).embedding(m.zeros(2), m.zeros(5, 2))),
    ("one_hot_oob", lambda m: _fn(m).one_hot(m.tensor([3]), 3)),
    ("one_hot_neg", lambda m: _fn(m).one_hot(m.tensor([-1]), 3)),
    ("dropout_p", lambda m: _fn(m).dropout(m.zeros(3), 1.5)),
    ("clamp_none", lambda m: m.clamp(m.zeros(3))),
    ("split_sizes", lambda m: m.zeros(5).split([2, 2])),
    ("chunk_zero", lambda m: m.zeros(5).chunk(0)),
    ("item_many", lambda m: m.zeros(2).item()),
    ("bool_many", lambda m: bool(m.zeros(2))),
    ("sdpa_mask_and_causal", lambda m: _fn(m).scaled_dot_product_attention(
        m.zeros(1, 2, 4), m.zeros(1, 2, 4), m.zeros(1, 2, 4), attn_mask=m.ones(2, 2, dtype=m.bool), is_causal=True)),
    ("linear_in_features", lambda m: _fn(m).linear(m.zeros(2, 3), m.zeros(4, 5))),
    ("narrow_oob", lambda m: m.zeros(5).narrow(0, 3, 4)),
    ("unsqueeze_oob", lambda m: m.zeros(2).unsqueeze(3)),
    ("zeros_negative", lambda m: m.zeros(-1)),
    ("randint_empty_range", lambda m: m.randint(3, 3, (2,))),
    ("arange_zero_step", lambda m: m.arange(0, 5, 0)),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_raises_where_torch_raises(case):
    _, op = case
    with pytest.raises(Exception) as t_err:
        op(torch)
    with pytest.raises((RuntimeError, IndexError, ValueError, TypeError)) as c_err:
        op(cg)
    assert str(c_err.value), "error message must say what was wrong"
    del t_err


EMPTY_CASES = {
    "mm_k0": lambda m, F: m.zeros(2, 0) @ m.zeros(0, 5),
    "mm_m0": lambda m, F: m.zeros(0, 3) @ m.ones(3, 4),
    "softmax_rows0": lambda m, F: m.softmax(m.zeros(0, 3), 1),
    "log_softmax_dim0": lambda m, F: m.log_softmax(m.zeros(2, 0), 1),
    "logsumexp_dim0": lambda m, F: m.logsumexp(m.zeros(2, 0), 1),
    "sum0": lambda m, F: m.zeros(0, 3).sum(0),
    "mean1": lambda m, F: m.zeros(0, 3).mean(1),
    "cat": lambda m, F: m.cat([m.zeros(0, 3), m.ones(2, 3)]),
    "index_empty": lambda m, F: m.ones(3)[m.tensor([], dtype=m.int64)],
    "mask_none": lambda m, F: m.ones(3)[m.zeros(3, dtype=m.bool)],
    "layer_norm": lambda m, F: F.layer_norm(m.zeros(0, 3), (3,)),
    "cross_entropy_empty": lambda m, F: F.cross_entropy(m.zeros(0, 3), m.zeros(0, dtype=m.int64)),
    "embedding": lambda m, F: F.embedding(m.zeros(0, dtype=m.int64), m.ones(3, 4)),
    "gather": lambda m, F: m.gather(m.ones(3, 4), 1, m.zeros(3, 0, dtype=m.int64)),
    "stack": lambda m, F: m.stack([m.zeros(0, 3), m.zeros(0, 3)]),
    "where": lambda m, F: m.where(m.zeros(0, 3) > 0, m.zeros(0, 3), 1.0),
    "sdpa_no_queries": lambda m, F: F.scaled_dot_product_attention(m.zeros(1, 0, 4), m.zeros(1, 3, 4),
                                                                  m.zeros(1, 3, 4)),
    "expand_to_0": lambda m, F: m.zeros(1, 3).expand(0, 3),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_empty_tensors_match_torch(name):
    c = EMPTY_CASES[name](cg, cg)
    t = EMPTY_CASES[name](torch, F)
    assert tuple(c.shape) == tuple(t.shape) and _same_dtype(c, t)
    np.testing.assert_array_equal(_np(c), _np(t))


KEYWORD_CALLS = [
    ("relu", lambda m, F, x: F.relu(input=x)),
    ("relu_inplace", lambda m, F, x: F.relu(x.clone(), inplace=True)),
    ("silu_inplace", lambda m, F, x: F.silu(x.clone(), inplace=True)),
    ("gelu", lambda m, F, x: F.gelu(input=x, approximate="tanh")),
    ("softmax", lambda m, F, x: F.softmax(input=x, dim=-1)),
    ("log_softmax", lambda m, F, x: F.log_softmax(x, dim=0, dtype=m.float64)),
    ("layer_norm", lambda m, F, x: F.layer_norm(input=x, normalized_shape=(4,), eps=1e-3)),
    ("rms_norm", lambda m, F, x: F.rms_norm(input=x, normalized_shape=[4])),
    ("linear", lambda m, F, x: F.linear(input=x, weight=x, bias=None)),
    ("dropout_eval", lambda m, F, x: F.dropout(input=x, p=0.3, training=False)),
    ("sum", lambda m, F, x: m.sum(input=x, dim=(0, 1), keepdim=True)),
    ("mean", lambda m, F, x: m.mean(x, dim=-1, keepdim=False)),
    ("max", lambda m, F, x: m.max(input=x, dim=1, keepdim=True).values),
    ("var", lambda m, F, x: m.var(x, dim=1, unbiased=False)),
    ("exp", lambda m, F, x: m.exp(input=x)),
    ("clamp", lambda m, F, x: m.clamp(input=x, min=-0.5, max=0.5)),
    ("logsumexp", lambda m, F, x: m.logsumexp(input=x, dim=1)),
    ("transpose", lambda m, F, x: x.transpose(dim0=0, dim1=1)),
    ("cat", lambda m, F, x: m.cat(tensors=[x, x], dim=1)),
    ("where", lambda m, F, x: m.where(condition=x > 0, input=x, other=m.zeros_like(x))),
]


@pytest.mark.parametrize("name", [k[0] for k in KEYWORD_CALLS])
def test_keyword_argument_names_match_torch(name):
    fn = dict(KEYWORD_CALLS)[name]
    x = r(3, 4)
    c = fn(cg, cg, cg.tensor(x))
    t = fn(torch, F, torch.from_numpy(x))
    np.testing.assert_allclose(_np(c), _np(t), rtol=1e-7, atol=1e-10)
