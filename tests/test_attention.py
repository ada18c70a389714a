"""F.scaled_dot_product_attention: PyTorch parity (values and gradients), gradcheck,
bad input, the dispatcher's choice and every fallback reason, and the fused
path's autograd node run on the CPU with the kernel's NumPy model standing in
for the CUDA kernel.  No GPU needed."""
import importlib.util
import math
import pathlib

import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F
from cutegrad import dtypes as dt
from cutegrad.autograd import gradcheck
from cutegrad.device import CPU
from cutegrad.dispatch import kernel
from cutegrad.ops import attention as A

torch = pytest.importorskip("torch")
TF = torch.nn.functional

_PATH = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "reference" / "attention.py"
_spec = importlib.util.spec_from_file_location("attention_model", _PATH)
model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model)


def _pair(rng, shape, dtype=np.float64, requires_grad=True):
    a = rng.standard_normal(shape).astype(dtype)
    return cg.tensor(a, requires_grad=requires_grad), torch.tensor(a, requires_grad=requires_grad)


def _grads_match(ours, theirs, rtol, atol):
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o.grad.numpy(), t.grad.numpy(), rtol=rtol, atol=atol)


CASES = [
    # (q shape, k shape, v shape, kwargs)
    ((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8), dict()),
    ((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8), dict(is_causal=True)),
    ((1, 2, 3, 8), (1, 2, 11, 8), (1, 2, 11, 8), dict(is_causal=True)),      # Sq < Sk: top-left aligned
    ((1, 2, 13, 8), (1, 2, 4, 8), (1, 2, 4, 6), dict(is_causal=True)),       # Sq > Sk, Ev != E
    ((2, 6, 17, 16), (2, 2, 17, 16), (2, 2, 17, 16), dict(enable_gqa=True, is_causal=True)),
    ((2, 4, 9, 8), (2, 1, 9, 8), (2, 1, 9, 8), dict(enable_gqa=True, scale=0.7)),
    ((2, 4, 9, 8), (1, 4, 9, 8), (1, 4, 9, 8), dict()),                      # batch broadcast
    ((7, 8), (5, 8), (5, 3), dict(is_causal=True)),                           # 2-D
    ((3, 7, 8), (3, 5, 8), (3, 5, 8), dict(scale=0.01)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_torch_parity_values_and_grads(case):
    qs, ks, vs, kw = CASES[case]
    rng = np.random.default_rng(case)
    (q, tq), (k, tk), (v, tv) = (_pair(rng, s) for s in (qs, ks, vs))
    out = F.scaled_dot_product_attention(q, k, v, **kw)
    ref = TF.scaled_dot_product_attention(tq, tk, tv, **kw)
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    w = rng.standard_normal(ref.shape)
    (out * cg.tensor(w)).sum().backward()
    (ref * torch.tensor(w)).sum().backward()
    _grads_match((q, k, v), (tq, tk, tv), 1e-9, 1e-11)


MASKS = [
    ("bool", (5, 7)), ("bool", (2, 1, 5, 7)), ("bool", (1, 7)), ("float", (5, 7)), ("float", (2, 3, 5, 7)),
    ("float", (3, 1, 7)),
]


@pytest.mark.parametrize("kind,mshape", MASKS)
def test_masks_bool_float_broadcast(kind, mshape):
    rng = np.random.default_rng(len(mshape))
    (q, tq), (k, tk), (v, tv) = (_pair(rng, s) for s in ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)))
    if kind == "bool":
        m = rng.random(mshape) < 0.6
        m[..., 0] = True
    else:
        m = rng.standard_normal(mshape)
        m[rng.random(mshape) < 0.2] = -np.inf
        m[..., 0] = 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=cg.tensor(m))
    ref = TF.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(m))
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    out.sum().backward()
    ref.sum().backward()
    _grads_match((q, k, v), (tq, tk, tv), 1e-9, 1e-11)


