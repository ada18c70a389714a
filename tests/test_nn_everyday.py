"""Everyday PyTorch APIs against torch (CPU, float64 and float32): values and gradients of every input.

einsum, is_tensor, unique; F.conv2d / nn.Conv2d, F.unfold / F.fold, pooling, F.pad, F.normalize,
BatchNorm1d/2d, MultiheadAttention, Flatten/Unflatten, the loss modules, binary cross-entropy (with logits),
one_hot, and the inplace flags of ReLU/SiLU.
"""
import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F

torch = pytest.importorskip("torch", reason="PyTorch CPU is the differential reference")
TF = torch.nn.functional
TOL = {np.float64: 1e-10, np.float32: 2e-5}


def _as_pair(a, requires_grad):
    if a is None:
        return None, None
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return cg.tensor(a, requires_grad=requires_grad), torch.tensor(a, requires_grad=requires_grad)
    if isinstance(a, np.ndarray):
        return cg.tensor(a), torch.tensor(a)
    return a, a


def _close(ours, ref, tol, what):
    ours = ours.detach().numpy() if isinstance(ours, cg.Tensor) else np.asarray(ours)
    ref = ref.detach().numpy()
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    np.testing.assert_allclose(ours.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol, err_msg=what)


def parity(fn, tfn, *arrays, seed=0, grad=True):
    """fn(*cutegrad tensors) vs tfn(*torch tensors): outputs, then the gradients of every float input
    for a random output gradient. NaN-poisoned gradients before backward prove they are written."""
    tol = TOL[next((a.dtype.type for a in arrays if isinstance(a, np.ndarray) and a.dtype.kind == "f"),
                   np.float64)]
    pairs = [_as_pair(a, grad) for a in arrays]
    out = fn(*[p[0] for p in pairs])
    ref = tfn(*[p[1] for p in pairs])
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if r is None:
            assert o is None
            continue
        _close(o, r, tol, f"output {i}")
    if not grad:
        return out
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(tuple(refs[0].shape)).astype(refs[0].detach().numpy().dtype)
    outs[0].backward(cg.tensor(g))
    refs[0].backward(torch.tensor(g))
    for i, (c, t) in enumerate(pairs):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            assert c.grad is not None, f"input {i} got no gradient"
            _close(c.grad, t.grad, tol * 10, f"grad of input {i}")
    return out


def _rand(*shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(dtype)


# --- top level --------------------------------------------------------------------------------
@pytest.mark.parametrize("eq, shapes", [
    ("ij,jk->ik", [(3, 4), (4, 5)]), ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]), ("ii->i", [(4, 4)]),
    ("ii", [(4, 4)]), ("ij->ji", [(3, 4)]), ("ij->", [(3, 4)]), ("i,j->ij", [(3,), (4,)]),
    ("...ij,...jk", [(2, 1, 3, 4), (5, 4, 2)]), ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)]),
    ("ijk,jil->kl", [(3, 4, 5), (4, 3, 2)]), ("i,i,i->", [(5,), (5,), (5,)]),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)]), ("iij->j", [(3, 3, 4)]), ("ij,ij->ij", [(3, 1), (1, 4)]),
    ("...->", [(2, 3)]), ("bn,anm,bm->ba", [(2, 3), (4, 3, 5), (2, 5)]), ("i j , j k -> i k", [(2, 3), (3, 1)]),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_einsum(eq, shapes, dtype):
    arrays = [_rand(*s, dtype=dtype, seed=i) for i, s in enumerate(shapes)]
    parity(lambda *a: cg.einsum(eq, *a), lambda *a: torch.einsum(eq, *a), *arrays)
    parity(lambda *a: cg.einsum(eq, list(a)), lambda *a: torch.einsum(eq, list(a)), *arrays, grad=False)


