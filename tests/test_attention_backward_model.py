"""The NumPy model of the fused attention backward (kernels/reference/attention_backward.py)
against dense float64 attention gradients: the tiled algorithm (preprocess, key-block
main loop, causal block skipping, masking of the last partial blocks, GQA, both dQ
accumulation orders) is proven here before it runs on a GPU."""
import importlib.util
import math
import os

import numpy as np
import pytest

from attention_backward_harness import dense_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
    path = os.path.join(ROOT, "kernels", "reference", "attention_backward.py")
    spec = importlib.util.spec_from_file_location("cutegrad_reference_attention_backward", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


M = _model()


def _inputs(rng, B, Sq, Sk, Hq, Hkv, D):
    q = rng.standard_normal((B, Sq, Hq, D))
    k = rng.standard_normal((B, Sk, Hkv, D))
    v = rng.standard_normal((B, Sk, Hkv, D))
    dout = rng.standard_normal((B, Sq, Hq, D))
    return q, k, v, dout


LENGTHS = (1, 17, 64, 65, 80, 128, 129, 1000)
# (Sq, Sk): every length as self-attention, and cross pairs with Sq != Sk both ways
PAIRS = [(n, n) for n in LENGTHS] + [(17, 129), (129, 17), (1, 1000), (1000, 65), (80, 200), (64, 65)]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("sq,sk", PAIRS)
def test_model_matches_dense_float64(rng, sq, sk, is_causal):
    hq, hkv = (4, 2) if sq * sk <= 129 * 129 else (2, 1)   # GQA everywhere, fewer heads at 1000
    q, k, v, dout = _inputs(rng, 1 if sq * sk > 129 * 129 else 2, sq, sk, hq, hkv, 32)
    scale = 1.0 / math.sqrt(32)
    out, lse, dq_ref, dk_ref, dv_ref = dense_attention(q, k, v, dout, scale, is_causal)
    for deterministic in (False, True):
        dq, dk, dv = M.attention_backward(q, k, v, out, lse, dout, scale, is_causal, deterministic=deterministic)
        for name, got, ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
            assert got.shape == ref.shape, name
            assert np.isfinite(got).all(), name
            # the model's preprocess keeps delta and lse2 in fp32 as the kernel does
            np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(ref).max()),
                                       err_msg=f"{name} deterministic={deterministic}")


def test_causal_keys_no_query_sees_get_zero_gradients(rng):
    # top-left causal with Sk > Sq: keys j >= Sq are seen by no query (their key
    # blocks run no query block) and must still get dk = dv = 0, not garbage
    q, k, v, dout = _inputs(rng, 1, 17, 300, 2, 2, 16)
    scale = 0.25
    out, lse, *_ = dense_attention(q, k, v, dout, scale, True)
    for deterministic in (False, True):
        dq, dk, dv = M.attention_backward(q, k, v, out, lse, dout, scale, True, deterministic=deterministic)
        assert (dk[:, 17:] == 0).all() and (dv[:, 17:] == 0).all()
        assert np.abs(dk[:, :17]).min() > 0 and np.abs(dv[:, :17]).min() > 0
        assert np.isfinite(dq).all()


def test_atomic_order_changes_only_rounding_and_deterministic_is_reproducible(rng):
    q, k, v, dout = (x.astype(np.float32) for x in _inputs(rng, 1, 300, 700, 2, 1, 64))
    scale = 0.125
    out, lse, dq_ref, *_ = dense_attention(*(x.astype(np.float64) for x in (q, k, v, dout)), scale, False)
    runs = [M.attention_backward(q, k, v, out, lse, dout, scale, False, acc=np.float32, dq_order_seed=s)[0]
            for s in (0, 1, 2)]
    for r in runs:
        np.testing.assert_allclose(r, dq_ref, rtol=1e-3, atol=1e-4)
    det = [M.attention_backward(q, k, v, out, lse, dout, scale, False, deterministic=True, acc=np.float32)[0]
           for _ in range(2)]
    assert np.array_equal(det[0], det[1])