def test_fully_masked_rows_are_zero_like_torch():
    rng = np.random.default_rng(0)
    (q, tq), (k, tk), (v, tv) = (_pair(rng, s) for s in ((1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8)))
    m = np.ones((4, 6), dtype=bool)
    m[2] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=cg.tensor(m))
    ref = TF.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(m))
    np.testing.assert_array_equal(out.detach().numpy()[0, :, 2], 0.0)
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert np.isfinite(q.grad.numpy()).all()


def test_empty_keys_give_zeros_like_torch():
    rng = np.random.default_rng(0)
    (q, tq), (k, tk), (v, tv) = (_pair(rng, s) for s in ((1, 2, 4, 8), (1, 2, 0, 8), (1, 2, 0, 8)))
    out = F.scaled_dot_product_attention(q, k, v)
    ref = TF.scaled_dot_product_attention(tq, tk, tv)
    assert out.shape == tuple(ref.shape)
    np.testing.assert_array_equal(out.detach().numpy(), 0.0)


def test_float32_and_default_scale():
    rng = np.random.default_rng(5)
    (q, tq), (k, tk), (v, tv) = (_pair(rng, (2, 2, 9, 32), np.float32) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = TF.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    assert out.dtype == cg.float32
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    # the default scale is 1/sqrt(E): an explicit one equal to it gives the same
    same = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(32))
    np.testing.assert_allclose(out.detach().numpy(), same.detach().numpy(), rtol=1e-6)


def test_dropout_composite_keep_rate_and_scaling():
    cg.manual_seed(0)
    q = cg.zeros(1, 1, 64, 8, dtype=cg.float64)
    k = cg.zeros(1, 1, 64, 8, dtype=cg.float64)
    v = cg.ones(1, 1, 64, 8, dtype=cg.float64)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25).numpy()
    # uniform attention over 64 keys: each output is (kept keys / 64) / 0.75
    kept = out[0, 0, :, 0] * 0.75 * 64
    np.testing.assert_allclose(kept, np.round(kept), atol=1e-9)
    assert 0.7 < kept.mean() / 64 < 0.8


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(enable_gqa=True, is_causal=True)])
def test_gradcheck(kw):
    rng = np.random.default_rng(2)
    hk = 1 if kw.get("enable_gqa") else 2
    q = cg.tensor(rng.standard_normal((1, 2, 4, 3)), requires_grad=True)
    k = cg.tensor(rng.standard_normal((1, hk, 5, 3)), requires_grad=True)
    v = cg.tensor(rng.standard_normal((1, hk, 5, 3)), requires_grad=True)
    assert gradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kw), (q, k, v))


def test_gradcheck_float_mask():
    rng = np.random.default_rng(3)
    q, k, v, m = (cg.tensor(rng.standard_normal(s), requires_grad=True)
                  for s in ((2, 4, 3), (2, 5, 3), (2, 5, 3), (4, 5)))
    assert gradcheck(lambda a, b, c, d: F.scaled_dot_product_attention(a, b, c, attn_mask=d), (q, k, v, m))