@pytest.mark.parametrize("eq, shapes, match", [
    ("ij,jk->ik", [(3, 4)], "2 operand"), ("ij->ik", [(3, 4)], "'k' does not appear"),
    ("ij,jk->ik", [(3, 4), (5, 2)], "'j' has size 5"), ("ijk->i", [(3, 4)], "do not match"),
    ("i1->i", [(3, 4)], "invalid subscripts"), ("ij->ii", [(3, 4)], "more than once"),
])
def test_einsum_errors(eq, shapes, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        cg.einsum(eq, *[cg.ones(*s) for s in shapes])


def test_is_tensor():
    assert cg.is_tensor(cg.ones(1)) and cg.is_tensor(cg.nn.Parameter(cg.ones(1)))
    assert not any(cg.is_tensor(v) for v in (1.0, np.ones(1), torch.ones(1), [cg.ones(1)]))


@pytest.mark.parametrize("kw", [dict(), dict(return_inverse=True), dict(return_counts=True),
                                dict(return_inverse=True, return_counts=True), dict(dim=0, return_inverse=True),
                                dict(dim=1, return_inverse=True, return_counts=True), dict(sorted=False)])
@pytest.mark.parametrize("dtype", ["int64", "float32", "int32", "bool"])
def test_unique(kw, dtype):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, (5, 6)).astype(dtype)
    if dtype == "float32":
        x = x / 2 - 0.5
    ours, ref = cg.tensor(x).unique(**kw), torch.unique(torch.tensor(x), **kw)
    ours, ref = (ours, ref) if isinstance(ref, tuple) else ((ours,), (ref,))
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        assert o.dtype.name == str(r.dtype).replace("torch.", "")
        assert o.numpy().tolist() == r.numpy().tolist()
    top = cg.unique(cg.tensor(x), **kw)
    assert (top if isinstance(top, tuple) else (top,))[0].numpy().tolist() == ours[0].numpy().tolist()


def test_unique_bfloat16_and_empty():
    x = cg.tensor([3.0, -1.0, 3.0, 0.5], dtype=cg.bfloat16)
    vals, inv = cg.unique(x, return_inverse=True)
    assert vals.dtype is cg.bfloat16 and vals.tolist() == [-1.0, 0.5, 3.0] and inv.tolist() == [2, 0, 2, 1]
    assert cg.unique(cg.zeros(0)).shape == (0,)


