"""The NumPy model of the fused attention forward (kernels/reference/attention.py)
against float64 dense attention: block sizes, online softmax, last-block masking,
causal block skipping, GQA, dropout from the Philox stream.  Runs without a GPU."""
import importlib.util
import math
import pathlib

import ml_dtypes
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "reference" / "attention.py"
_spec = importlib.util.spec_from_file_location("attention_model", _PATH)
model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model)

LENGTHS = (1, 17, 64, 65, 80, 128, 129, 1000)


def _inputs(rng, B, Sq, Sk, Hq, Hkv, D, dtype=np.float64):
    q = rng.standard_normal((B, Sq, Hq, D)).astype(dtype)
    k = rng.standard_normal((B, Sk, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, Sk, Hkv, D)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("S", LENGTHS)
def test_model_matches_dense_float64(S, causal):
    rng = np.random.default_rng(S * 2 + causal)
    B, Hq, Hkv, D = (1, 2, 1, 32) if S == 1000 else (2, 4, 2, 16)
    q, k, v = _inputs(rng, B, S, S, Hq, Hkv, D)
    scale = 1.0 / math.sqrt(D)
    out, lse, _ = model.flash_forward(q, k, v, scale, causal, acc_dtype=np.float64)
    ref_out, ref_lse = model.dense_attention(q, k, v, scale, causal)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1, 129), (17, 1000), (129, 64), (80, 65), (1000, 17), (65, 1)])
def test_model_cross_lengths_and_block_shapes(Sq, Sk, causal):
    """Sq != Sk with PyTorch's top-left causal alignment, at the long (128x128) and short (64-row) tiles."""
    rng = np.random.default_rng(Sq * 7 + Sk)
    q, k, v = _inputs(rng, 1, Sq, Sk, 3, 1, 32)
    ref_out, ref_lse = model.dense_attention(q, k, v, 0.3, causal)
    for bm, bn in ((128, 128), (64, 128), (64, 64)):
        out, lse, _ = model.flash_forward(q, k, v, 0.3, causal, block_m=bm, block_n=bn, acc_dtype=np.float64)
        np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("S", [65, 129, 1000])
def test_model_low_precision_close_to_dense(S, dtype):
    """fp32 accumulation with P rounded to the input dtype, as the kernel's PV wgmma reads it."""
    rng = np.random.default_rng(S)
    q, k, v = (t.astype(dtype) for t in _inputs(rng, 1, S, S, 2, 2, 64))
    scale = 0.125
    out, lse, _ = model.flash_forward(q, k, v, scale, True, p_dtype=dtype)
    ref_out, ref_lse = model.dense_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                             scale, True)
    tol = 2e-2 if dtype is ml_dtypes.bfloat16 else 4e-3
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    # rounding P is not a no-op: without it the result is closer to float64
    exact, _, _ = model.flash_forward(q, k, v, scale, True)
    assert np.abs(exact - ref_out).max() < np.abs(out - ref_out).max()


@pytest.mark.parametrize("Sq,Sk", [(1000, 1000), (129, 129), (64, 1000), (1000, 64)])
def test_causal_block_skipping(Sq, Sk):
    """A causal CTA visits key blocks up to its last row only; the count is what the kernel runs."""
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, 1, Sq, Sk, 1, 1, 16)
    _, _, visited = model.flash_forward(q, k, v, 1.0, True, acc_dtype=np.float64)
    n_all = -(-Sk // 128)
    for t in range(visited.shape[2]):
        last_row = min((t + 1) * 128, Sq) - 1
        needed = min(n_all, last_row // 128 + 1)
        assert visited[0, 0, t] == needed
    _, _, dense = model.flash_forward(q, k, v, 1.0, False, acc_dtype=np.float64)
    if Sq > 128 and Sk > 128:
        assert visited.sum() < dense.sum()


def test_mask_only_where_needed():
    assert not model.block_needs_mask(0, 128, 128, 128, 1000, True)      # block fully below the diagonal
    assert model.block_needs_mask(128, 128, 128, 128, 1000, True)        # the diagonal block
    assert model.block_needs_mask(896, 128, 0, 128, 1000, False)         # last partial block
    assert not model.block_needs_mask(768, 128, 0, 128, 1024, False)


def test_gqa_head_mapping():
    """q head h reads k/v head h // (Hq // Hkv): same as repeating k/v heads."""
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 2, 33, 40, 6, 2, 16)
    out, lse, _ = model.flash_forward(q, k, v, 0.25, False, acc_dtype=np.float64)
    full_k, full_v = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    ref, ref_lse = model.dense_attention(q, full_k, full_v, 0.25, False)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="multiple"):
        model.flash_forward(q[:, :, :5], k, v, 0.25, False)