BAD = [
    (lambda: F.scaled_dot_product_attention(cg.randn(4), cg.randn(3, 4), cg.randn(3, 4)), "at least 2-D"),
    (lambda: F.scaled_dot_product_attention(cg.randn(2, 4), cg.randn(3, 5), cg.randn(3, 5)), "head dims"),
    (lambda: F.scaled_dot_product_attention(cg.randn(2, 4), cg.randn(3, 4), cg.randn(2, 4)), "sequence lengths"),
    (lambda: F.scaled_dot_product_attention(cg.randn(2, 4), cg.randn(3, 4, dtype=cg.float64), cg.randn(3, 4)),
     "same dtype"),
    (lambda: F.scaled_dot_product_attention(cg.randn(2, 4), cg.randn(3, 4), cg.randn(3, 4),
                                            attn_mask=cg.ones(2, 3, dtype=cg.bool), is_causal=True), "is_causal"),
    (lambda: F.scaled_dot_product_attention(cg.randn(2, 4, 3, 8), cg.randn(3, 2, 3, 8), cg.randn(3, 2, 3, 8)),
     "do not broadcast"),
    (lambda: F.scaled_dot_product_attention(cg.randn(1, 4, 3, 8), cg.randn(1, 2, 3, 8), cg.randn(1, 2, 3, 8)),
     "enable_gqa"),
    (lambda: F.scaled_dot_product_attention(cg.randn(1, 3, 3, 8), cg.randn(1, 2, 3, 8), cg.randn(1, 2, 3, 8),
                                            enable_gqa=True), "divide the query heads"),
    (lambda: F.scaled_dot_product_attention(cg.randn(2, 4), cg.randn(3, 4), cg.randn(3, 4),
                                            attn_mask=cg.ones(4, 3, dtype=cg.bool)), "does not broadcast"),
    (lambda: F.scaled_dot_product_attention(cg.arange(8).reshape(2, 4), cg.randn(3, 4), cg.randn(3, 4)),
     "floating point"),
    (lambda: F.scaled_dot_product_attention(cg.randn(2, 4), cg.randn(3, 4), cg.randn(3, 4), dropout_p=1.5),
     "dropout_p"),
    (lambda: F.scaled_dot_product_attention(cg.randn(2, 4), cg.randn(3, 4), cg.randn(3, 4),
                                            attn_mask=cg.zeros(2, 3, dtype=cg.float64)), "float attn_mask"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_raises_clearly(i):
    fn, msg = BAD[i]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
        fn()


# ---- the dispatcher -------------------------------------------------------------------------------

CAPS = A.FlashCaps(dtypes=(dt.bfloat16, dt.float16), head_dims=(32, 64, 128), dropout=True, backward=True,
                   align_elems=8)


def _qkv(B=2, Hq=4, Hkv=4, Sq=65, Sk=65, D=64, dtype=cg.bfloat16):
    return (cg.zeros(B, Hq, Sq, D, dtype=dtype), cg.zeros(B, Hkv, Sk, D, dtype=dtype),
            cg.zeros(B, Hkv, Sk, D, dtype=dtype))


def _path(q, k, v, mask=None, p=0.0, causal=False, gqa=False, caps=CAPS, grad=False):
    return A.sdpa_path(q, k, v, mask, p, causal, gqa, caps, grad)


def test_dispatch_takes_the_fused_path():
    assert _path(*_qkv()) == ("flash", "")
    assert _path(*_qkv(Hq=8, Hkv=2), gqa=True, causal=True) == ("flash", "")
    assert _path(*_qkv(Sq=1, Sk=1000, D=32, dtype=cg.float16)) == ("flash", "")
    # q, k and v read in place from the fused projection's (B, T, 3, H, D) output
    qkv = cg.zeros(2, 80, 3, 4, 64, dtype=cg.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert _path(q, k, v, causal=True) == ("flash", "")
    assert _path(*_qkv(), p=0.1, grad=True) == ("flash", "")
    # extent-1 dims may have any stride (an expanded batch of one, a single head)
    q1, k1, v1 = (t.expand(1, 1, 65, 64) for t in (cg.zeros(1, 1, 1, 64, dtype=cg.bfloat16),) * 3)
    assert _path(q1, k1, v1) == ("composite", "strides or offset not a positive multiple of 8 elements (16 bytes)")
    one = cg.zeros(1, 1, 65, 64, dtype=cg.bfloat16).as_strided((1, 1, 65, 64), (0, 0, 64, 1))
    assert _path(one, one, one) == ("flash", "")


def _reason(*args, **kw):
    path, why = _path(*args, **kw)
    assert path == "composite"
    return why


def test_dispatch_every_fallback_reason():
    q, k, v = _qkv()
    assert "no fused attention kernel" in _reason(q, k, v, caps=None)
    assert "attn_mask" in _reason(q, k, v, mask=cg.ones(65, 65, dtype=cg.bool))
    assert "4-D" in _reason(q[0], k[0], v[0])
    assert "dtype" in _reason(*_qkv(dtype=cg.float32))
    assert "head dim 80" in _reason(*_qkv(D=80))
    assert "head dim" in _reason(q, k, cg.zeros(2, 4, 65, 32, dtype=cg.bfloat16))
    assert "broadcast batch" in _reason(q, k[:1], v[:1])
    assert "broadcast head" in _reason(*_qkv(Hq=4, Hkv=1))
    assert "broadcast head" in _reason(*_qkv(Hq=4, Hkv=1), gqa=False)
    assert "empty" in _reason(*_qkv(Sk=0))
    assert "empty" in _reason(*_qkv(B=0))
    assert "grid limit" in _reason(*_qkv(B=65536, Sq=1, Sk=1, D=32))
    sq, sk, sv = _qkv(Sq=64, Sk=64)
    assert "unit stride" in _reason(sq.transpose(2, 3), sk, sv)
    odd = cg.zeros(2, 4, 65, 66, dtype=cg.bfloat16)[..., :64]   # row stride 66: not 16-byte aligned
    assert "multiple of 8" in _reason(odd, k, v)
    shifted = cg.zeros(2 * 4 * 65 * 64 + 1, dtype=cg.bfloat16)[1:].reshape(2, 4, 65, 64)
    assert "multiple of 8" in _reason(shifted, k, v)
    assert "multiple of 8" in _reason(q[:1].expand(2, 4, 65, 64), k, v)   # a broadcast (stride 0) batch
    no_dropout = CAPS._replace(dropout=False)
    assert "dropout is not inside" in _reason(q, k, v, p=0.1, caps=no_dropout)
    assert "fused backward" in _reason(q, k, v, p=0.1, grad=True, caps=CAPS._replace(backward=False))
    assert _path(q, k, v, p=0.1, caps=CAPS._replace(backward=False)) == ("flash", "")


# ---- the fused path's autograd node, on the CPU with the NumPy model as the kernel ----------------

@pytest.fixture
def flash_on_cpu(monkeypatch):
    """Register the forward model as CPU "sdpa_flash" (float64) and give the CPU fused caps."""
    calls = []

    def sdpa_flash(q, k, v, scale, is_causal, dropout_p, generator):
        calls.append((q.shape, q.stride(), k.shape, k.stride()))
        out, lse, _ = model.flash_forward(q.numpy(), k.numpy(), v.numpy(), scale, is_causal,
                                          block_m=64, block_n=64, acc_dtype=np.float64)
        return cg.tensor(out), cg.tensor(lse), None

    impl = kernel("sdpa_flash").impl
    old = impl[CPU]
    impl[CPU] = sdpa_flash
    monkeypatch.setitem(A.FLASH_CAPS, CPU, A.FlashCaps((dt.float64,), (8, 16), False, False, 1))
    yield calls
    impl[CPU] = old


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk,Hq,Hkv", [(65, 65, 2, 2), (17, 130, 4, 2), (129, 33, 3, 1)])
def test_fused_node_matches_torch(flash_on_cpu, Sq, Sk, Hq, Hkv, causal):
    rng = np.random.default_rng(Sq + Sk)
    (q, tq), (k, tk), (v, tv) = (_pair(rng, s) for s in ((2, Hq, Sq, 16), (2, Hkv, Sk, 16), (2, Hkv, Sk, 16)))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert flash_on_cpu, "the fused path was not taken"
    # the kernel saw (B, S, H, D) views of the (B, H, S, D) inputs: no copy
    assert flash_on_cpu[0][0] == (2, Sq, Hq, 16) and flash_on_cpu[0][1] == (Hq * Sq * 16, 16, Sq * 16, 1)
    assert out.grad_fn.next_functions[0].name() == "FlashAttentionBackward"
    ref = TF.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=True)
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    w = rng.standard_normal(ref.shape)
    (out * cg.tensor(w)).sum().backward()
    (ref * torch.tensor(w)).sum().backward()
    _grads_match((q, k, v), (tq, tk, tv), 1e-9, 1e-11)


def test_fused_node_gradcheck(flash_on_cpu):
    rng = np.random.default_rng(4)
    q = cg.tensor(rng.standard_normal((1, 4, 5, 8)), requires_grad=True)
    k = cg.tensor(rng.standard_normal((1, 2, 7, 8)), requires_grad=True)
    v = cg.tensor(rng.standard_normal((1, 2, 7, 8)), requires_grad=True)
    for causal in (False, True):
        assert gradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal,
                                                                         enable_gqa=True), (q, k, v))
    assert flash_on_cpu