# --- convolution -------------------------------------------------------------------------------
CONV_CASES = [
    # (N, C, H, W), Cout, kernel, stride, padding, dilation, groups, bias
    ((2, 3, 7, 9), 4, 3, 1, 1, 1, 1, True),
    ((1, 4, 8, 6), 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, False),
    ((2, 6, 5, 5), 6, 1, 1, 0, 1, 6, True),               # depthwise 1x1
    ((2, 2, 9, 7), 4, 3, 1, "same", 2, 1, True),
    ((1, 2, 5, 6), 3, (2, 4), 1, "same", 1, 1, False),     # 'same' with even kernels: asymmetric padding
    ((2, 2, 5, 6), 3, 3, 2, "valid", 1, 1, True),
    ((3, 1, 4, 4), 2, 4, 1, 0, 1, 1, True),                # kernel covers the input: one output pixel
    ((1, 8, 6, 5), 4, 3, (2, 3), 2, 1, 4, True),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on its own padded copy
def test_conv2d(case, dtype):
    (n, c, h, w), cout, k, s, p, d, g, bias = case
    kk = (k, k) if isinstance(k, int) else k
    x, wt = _rand(n, c, h, w, dtype=dtype), _rand(cout, c // g, *kk, dtype=dtype, seed=1)
    b = _rand(cout, dtype=dtype, seed=2) if bias else None
    parity(lambda x, w, b: F.conv2d(x, w, b, s, p, d, g), lambda x, w, b: TF.conv2d(x, w, b, s, p, d, g), x, wt, b)


def test_conv2d_unbatched_and_module():
    x = _rand(3, 6, 7)
    parity(lambda x, w: F.conv2d(x, w, padding=1), lambda x, w: TF.conv2d(x, w, padding=1), x, _rand(2, 3, 3, 3))
    for kw in [dict(padding=1, padding_mode="reflect"), dict(padding=(2, 1), padding_mode="circular"),
               dict(padding="same", padding_mode="replicate", dilation=2), dict(stride=2, groups=3, bias=False)]:
        torch.manual_seed(0)
        tm = torch.nn.Conv2d(3, 6, 3, **kw).double()
        m = cg.nn.Conv2d(3, 6, 3, **kw).double()
        m.load_state_dict({k: cg.tensor(v.detach().numpy()) for k, v in tm.state_dict().items()})
        out = parity(m, tm, _rand(2, 3, 8, 9))
        assert tm.weight.grad is not None and m.weight.grad is not None
        _close(m.weight.grad, tm.weight.grad, 1e-9, "weight grad")
        assert out.shape == (2, 6) + tuple(tm(torch.zeros(2, 3, 8, 9, dtype=torch.float64)).shape[2:])


def test_conv2d_under_autocast_runs_in_bfloat16_as_torch():
    x, w, b = _rand(2, 3, 6, 6, dtype=np.float32), _rand(4, 3, 3, 3, dtype=np.float32, seed=1), _rand(4, seed=2)
    b = b.astype(np.float32)
    with cg.autocast("cpu"):
        ours = F.conv2d(cg.tensor(x), cg.tensor(w), cg.tensor(b), padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = TF.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), padding=1)
    assert ours.dtype is cg.bfloat16 and ref.dtype == torch.bfloat16
    np.testing.assert_allclose(ours.float().numpy(), ref.float().numpy(), rtol=3e-2, atol=3e-2)


def test_conv2d_init_matches_torchs_bounds():
    m = cg.nn.Conv2d(16, 8, (3, 5), groups=2)
    fan_in = 8 * 15
    assert m.weight.shape == (8, 8, 3, 5) and m.bias.shape == (8,)
    bound = 1 / np.sqrt(fan_in)
    assert float(m.weight.abs().max()) <= bound + 1e-7 and float(m.bias.abs().max()) <= bound
    assert float(m.weight.std()) > 0.5 / np.sqrt(3 * fan_in)


@pytest.mark.parametrize("call, match", [
    (lambda: F.conv2d(cg.ones(1, 3, 5, 5), cg.ones(2, 2, 3, 3)), "has 3 channels"),
    (lambda: F.conv2d(cg.ones(1, 4, 5, 5), cg.ones(3, 2, 3, 3), groups=2), "not divisible by groups"),
    (lambda: F.conv2d(cg.ones(1, 1, 2, 2), cg.ones(1, 1, 3, 3)), "smaller than the kernel"),
    (lambda: F.conv2d(cg.ones(5, 5), cg.ones(1, 1, 3, 3)), "3-D .* or 4-D"),
    (lambda: F.conv2d(cg.ones(1, 1, 5, 5), cg.ones(1, 1, 3, 3), stride=2, padding="same"), "strided"),
    (lambda: F.conv2d(cg.ones(1, 1, 5, 5), cg.ones(1, 1, 3, 3, dtype=cg.float64)), "float32 but weight is"),
    (lambda: F.conv2d(cg.ones(1, 1, 5, 5), cg.ones(1, 1, 3, 3), cg.ones(2)), "bias of shape"),
    (lambda: F.conv2d(cg.ones(1, 1, 5, 5), cg.ones(1, 1, 3, 3), stride=0), "stride must be positive"),
    (lambda: cg.nn.Conv2d(3, 4, 3, groups=2), "divisible by groups"),
    (lambda: cg.nn.Conv2d(3, 4, 3, padding_mode="mirror"), "padding_mode"),
])
def test_conv2d_rejects_bad_input(call, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("kw", [dict(kernel_size=2),
                                dict(kernel_size=(2, 3), dilation=(1, 2), padding=1, stride=(2, 1)),
                                dict(kernel_size=3, padding=(0, 1), stride=2)])
def test_unfold_and_fold(kw):
    x = _rand(2, 3, 6, 7)
    cols = parity(lambda x: F.unfold(x, **kw), lambda x: TF.unfold(x, **kw), x)
    parity(lambda c: F.fold(c, (6, 7), **kw), lambda c: TF.fold(c, (6, 7), **kw), cols.detach().numpy())


def test_conv2d_double_backward():
    x, w = _rand(1, 2, 5, 5), _rand(3, 2, 3, 3, seed=1)
    xs = cg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    ws = cg.tensor(w, requires_grad=True), torch.tensor(w, requires_grad=True)
    for (xx, ww, lib, conv) in ((xs[0], ws[0], cg, F.conv2d), (xs[1], ws[1], torch, TF.conv2d)):
        (gx,) = lib.autograd.grad(conv(xx, ww, padding=1, stride=2).pow(2).sum(), [xx], create_graph=True)
        gx.pow(2).sum().backward()
    _close(ws[0].grad, ws[1].grad, 1e-9, "second-order weight grad")


# --- pooling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 1)),
    dict(kernel_size=3, stride=2, ceil_mode=True), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
])
def test_max_pool2d(kw):
    x = _rand(2, 3, 7, 8)
    parity(lambda x: F.max_pool2d(x, **kw), lambda x: TF.max_pool2d(x, **kw), x)
    ours = F.max_pool2d(cg.tensor(x), return_indices=True, **kw)[1]
    assert ours.tolist() == TF.max_pool2d(torch.tensor(x), return_indices=True, **kw)[1].tolist()
    parity(cg.nn.MaxPool2d(**kw), torch.nn.MaxPool2d(**kw), x[0])  # unbatched