def test_philox_known_answer():
    """Random123's Philox4x32-10 known answer (counter 0, key 0) and the stream of random.cu."""
    assert [int(x) for x in model.philox4x32(0, [0])[0]] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    u = model.dropout_uniform(0, 0, 6)
    lanes = np.concatenate([model.philox4x32(0, [0])[0], model.philox4x32(0, [1])[0]])[:6]
    np.testing.assert_array_equal(u, (lanes >> 8).astype(np.float32) * np.float32(2.0 ** -24))
    # an offset of 8 starts two Philox counters later
    np.testing.assert_array_equal(model.dropout_uniform(0, 8, 4), model.dropout_uniform(0, 0, 4, start=8))


def test_dropout_mask_mapping_and_rate():
    B, H, Sq, Sk = 2, 3, 17, 65
    mask = model.dropout_keep_mask(1234, 40, B, H, Sq, Sk, 0.1)
    assert mask.shape == (B, H, Sq, Sk)
    u = model.dropout_uniform(1234, 40, B * H * Sq * Sk)
    b, h, i, j = 1, 2, 16, 64
    assert mask[b, h, i, j] == (u[((b * H + h) * Sq + i) * Sk + j] < np.float32(0.9))
    assert abs(mask.mean() - 0.9) < 0.01
    assert not np.array_equal(mask, model.dropout_keep_mask(1235, 40, B, H, Sq, Sk, 0.1))
    assert not np.array_equal(mask, model.dropout_keep_mask(1234, 44, B, H, Sq, Sk, 0.1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("S", [17, 129])
def test_model_dropout_matches_dense(S, causal):
    rng = np.random.default_rng(S)
    q, k, v = _inputs(rng, 2, S, S, 4, 2, 16)
    p = 0.25
    keep = model.dropout_keep_mask(7, 0, 2, 4, S, S, p)
    out, lse, _ = model.flash_forward(q, k, v, 0.3, causal, keep_mask=keep, dropout_p=p, acc_dtype=np.float64)
    ref, ref_lse = model.dense_attention(q, k, v, 0.3, causal, keep_mask=keep, dropout_p=p)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    # the LSE is dropout's normaliser: independent of the mask
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)
    plain, _, _ = model.flash_forward(q, k, v, 0.3, causal, acc_dtype=np.float64)
    assert np.abs(plain - out).max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1, 128), (64, 64), (40, 100), (64, 65), (17, 1)])
def test_model_short_kernel_tiles(Sq, Sk, causal):
    """The short-sequence kernel's shape: 64-row tiles, the whole K/V (Sk <= 128) as one block."""
    rng = np.random.default_rng(Sq * 131 + Sk)
    q, k, v = _inputs(rng, 3, Sq, Sk, 3, 1, 32)
    out, lse, visited = model.flash_forward(q, k, v, 0.2, causal, block_m=64, block_n=128, acc_dtype=np.float64)
    assert (visited == 1).all()
    ref_out, ref_lse = model.dense_attention(q, k, v, 0.2, causal)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (129, 129), (300, 1000), (1000, 257)])
@pytest.mark.parametrize("dtype", [None, ml_dtypes.bfloat16, np.float16])
def test_pipelined_schedule_is_bitwise_the_plain_loop(Sq, Sk, causal, dtype):
    """The long kernels' schedule (block nb's P V added to O during iteration nb + 1, before
    O is rescaled by that block's alpha; dropout on the rounded P) gives exactly the plain
    loop's fp32 results, so the kernels' pipelining changes no number."""
    rng = np.random.default_rng(Sq * 3 + Sk + causal)
    q, k, v = _inputs(rng, 1, Sq, Sk, 2, 1, 32, np.float32 if dtype is None else dtype)
    keep = model.dropout_keep_mask(11, 4, 1, 2, Sq, Sk, 0.2)
    for kw in ({}, {"keep_mask": keep, "dropout_p": 0.2}):
        plain = model.flash_forward(q, k, v, 0.2, causal, p_dtype=dtype, **kw)
        piped = model.flash_forward(q, k, v, 0.2, causal, p_dtype=dtype, pipelined=True, **kw)
        for a, b in zip(plain, piped):
            np.testing.assert_array_equal(a, b)
