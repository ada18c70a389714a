"""The fused attention forward on a GPU (marker gpu; skipped with the reason where
there is none): every specialization against float64 attention on the CPU (O
and the LSE), odd lengths, causal and not, Sq != Sk, GQA, q/k/v read in place
from a fused (B, T, 3, H, D) projection, gradients through the fused node, torch
SDPA on the same GPU where torch has CUDA, and capture/replay in a CUDA graph.
Outputs are poisoned (NaN) before every call."""
import importlib.util
import math
import pathlib

import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F
from cutegrad import dtypes as dt
from cutegrad.device import CUDA
from cutegrad.dispatch import kernel
from cutegrad.ops import attention as A


def _gpu_skip_reason():
    try:
        import cutegrad.cuda as cuda
        if not cuda.is_available():
            return "needs a CUDA GPU and driver"
        from cutegrad import _C
        if not hasattr(_C, "attention_fwd"):
            return "cutegrad._C was built without the attention kernels"
        if cuda.get_device_properties(0).major != 9:
            return "the fused attention kernels are sm_90a (Hopper) only"
    except Exception as exc:  # no driver library, or the extension is not built
        return f"needs a CUDA GPU and cutegrad._C: {type(exc).__name__}: {exc}"
    return None


_SKIP = _gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

_PATH = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "reference" / "attention.py"
_spec = importlib.util.spec_from_file_location("attention_model", _PATH)
model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model)

DTYPES = {"bf16": dt.bfloat16, "fp16": dt.float16}
# error bound on O relative to max|V| (inputs already rounded; P rounded to the dtype once)
TOL = {dt.bfloat16: 2e-2, dt.float16: 3e-3}


@pytest.fixture(autouse=True)
def poisoned_outputs():
    from cutegrad.backends import cuda as backend
    backend.set_poison_outputs(True)
    yield
    backend.set_poison_outputs(False)


def _bshd(rng, B, S, H, D, dtype):
    return cg.tensor(rng.standard_normal((B, S, H, D)), dtype=dtype)


def _reference(q, k, v, scale, causal):
    """float64 O (B, Sq, Hq, D) and LSE (B, Hq, Sq) of the rounded inputs."""
    qn, kn, vn = (t.to(dt.float64).cpu().numpy() for t in (q, k, v))
    return model.dense_attention(qn, kn, vn, scale, causal)


def _check(out, lse, ref_out, ref_lse, dtype):
    o = out.to(dt.float64).cpu().numpy()
    assert np.isfinite(o).all(), "unwritten (NaN) output elements"
    np.testing.assert_allclose(o, ref_out, atol=TOL[dtype] * max(1.0, np.abs(ref_out).max()), rtol=TOL[dtype])
    lse_np = lse.cpu().numpy()
    assert np.isfinite(lse_np).all()
    np.testing.assert_allclose(lse_np, ref_lse, rtol=1e-4, atol=1e-4)


SHAPES = [(1, 1, 1, 1), (2, 17, 17, 2), (1, 65, 65, 1), (2, 128, 128, 2), (1, 129, 129, 1), (1, 1000, 1000, 1),
          (2, 1, 300, 1), (1, 200, 70, 1)]   # (B, Sq, Sk, Hkv); Hq = 2 * Hkv (GQA) below


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dname", ["bf16", "fp16"])
def test_forward_kernel_against_float64(dname, D, shape, causal, rng):
    dtype = DTYPES[dname]
    B, Sq, Sk, Hkv = shape
    Hq = 2 * Hkv
    q, k, v = (_bshd(rng, B, S, H, D, dtype) for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv)))
    qd, kd, vd = (t.to("cuda") for t in (q, k, v))
    scale = 1.0 / math.sqrt(D)
    out, lse, rng_state = kernel("sdpa_flash").impl[CUDA](qd, kd, vd, scale, causal, 0.0, None)
    assert out.shape == (B, Sq, Hq, D) and out.is_contiguous() and lse.shape == (B, Hq, Sq) and rng_state is None
    _check(out, lse, *_reference(q, k, v, scale, causal), dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,Sq,Sk,Hq,Hkv", [(1, 64, 64, 3, 1), (5, 1, 128, 2, 2), (2, 40, 100, 6, 3), (1, 64, 65, 1, 1)])
def test_short_sequence_kernel(B, Sq, Sk, Hq, Hkv, causal, rng):
    """Sq <= 64 and Sk <= 128 take the short kernel: two (batch, head) items per CTA, an odd item count included."""
    from cutegrad.backends.cuda import attention as backend
    D = 64
    q, k, v = (_bshd(rng, B, S, H, D, dt.float16) for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv)))
    out, lse, _ = kernel("sdpa_flash").impl[CUDA](*(t.to("cuda") for t in (q, k, v)), 0.125, causal, 0.0, None)
    assert backend.last_kernel().endswith("_short")
    _check(out, lse, *_reference(q, k, v, 0.125, causal), dt.float16)