@pytest.mark.parametrize("kw", [
    dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False), dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), dict(kernel_size=2, divisor_override=3),
    dict(kernel_size=(2, 3), stride=(1, 2)),
])
def test_avg_pool2d(kw):
    x = _rand(2, 3, 7, 8)
    parity(lambda x: F.avg_pool2d(x, **kw), lambda x: TF.avg_pool2d(x, **kw), x)
    parity(cg.nn.AvgPool2d(**kw), torch.nn.AvgPool2d(**kw), x)


@pytest.mark.parametrize("size", [1, (3, 5), (None, 2), (7, 8), (4, 3), (10, 11)])
def test_adaptive_avg_pool2d(size):
    x = _rand(2, 3, 7, 8)
    parity(lambda x: F.adaptive_avg_pool2d(x, size), lambda x: TF.adaptive_avg_pool2d(x, size), x)
    parity(cg.nn.AdaptiveAvgPool2d(size), torch.nn.AdaptiveAvgPool2d(size), x[1])


def test_pool_errors():
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        F.max_pool2d(cg.ones(1, 1, 5, 5), 2, padding=2)
    with pytest.raises(RuntimeError, match="too small"):
        F.avg_pool2d(cg.ones(1, 1, 2, 2), 3)
    with pytest.raises(RuntimeError, match="floating point"):
        F.max_pool2d(cg.ones(1, 1, 4, 4, dtype=cg.int64), 2)


# --- pad, normalize ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("shape, pad", [((2, 3, 5), (1, 2)), ((2, 3, 4, 5), (1, 2, 3, 0)), ((2, 3, 4, 5), (0, 0, 2, 1)),
                                        ((1, 2, 3, 4, 5), (1, 1, 2, 0, 1, 2))])
def test_pad(mode, shape, pad):
    parity(lambda x: F.pad(x, pad, mode), lambda x: TF.pad(x, pad, mode), _rand(*shape))


def test_pad_constant_value_and_negative_pads():
    x = _rand(2, 3, 4)
    parity(lambda x: F.pad(x, (2, -1, -1, 3), value=2.5), lambda x: TF.pad(x, (2, -1, -1, 3), value=2.5), x)
    with pytest.raises(RuntimeError, match="reflect padding"):
        F.pad(cg.ones(1, 3), (3, 0), mode="reflect")
    with pytest.raises(ValueError, match="even length"):
        F.pad(cg.ones(3), (1,))
    with pytest.raises(NotImplementedError, match="mode 'mirror'"):
        F.pad(cg.ones(3), (1, 1), mode="mirror")


@pytest.mark.parametrize("kw", [dict(), dict(p=1.0, dim=0), dict(p=3.0, dim=-1), dict(dim=2, eps=1e-3)])
def test_normalize(kw):
    x = _rand(3, 4, 5)
    x[0, :, 1] = 0.0
    x[1, 1, :] = 1e-5
    parity(lambda x: F.normalize(x, **kw), lambda x: TF.normalize(x, **kw), x)


# --- batch norm --------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, shape", [("BatchNorm1d", (6, 4)), ("BatchNorm1d", (5, 4, 3)),
                                        ("BatchNorm2d", (3, 4, 5, 2))])
@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.3, eps=1e-3), dict(momentum=None), dict(affine=False),
                                dict(track_running_stats=False)])