def test_fused_node_calls_the_backward_kernel(flash_on_cpu):
    """Where the backend has "sdpa_flash_backward", the node calls it with the saved tensors."""
    seen = {}

    def sdpa_flash_backward(q, k, v, out, lse, dout, scale, is_causal, dropout_p, rng_state):
        seen.update(q=q.shape, k=k.shape, out=out.shape, lse=lse.shape, dout=dout.shape, scale=scale,
                    causal=is_causal, p=dropout_p, rng=rng_state)
        return A.flash_backward_composite(q, k, v, out, lse, dout, scale, is_causal)

    impl = kernel("sdpa_flash_backward").impl
    old, impl[CPU] = impl[CPU], sdpa_flash_backward
    rng = np.random.default_rng(6)
    (q, tq), (k, tk), (v, tv) = (_pair(rng, s) for s in ((2, 4, 9, 8), (2, 2, 11, 8), (2, 2, 11, 8)))
    try:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3).sum().backward()
    finally:
        impl[CPU] = old
    TF.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True, scale=0.3).sum().backward()
    assert seen == dict(q=(2, 9, 4, 8), k=(2, 11, 2, 8), out=(2, 9, 4, 8), lse=(2, 4, 9), dout=(2, 9, 4, 8),
                        scale=0.3, causal=True, p=0.0, rng=None)
    _grads_match((q, k, v), (tq, tk, tv), 1e-9, 1e-11)