def _round_bf16(x):
    import ml_dtypes
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("is_causal", [False, True])
def test_model_with_gpu_numerics_stays_close(rng, is_causal):
    # fp32 accumulation with P and dS rounded to bf16 before the products, as the
    # kernel's wgmma sees them: the error budget the GPU tests use
    q, k, v, dout = (_round_bf16(x.astype(np.float32)) for x in _inputs(rng, 2, 129, 200, 4, 2, 64))
    scale = 0.125
    out, lse, dq_ref, dk_ref, dv_ref = dense_attention(*(x.astype(np.float64) for x in (q, k, v, dout)), scale,
                                                       is_causal)
    got = M.attention_backward(q, k, v, _round_bf16(out.astype(np.float32)), lse, dout, scale, is_causal,
                               acc=np.float32, round_operands=_round_bf16)
    for g, r in zip(got, (dq_ref, dk_ref, dv_ref)):
        err = np.abs(g - r).max() / np.abs(r).max()
        assert err < 2e-2, err


def test_block_schedule_helpers():
    # key block 1 (keys 128..255) is first seen by query block 2 (rows 128..191)
    assert M.first_query_block(1, True) == 2 and M.first_query_block(1, False) == 0
    assert M.key_blocks_seen(1, 8, True) == 1 and M.key_blocks_seen(2, 8, True) == 2
    assert M.key_blocks_seen(5, 3, True) == 3 and M.key_blocks_seen(0, 8, False) == 8
    # query block 3 (rows 192..255) needs the mask with key block 1 (keys up to 255), not with key block 0
    assert M.block_needs_causal_mask(3, 1) and not M.block_needs_causal_mask(3, 0)
    for n in range(6):
        for m in range(12):
            sees = m >= M.first_query_block(n, True)
            assert sees == (n < M.key_blocks_seen(m, 6, True))


def test_dense_reference_agrees_with_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    q, k, v, dout = _inputs(rng, 2, 33, 47, 4, 2, 16)
    scale = 0.3
    out, lse, dq, dk, dv = dense_attention(q, k, v, dout, scale, True)
    tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
    to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale, enable_gqa=True)
    to.backward(torch.tensor(dout.transpose(0, 2, 1, 3)))
    np.testing.assert_allclose(out, to.detach().numpy().transpose(0, 2, 1, 3), rtol=1e-10, atol=1e-12)
    for mine, t in ((dq, tq), (dk, tk), (dv, tv)):
        np.testing.assert_allclose(mine, t.grad.numpy().transpose(0, 2, 1, 3), rtol=1e-9, atol=1e-11)


def _check_dropout(rng, sq, sk, is_causal, keep, p):
    q, k, v, dout = _inputs(rng, 1, sq, sk, 4, 2, 32)
    scale = 0.2
    out, lse_dropped, dq_ref, dk_ref, dv_ref = dense_attention(q, k, v, dout, scale, is_causal, keep, p)
    # the forward's LSE is of the undropped probabilities
    lse = dense_attention(q, k, v, dout, scale, is_causal)[1]
    np.testing.assert_array_equal(lse, lse_dropped)
    for deterministic in (False, True):
        got = M.attention_backward(q, k, v, out, lse, dout, scale, is_causal, deterministic=deterministic,
                                   keep_mask=keep, dropout_p=p)
        for name, g, r in zip(("dq", "dk", "dv"), got, (dq_ref, dk_ref, dv_ref)):
            np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(r).max()), err_msg=name)
    # the mask matters: ignoring it gives other gradients
    wrong = M.attention_backward(q, k, v, out, lse, dout, scale, is_causal)
    assert np.abs(wrong[2] - dv_ref).max() > 1e-3


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 129), (65, 65), (129, 80), (200, 300)])
def test_model_with_dropout_matches_dense_float64(rng, sq, sk, is_causal):
    p = 0.3
    keep = rng.random((1, 4, sq, sk)) >= p
    _check_dropout(rng, sq, sk, is_causal, keep, p)


def test_model_with_the_forwards_philox_dropout_mask(rng):
    # the forward's mask function (kernels/reference/attention.py, the attention forward's model)
    path = os.path.join(ROOT, "kernels", "reference", "attention.py")
    if not os.path.exists(path):
        pytest.skip("kernels/reference/attention.py (the forward's model with dropout_keep_mask) is not on this branch")
    spec = importlib.util.spec_from_file_location("cutegrad_reference_attention_fwd", path)
    fwd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fwd)
    p, sq, sk = 0.1, 129, 200
    keep = fwd.dropout_keep_mask(1234, 8, 1, 4, sq, sk, p)
    assert keep.shape == (1, 4, sq, sk) and 0.85 < keep.mean() < 0.95
    _check_dropout(rng, sq, sk, True, keep, p)