def test_batch_norm_train_then_eval(cls, shape, kw):
    m, tm = getattr(cg.nn, cls)(4, **kw).double(), getattr(torch.nn, cls)(4, **kw).double()
    if m.weight is not None:
        w, b = _rand(4, seed=5), _rand(4, seed=6)
        m.load_state_dict({"weight": cg.tensor(w), "bias": cg.tensor(b), **{k: cg.tensor(v.numpy()) for k, v in
                                                                           tm.state_dict().items() if "running" in k
                                                                           or "num_batches" in k}})
        with torch.no_grad():
            tm.weight.copy_(torch.tensor(w))
            tm.bias.copy_(torch.tensor(b))
    for step in range(3):
        parity(m, tm, _rand(*shape, seed=step) * (step + 1) + step)
        if tm.track_running_stats:
            _close(m.running_mean, tm.running_mean, 1e-12, "running_mean")
            _close(m.running_var, tm.running_var, 1e-12, "running_var")
            assert int(m.num_batches_tracked) == int(tm.num_batches_tracked) == step + 1
    m.eval(), tm.eval()
    parity(m, tm, _rand(*shape, seed=9))
    assert sorted(m.state_dict()) == sorted(tm.state_dict())


def test_batch_norm_errors_and_float32():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cg.nn.BatchNorm1d(3)(cg.ones(1, 3))
    with pytest.raises(ValueError, match="expected 4D input"):
        cg.nn.BatchNorm2d(3)(cg.ones(2, 3))
    with pytest.raises(RuntimeError, match="does not match the 3 channels"):
        F.batch_norm(cg.ones(2, 3), cg.zeros(4), cg.ones(4), training=True)
    m, tm = cg.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    parity(m, tm, _rand(4, 2, 3, 3, dtype=np.float32))
    _close(m.running_var, tm.running_var, 1e-6, "running_var")


# --- multi-head attention ----------------------------------------------------------------------
def _mha_pair(e, h, **kw):
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(e, h, **kw).double()
    m = cg.nn.MultiheadAttention(e, h, **kw).double()
    assert sorted(m.state_dict()) == sorted(tm.state_dict())
    m.load_state_dict({k: cg.tensor(v.detach().numpy()) for k, v in tm.state_dict().items()})
    return m, tm


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("masks", ["none", "bool_attn", "float_attn", "kpm", "both", "per_head"])
def test_multihead_attention_self(batch_first, need_weights, average, masks):
    e, h, n, L = 8, 2, 3, 5
    m, tm = _mha_pair(e, h, batch_first=batch_first)
    x = _rand(n, L, e) if batch_first else _rand(L, n, e)
    rng = np.random.default_rng(1)
    causal = np.triu(np.ones((L, L), bool), 1)
    attn = {"bool_attn": causal, "float_attn": rng.standard_normal((L, L)), "both": causal,
            "per_head": rng.standard_normal((n * h, L, L))}.get(masks)
    kpm = np.zeros((n, L), bool)
    kpm[:, -1] = True
    kpm = kpm if masks in ("kpm", "both") else None

    def run(mod, lib, x):
        mk = (lambda a: lib.tensor(a)) if lib is torch else cg.tensor
        return mod(x, x, x, key_padding_mask=None if kpm is None else mk(kpm), need_weights=need_weights,
                   attn_mask=None if attn is None else mk(attn), average_attn_weights=average)

    parity(lambda x: run(m, cg, x), lambda x: run(tm, torch, x), x)
    assert m.in_proj_weight.grad is not None
    _close(m.in_proj_weight.grad, tm.in_proj_weight.grad, 1e-9, "in_proj_weight grad")
    _close(m.out_proj.weight.grad, tm.out_proj.weight.grad, 1e-9, "out_proj grad")


def test_multihead_attention_cross_kdim_vdim_and_unbatched():
    m, tm = _mha_pair(8, 4, kdim=6, vdim=3, bias=False)
    q, k, v = _rand(4, 2, 8), _rand(7, 2, 6, seed=1), _rand(7, 2, 3, seed=2)
    parity(lambda q, k, v: m(q, k, v), lambda q, k, v: tm(q, k, v), q, k, v)
    _close(m.k_proj_weight.grad, tm.k_proj_weight.grad, 1e-9, "k_proj grad")
    m, tm = _mha_pair(6, 3)
    parity(lambda q, k: m(q, k, k)[0], lambda q, k: tm(q, k, k)[0], _rand(4, 6), _rand(5, 6, seed=1))
    parity(lambda q: m(q, q, q, need_weights=True, average_attn_weights=False),
           lambda q: tm(q, q, q, need_weights=True, average_attn_weights=False), _rand(4, 6))


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_is_causal_hint(need_weights):
    m, tm = _mha_pair(8, 2, batch_first=True)
    mask = np.triu(np.ones((5, 5), bool), 1)
    parity(lambda x: m(x, x, x, attn_mask=cg.tensor(mask), is_causal=True, need_weights=need_weights),
           lambda x: tm(x, x, x, attn_mask=torch.tensor(mask), is_causal=True, need_weights=need_weights),
           _rand(3, 5, 8))