@pytest.mark.parametrize("causal", [False, True])
def test_qkv_read_in_place_from_the_fused_projection(causal, rng):
    """q, k, v as slices of a (B, T, 3, H, D) tensor: strided views, no copy; same result as contiguous."""
    B, T, H, D = 3, 80, 4, 64
    qkv = cg.tensor(rng.standard_normal((B, T, 3, H, D)), dtype=dt.bfloat16)
    qkv_d = qkv.to("cuda")
    q, k, v = (qkv_d[:, :, i] for i in range(3))
    out, lse, _ = kernel("sdpa_flash").impl[CUDA](q, k, v, 0.125, causal, 0.0, None)
    _check(out, lse, *_reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 0.125, causal), dt.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_takes_the_fused_path_and_matches_float64_grads(causal, rng):
    B, H, S, D = 2, 4, 129, 64
    qs, ks, vs = (cg.tensor(rng.standard_normal((B, H, S, D)), dtype=dt.bfloat16) for _ in range(3))
    q, k, v = (t.to("cuda").requires_grad_() for t in (qs, ks, vs))
    assert A.sdpa_path(q, k, v, None, 0.0, causal, False, A.flash_caps(q._storage.device), True) == ("flash", "")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.grad_fn.next_functions[0].name() == "FlashAttentionBackward"
    w = cg.tensor(rng.standard_normal((B, H, S, D)), dtype=dt.bfloat16)
    (out * w.to("cuda")).float().sum().backward()
    r = [t.to(dt.float64).requires_grad_() for t in (qs, ks, vs)]
    ref = F.scaled_dot_product_attention(*r, is_causal=causal)
    (ref * w.to(dt.float64)).sum().backward()
    np.testing.assert_allclose(out.to(dt.float64).cpu().numpy(), ref.detach().numpy(), atol=3e-2, rtol=2e-2)
    for got, want in zip((q, k, v), r):
        g, e = got.grad.to(dt.float64).cpu().numpy(), want.grad.numpy()
        np.testing.assert_allclose(g, e, atol=5e-2 * max(1.0, np.abs(e).max()), rtol=5e-2)


def test_matches_torch_sdpa_on_the_same_gpu(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    B, H, S, D = 2, 8, 257, 128
    arrs = [rng.standard_normal((B, H, S, D)).astype(np.float32) for _ in range(3)]
    for causal in (False, True):
        ours = F.scaled_dot_product_attention(*(cg.tensor(a, dtype=dt.bfloat16).to("cuda") for a in arrs),
                                              is_causal=causal)
        theirs = torch.nn.functional.scaled_dot_product_attention(
            *(torch.tensor(a, device="cuda", dtype=torch.bfloat16) for a in arrs), is_causal=causal)
        np.testing.assert_allclose(ours.to(dt.float32).cpu().numpy(), theirs.float().cpu().numpy(), atol=2e-2)


def test_capture_and_replay_with_new_inputs(rng):
    from cutegrad import _C, cuda, graphs
    _C.load_kernels()
    B, S, H, D = 2, 100, 4, 64
    q, k, v = (cg.zeros(B, S, H, D, dtype=dt.float16, device="cuda") for _ in range(3))
    g = graphs.CUDAGraph()
    s = cuda.Stream()
    with graphs.graph(g, stream=s):
        out, lse, _ = kernel("sdpa_flash").impl[CUDA](q, k, v, 0.125, True, 0.0, None)
    for _ in range(3):
        host = [_bshd(rng, B, S, H, D, dt.float16) for _ in range(3)]
        for dst, src in zip((q, k, v), host):
            dst.copy_(src.to("cuda"))
        g.replay(s)
        s.synchronize()
        _check(out, lse, *_reference(*host, 0.125, True), dt.float16)


@pytest.mark.parametrize("causal", [False, True])
# (130, 1000): more key blocks than K/V stages, so the pipelined loop's two held stages wrap the ring
@pytest.mark.parametrize("Sq,Sk", [(17, 17), (129, 65), (200, 300), (130, 1000)])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dname", ["bf16", "fp16"])
def test_dropout_mask_is_the_models_philox_stream(dname, D, Sq, Sk, causal, rng):
    """O with dropout equals float64 attention under the model's keep mask for the launch's (seed, offset)."""
    from cutegrad.backends.cuda import attention as backend
    from cutegrad.graphs import rng as grng
    dtype = DTYPES[dname]
    B, Hq, Hkv, p = 2, 4, 2, 0.2
    q, k, v = (_bshd(rng, B, S, H, D, dtype) for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv)))
    gen = grng.Generator(0, seed=1234)
    out, lse, state = kernel("sdpa_flash").impl[CUDA](*(t.to("cuda") for t in (q, k, v)), 0.125, causal, p, gen)
    assert backend.last_kernel().endswith("_dropout")
    assert state.seed == 1234 and state.seed_ptr == 0 and state.offset == 0
    assert gen.get_state()[1] == -(-B * Hq * Sq * Sk // 4) * 4
    keep = model.dropout_keep_mask(state.seed, state.offset, B, Hq, Sq, Sk, p)
    qn, kn, vn = (t.to(dt.float64).numpy() for t in (q, k, v))
    ref_out, ref_lse = model.dense_attention(qn, kn, vn, 0.125, causal, keep_mask=keep, dropout_p=p)
    _check(out, lse, ref_out, ref_lse, dtype)


def test_dropout_graphed_equals_eager_and_replays_draw_fresh_masks(rng):
    from cutegrad import _C, cuda, graphs
    from cutegrad.graphs import rng as grng
    _C.load_kernels()
    B, S, H, D, p = 1, 64, 2, 32, 0.5
    q, k, v = (_bshd(rng, B, S, H, D, dt.float16).to("cuda") for _ in range(3))
    gen = grng.default_generator(0)
    gen.manual_seed(7)
    eager = [kernel("sdpa_flash").impl[CUDA](q, k, v, 0.2, False, p, None)[0].cpu().numpy() for _ in range(2)]
    assert not np.array_equal(eager[0], eager[1])
    gen.manual_seed(7)
    g = graphs.CUDAGraph()
    s = cuda.Stream()
    with graphs.graph(g, stream=s):
        out, _, state = kernel("sdpa_flash").impl[CUDA](q, k, v, 0.2, False, p, None)
    assert state.seed_ptr != 0 and state.offset_ptr == state.seed_ptr + 8
    for want in eager:
        g.replay(s)
        s.synchronize()
        np.testing.assert_array_equal(out.cpu().numpy(), want)