def test_bench_cases_and_flops():
    """bench.attention covers the issue's shapes; FLOPs count the causal half and 2.5x for the backward."""
    import bench.attention as bench
    got = {(B, H, S, D, c) for _, B, H, S, D, c, _ in bench.CASES}
    assert {(4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (8, 16, 2048, 64, False), (64, 6, 256, 64, True),
            (256, 6, 65, 64, False)} <= got
    assert bench.attention_flops(1, 1, 10, 4, False, "fwd") == 1600.0
    assert bench.attention_flops(1, 1, 10, 4, True, "fwd+bwd") == 800.0 * 3.5


# ---- qkv_attention: q, k and v packed in one (B, S, 3, H, D) projection output ----------------

def _packed_pair(rng, B, S, H, D):
    return _pair(rng, (B, S, 3, H, D))


def _torch_unpacked(tqkv, **kw):
    return TF.scaled_dot_product_attention(*tqkv.transpose(1, 3).unbind(2), **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,S,H,D", [(2, 5, 3, 8), (1, 17, 2, 16), (3, 1, 1, 4)])
def test_qkv_attention_composite_matches_torch(B, S, H, D, causal):
    rng = np.random.default_rng(B * 100 + S + causal)
    qkv, tqkv = _packed_pair(rng, B, S, H, D)
    out = F.qkv_attention(qkv, is_causal=causal, scale=0.4)
    ref = _torch_unpacked(tqkv, is_causal=causal, scale=0.4)
    assert out.shape == (B, H, S, D)
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-12, atol=1e-13)
    w = rng.standard_normal(ref.shape)
    (out * cg.tensor(w)).sum().backward()
    (ref * torch.tensor(w)).sum().backward()
    _grads_match((qkv,), (tqkv,), 1e-10, 1e-12)


def test_qkv_attention_fused_node_takes_the_packed_tensor(flash_on_cpu):
    rng = np.random.default_rng(21)
    qkv, tqkv = _packed_pair(rng, 2, 33, 3, 16)
    out = F.qkv_attention(qkv, is_causal=True)
    # the kernel read (B, S, H, D) views straight out of the packed tensor
    assert flash_on_cpu == [((2, 33, 3, 16), (33 * 3 * 3 * 16, 3 * 3 * 16, 16, 1),
                             (2, 33, 3, 16), (33 * 3 * 3 * 16, 3 * 3 * 16, 16, 1))]
    node = out.grad_fn.next_functions[0]
    assert node.name() == "FlashAttentionBackward" and len(node.next_functions) == 1
    ref = _torch_unpacked(tqkv, is_causal=True)
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    w = rng.standard_normal(ref.shape)
    (out * cg.tensor(w)).sum().backward()
    (ref * torch.tensor(w)).sum().backward()
    _grads_match((qkv,), (tqkv,), 1e-9, 1e-11)


def test_qkv_attention_fused_node_gradcheck(flash_on_cpu):
    rng = np.random.default_rng(22)
    x = cg.tensor(rng.standard_normal((1, 5, 24)), requires_grad=True)
    for causal in (False, True):
        # the packed tensor as a model makes it: a view of a projection's output
        assert gradcheck(lambda t: F.qkv_attention((t * 1.5).reshape(1, 5, 3, 1, 8), is_causal=causal), (x,))
    assert flash_on_cpu


def test_qkv_attention_fused_backward_writes_one_buffer(flash_on_cpu):
    """With the backend's fused backward, dq, dk and dv are its slots of one (B, S, 3, H, D)
    gradient: the kernel gets them as grads_into and the node returns the buffer itself."""
    seen = []

    def sdpa_flash_backward(q, k, v, out, lse, dout, scale, is_causal, dropout_p, rng_state, grads_into=None):
        grads = A.flash_backward_composite(q, k, v, out, lse, dout, scale, is_causal)
        seen.append([(t.shape, t.stride()) for t in grads_into])
        for dst, src in zip(grads_into, grads):
            dst.copy_(src)
        return grads_into

    impl = kernel("sdpa_flash_backward").impl
    old, impl[CPU] = impl[CPU], sdpa_flash_backward
    rng = np.random.default_rng(23)
    qkv, tqkv = _packed_pair(rng, 2, 9, 2, 8)
    try:
        F.qkv_attention(qkv, scale=0.3).sum().backward()
    finally:
        impl[CPU] = old
    _torch_unpacked(tqkv, scale=0.3).sum().backward()
    slot = ((2, 9, 2, 8), (9 * 3 * 2 * 8, 3 * 2 * 8, 8, 1))
    assert seen == [[slot, slot, slot]]
    _grads_match((qkv,), (tqkv,), 1e-9, 1e-11)


def test_qkv_attention_bad_input():
    with pytest.raises(RuntimeError, match=r"qkv must be \(B, S, 3, H, D\), got shape \[2, 4, 8, 16\]"):
        F.qkv_attention(cg.zeros(2, 4, 8, 16))
    with pytest.raises(RuntimeError, match=r"got shape \[2, 4, 2, 1, 8\]"):
        F.qkv_attention(cg.zeros(2, 4, 2, 1, 8))
    with pytest.raises(TypeError, match="must be Tensor"):
        F.qkv_attention(np.zeros((2, 4, 3, 1, 8)))


def test_qkv_attention_backward_on_cuda_is_one_launch(dry_cuda):
    """On the (dry-run) CUDA device the packed gradient costs the attention backward alone:
    no zero-filled buffers, slot copies or adds."""
    B, S, H, D = 2, 64, 4, 64
    qkv = cg.randn(B, S, 3, H, D, device="cuda", dtype=cg.bfloat16, requires_grad=True)
    out = F.qkv_attention(qkv, is_causal=True)
    dout = cg.randn(B, H, S, D, device="cuda", dtype=cg.bfloat16)
    dry_cuda.reset()
    out.backward(dout)
    # the engine's copy of the given root gradient (a leaf's .grad must not alias it), then the kernel
    assert dry_cuda.names() == ["elementwise", "attention_backward"] and dry_cuda.work == []
    args = dry_cuda.calls[1][1]
    slot = [S * 3 * H * D, 3 * H * D, D, 1]
    assert [list(a) for a in (args[15], args[17], args[19])] == [slot, slot, slot]
    assert args[16] - args[14] == args[18] - args[16] == H * D * 2  # dq, dk, dv: adjacent bf16 slots
    assert qkv.grad.shape == (B, S, 3, H, D)