def test_multihead_attention_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        cg.nn.MultiheadAttention(10, 3)
    m = cg.nn.MultiheadAttention(4, 2)
    with pytest.raises(RuntimeError, match="2D attn_mask should be of size"):
        m(cg.ones(3, 1, 4), cg.ones(3, 1, 4), cg.ones(3, 1, 4), attn_mask=cg.ones(2, 2))
    with pytest.raises(RuntimeError, match="key_padding_mask should be"):
        m(cg.ones(3, 1, 4), cg.ones(3, 1, 4), cg.ones(3, 1, 4), key_padding_mask=cg.ones(3, 1))
    with pytest.raises(RuntimeError, match="is_causal"):
        m(cg.ones(3, 1, 4), cg.ones(3, 1, 4), cg.ones(3, 1, 4), is_causal=True)


# --- small modules, losses ---------------------------------------------------------------------
def test_flatten_unflatten():
    x = _rand(2, 3, 4, 5)
    parity(cg.nn.Flatten(), torch.nn.Flatten(), x)
    parity(cg.nn.Flatten(0, 2), torch.nn.Flatten(0, 2), x)
    parity(cg.nn.Unflatten(1, (3, 1)), torch.nn.Unflatten(1, (3, 1)), x)
    parity(cg.nn.Sequential(cg.nn.Flatten(), cg.nn.Unflatten(1, (6, 10))),
           torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Unflatten(1, (6, 10))), x)


REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch's note on the broadcast target
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_regression_losses(reduction):
    x, y = _rand(4, 3), _rand(4, 3, seed=1)
    y[0, 0] = x[0, 0]  # |x - y| = 0: the subgradient 0, as torch
    for ours, ref in ((cg.nn.MSELoss, torch.nn.MSELoss), (cg.nn.L1Loss, torch.nn.L1Loss)):
        parity(ours(reduction=reduction), ref(reduction=reduction), x, y)
    parity(lambda x, y: F.l1_loss(x, y, reduction=reduction), lambda x, y: TF.l1_loss(x, y, reduction=reduction), x,
           _rand(3, seed=2))  # broadcasting target


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kw", [dict(), dict(weight=True), dict(ignore_index=1), dict(label_smoothing=0.2),
                                dict(weight=True, ignore_index=2, label_smoothing=0.1)])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4)])
def test_classification_loss_modules(reduction, kw, shape):
    rng = np.random.default_rng(4)
    x = _rand(*shape)
    t = rng.integers(0, 5, (shape[0],) + shape[2:])
    w = _rand(5, seed=7) ** 2 if kw.get("weight") else None
    args = dict(kw, weight=w)
    ce = lambda lib, w: (cg.nn if lib is cg else torch.nn).CrossEntropyLoss(
        weight=None if w is None else lib.tensor(w), reduction=reduction,
        **{k: v for k, v in args.items() if k != "weight"})
    parity(lambda x, t: ce(cg, w)(x, t), lambda x, t: ce(torch, w)(x, t), x, t)
    if "label_smoothing" not in kw:
        nll = lambda lib, w: (cg.nn if lib is cg else torch.nn).NLLLoss(
            weight=None if w is None else lib.tensor(w), reduction=reduction,
            **{k: v for k, v in args.items() if k != "weight"})
        parity(lambda x, t: nll(cg, w)(x, t), lambda x, t: nll(torch, w)(x, t), x, t)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight, pos_weight", [(False, False), (True, False), (False, True), (True, True)])
def test_bce_with_logits(reduction, weight, pos_weight):
    x = _rand(4, 3) * 30  # large logits: the stable formula must not overflow
    t = np.random.default_rng(5).random((4, 3))
    w = _rand(3, seed=8) ** 2 if weight else None
    pw = _rand(3, seed=9) ** 2 if pos_weight else None
    cw, cpw = (None if a is None else cg.tensor(a) for a in (w, pw))
    tw, tpw = (None if a is None else torch.tensor(a) for a in (w, pw))  # torch: weights take no gradient
    parity(lambda x, t: F.binary_cross_entropy_with_logits(x, t, cw, reduction=reduction, pos_weight=cpw),
           lambda x, t: TF.binary_cross_entropy_with_logits(x, t, tw, reduction=reduction, pos_weight=tpw), x, t)
    mod = cg.nn.BCEWithLogitsLoss(None if w is None else cg.tensor(w), reduction,
                                  None if pw is None else cg.tensor(pw))
    tmod = torch.nn.BCEWithLogitsLoss(None if w is None else torch.tensor(w), reduction=reduction,
                                      pos_weight=None if pw is None else torch.tensor(pw))
    parity(mod, tmod, x, t)
    with pytest.raises(ValueError, match="must be the same as input size"):
        F.binary_cross_entropy_with_logits(cg.ones(3), cg.ones(2))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_on_probabilities(reduction):
    p = np.random.default_rng(6).uniform(0.01, 0.99, (4, 3))
    t = np.random.default_rng(7).random((4, 3))
    parity(cg.nn.BCELoss(reduction=reduction), torch.nn.BCELoss(reduction=reduction), p, t)


def test_loss_modules_reject_bad_reduction():
    for cls in (cg.nn.MSELoss, cg.nn.L1Loss, cg.nn.CrossEntropyLoss, cg.nn.NLLLoss, cg.nn.BCEWithLogitsLoss):
        with pytest.raises(ValueError, match="not a valid value for reduction"):
            cls(reduction="avg")


def test_one_hot_matches_torch():
    t = np.array([[0, 3], [2, 1]], dtype=np.int64)
    for n in (-1, 4, 6):
        ours, ref = F.one_hot(cg.tensor(t), n), TF.one_hot(torch.tensor(t), n)
        assert ours.dtype is cg.int64 and ours.tolist() == ref.tolist()
    with pytest.raises(RuntimeError, match="smaller than num_classes"):
        F.one_hot(cg.tensor(t), 3)


# --- inplace flags -----------------------------------------------------------------------------
@pytest.mark.parametrize("ours, ref", [
    (lambda: cg.nn.ReLU(inplace=True), lambda: torch.nn.ReLU(inplace=True)),
    (lambda: cg.nn.SiLU(inplace=True), lambda: torch.nn.SiLU(inplace=True)),
    (lambda: lambda x: F.relu(x, inplace=True), lambda: lambda x: TF.relu(x, inplace=True)),
    (lambda: lambda x: F.silu(x, inplace=True), lambda: lambda x: TF.silu(x, inplace=True)),
    (lambda: lambda x: F.dropout(x, 0.0, inplace=True), lambda: lambda x: TF.dropout(x, 0.0, inplace=True)),
])
def test_inplace_activations_write_their_input_and_differentiate(ours, ref):
    m, tm = ours(), ref()
    seen = {}

    def fn(x):
        h = x * 2  # a non-leaf, as in a network
        y = m(h)
        seen["same"] = y is h
        return y

    def tfn(x):
        h = x * 2
        return tm(h)

    parity(fn, tfn, _rand(3, 4))
    assert seen["same"]
    assert "inplace=True" in repr(cg.nn.ReLU(inplace=True)) and repr(cg.nn.ReLU()) == "ReLU()"


@pytest.mark.parametrize("make", [lambda: cg.nn.Dropout(0.5, inplace=True),
                                  lambda: (lambda h: F.dropout(h, 0.5, inplace=True))])
def test_inplace_dropout_differentiates(make):
    cg.manual_seed(0)
    x = cg.tensor(_rand(50), requires_grad=True)
    h = x * 2
    y = make()(h)
    assert y is h
    y.sum().backward()
    kept = y.detach().numpy() != 0
    np.testing.assert_allclose(x.grad.numpy(), np.where(kept, 4.0, 0.0))  # d(2x / (1 - p))/dx on kept elements
