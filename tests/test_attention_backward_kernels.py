"""The fused attention backward's kernels, read without a GPU: the specialization
list, the tiles shared with the NumPy model, the SASS of every built sm_90a main
kernel (tensor cores, TMA, atomics for dQ, no local memory), and every argument
check of `_C.attention_backward`, which raises before touching a device."""
import importlib.util
import json
import os
import re

import pytest

from cutegrad import dtypes as dt
from test_build import MANIFEST, ROOT, local_bytes, needs_build, sass_listings, unelected_tx_arrivals


def _load(rel, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, *rel.split("/")))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KERNEL = _load("kernels/cute/attention_bwd.py", "cutegrad_kernel_attention_bwd")
MODEL = _load("kernels/reference/attention_backward.py", "cutegrad_reference_attention_backward_k")


def test_specializations_cover_dtypes_head_dims_and_dropout_on_sm90a_only():
    specs = KERNEL.specializations(("sm_90a",))
    assert {(s.dtype, s.head_dim, s.dropout) for s in specs} == {
        (d, h, p) for d in ("bf16", "fp16") for h in (32, 64, 128) for p in (False, True)}
    assert len({s.name for s in specs}) == len(specs) == 12
    assert KERNEL.specializations(("sm_100a",)) == []
    assert KERNEL.SPECS == specs


def test_kernel_tiles_are_the_models():
    assert (KERNEL.BLOCK_M, KERNEL.BLOCK_N) == (MODEL.BLOCK_M, MODEL.BLOCK_N)


def test_registry_exports_the_tiles_and_every_launcher():
    entries = [(s, f"/x/{s.name}.h") for s in KERNEL.SPECS]
    text = KERNEL.emit_registry(entries)
    assert f"kAttentionBwdBlockM = {KERNEL.BLOCK_M};" in text and f"kAttentionBwdBlockN = {KERNEL.BLOCK_N};" in text
    for s in KERNEL.SPECS:
        assert f"cute_dsl_{s.name}_wrapper(" in text and f'"{s.name}"' in text
    assert "kNumAttentionBwdKernels = 12;" in text


@needs_build
def test_every_sm90_attention_backward_kernel_uses_tensor_cores_tma_and_no_local_memory():
    manifest = json.load(open(MANIFEST))
    objects = [o for o in manifest["objects"] if os.path.basename(o).startswith("attention_bwd_sm_90a_")]
    assert len(objects) == len(KERNEL.SPECS), objects
    for name, listing in sass_listings(objects):
        # S^T, dP^T, dQ (shared-memory operands) and dV, dK (register A operand)
        assert re.search(r"HGMMA\.64x\d+x16\.F32", listing), f"{name}: no HGMMA"
        assert "UTMALDG" in listing, f"{name}: no TMA load"
        assert re.search(r"\bREDG?\.E\.ADD\.F32", listing), f"{name}: no fp32 reduction for dQ"
        assert "STSM.16.MT88" in listing, f"{name}: dS is not stored with stmatrix"
        assert "MUFU.EX2" in listing, f"{name}: no exp2"
        # the Philox multiplier appears exactly in the dropout kernels
        assert ("0xd2511f53" in listing) == ("_dropout" in name), f"{name}: Philox rounds where not expected"
        assert not re.search(r"\b(STL|LDL)\b", listing), f"{name}: local memory traffic (spills)"
        usage = local_bytes(listing)
        assert usage and max(usage) == 0, f"{name}: local memory {usage}"
        assert not unelected_tx_arrivals(listing), f"{name}: {unelected_tx_arrivals(listing)}"


# --- _C.attention_backward's argument checks (all before any CUDA call) -----------------------------
def _good(B=2, Sq=65, Sk=129, Hq=4, Hkv=2, D=64):
    def bshd(S, H):
        return (S * H * D, H * D, D, 1)

    return dict(q=4096, q_shape=(B, Sq, Hq, D), q_strides=bshd(Sq, Hq), k=4096, k_shape=(B, Sk, Hkv, D),
                k_strides=bshd(Sk, Hkv), v=4096, v_strides=bshd(Sk, Hkv), out=4096, out_strides=bshd(Sq, Hq),
                dout=4096, dout_strides=bshd(Sq, Hq), lse=4096, lse_strides=(Hq * Sq, Sq, 1), dq=4096,
                dq_strides=bshd(Sq, Hq), dk=4096, dk_strides=bshd(Sk, Hkv), dv=4096, dv_strides=bshd(Sk, Hkv),
                lse2=4096, delta=4096, dq_acc=4096, dtype="bf16", scale=0.125, is_causal=True,
                deterministic=False, stream=0)


def _native():
    from cutegrad._gemm import native
    lib = native()
    if not hasattr(lib, "attention_backward"):
        pytest.skip("cutegrad._C was built without the attention backward")
    return lib


BAD = [
    (dict(k_shape=(2, 129, 3, 64)), ValueError, r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    (dict(k_shape=(3, 129, 2, 64)), ValueError, r"batch of q .* and k .* differ"),
    (dict(k_shape=(2, 129, 2, 32)), ValueError, r"head dim of q .* and k .* differ"),
    (dict(q_shape=(2, 65, 4), ), ValueError, r"q shape must be \(B, Sq, Hq, D\)"),
    (dict(q_shape=(2, 0, 4, 64)), ValueError, r"every extent must be at least 1"),
    (dict(q_shape=(2, 65, 4, 48), k_shape=(2, 129, 2, 48)), ValueError, r"no fused kernel for head dim 48"),
    (dict(dtype="fp32"), TypeError, r"unsupported dtype 'fp32'"),
    (dict(q_strides=(65 * 256, 256, 64, 2)), ValueError, r"q must have unit stride on the head dim"),
    (dict(k_strides=(129 * 128, 132, 64, 1)), ValueError, r"k strides .* multiples of 8 elements"),
    (dict(v=4098), ValueError, r"v must be 16-byte aligned"),
    (dict(dout=0), ValueError, r"dout is a null pointer"),
    (dict(lse_strides=(4 * 65, 1, 4)), ValueError, r"lse must be \(B, Hq, Sq\) float32 with unit stride"),
    (dict(dq_acc=4100), ValueError, r"dq accumulator must be a non-null 16-byte aligned pointer"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite non-zero number"),
    (dict(scale=0.0), ValueError, r"scale must be a finite non-zero number"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=0.1, rng=0), ValueError, r"with dropout the rng workspace must be a non-null 16-byte aligned"),
    (dict(dropout_p=0.1, rng=4096, offset_ptr=4100), ValueError, r"Philox seed / offset pointers must be 8-byte"),
    (dict(k_shape=(2, 129, 70000, 64), q_shape=(2, 65, 70000, 64)), ValueError, r"extents out of the kernel's range"),
]


@needs_build
@pytest.mark.parametrize("change,exc,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_bad_arguments_raise_before_launch(change, exc, message):
    lib = _native()
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=message):
        lib.attention_backward(**args)


@needs_build
def test_workspace_sizes():
    lib = _native()
    # sq_pad = 128 rows; deterministic: ceil(129 / 128) = 2 partials
    assert lib.attention_backward_workspace(2, 65, 4, 129, 64, False) == (2 * 4 * 128, 2 * 4 * 128 * 64, 1)
    assert lib.attention_backward_workspace(2, 65, 4, 129, 64, True) == (2 * 4 * 128, 2 * 2 * 4 * 128 * 64, 2)
    assert lib.attention_backward_workspace(1, 1, 1, 1, 32, True) == (64, 64 * 32, 1)
    names = {e["name"] for e in lib.attention_backward_specializations()}
    assert names == {s.name for s in KERNEL.SPECS}


# --- the CUDA backend's checks, which read only shapes, dtypes and devices -------------------------
def _backend():
    from cutegrad.backends.cuda import attention_backward
    return attention_backward


def _cpu_args(B=1, Sq=5, Sk=7, Hq=4, Hkv=2, D=8, dtype=None):
    import numpy as np

    import cutegrad
    dtype = dtype or dt.bfloat16
    rng = np.random.default_rng(0)
    mk = lambda shape, d=dtype: cutegrad.tensor(rng.standard_normal(shape), dtype=d)  # noqa: E731
    return [mk((B, Sq, Hq, D)), mk((B, Sk, Hkv, D)), mk((B, Sk, Hkv, D)), mk((B, Sq, Hq, D)),
            mk((B, Hq, Sq), dt.float32), mk((B, Sq, Hq, D))]


def _with(index, fn):
    def mutate(args):
        args[index] = fn(args[index])
        return args
    return mutate


@pytest.mark.parametrize("mutate,message", [
    (_with(1, lambda t: t.to(dtype=dt.float16)), r"k is cutegrad.float16, q is cutegrad.bfloat16"),
    (lambda a: [t.to(dtype=dt.float32) for t in a], r"dtype cutegrad.float32 has no fused kernel"),
    (_with(2, lambda t: t[:, :6]), r"k \[1, 7, 2, 8\] and v \[1, 6, 2, 8\] differ"),
    (_with(5, lambda t: t[:, :4]), r"out \[1, 5, 4, 8\] and dout \[1, 4, 4, 8\] must have q's shape"),
    (_with(4, lambda t: t.to(dtype=dt.bfloat16)), r"lse must be float32 of shape \[1, 4, 5\]"),
    (_with(0, lambda t: t[0]), r"q must be \(B, S, H, D\)"),
])
def test_backend_checks_name_the_bad_argument(mutate, message):
    with pytest.raises(RuntimeError, match=message):
        _backend()._check(*mutate(_cpu_args()))


def test_backend_accepts_good_arguments_and_knows_tma_layouts():
    be = _backend()
    args = _cpu_args(D=64)
    be._check(*args)
    q = args[0]
    assert be._tma_ready(q)
    assert not be._tma_ready(q.transpose(1, 3))         # head dim no longer unit-stride
    assert not be._tma_ready(_cpu_args(D=12)[0])         # strides not 16-byte multiples
    assert be._tma_ready(q.transpose(1, 2))             # (B, H, S, D) viewed as (B, S, H, D)


def test_deterministic_switch():
    be = _backend()
    assert be.is_deterministic() is False
    be.set_deterministic(True)
    try:
        assert be.is_deterministic() is True
    finally:
        be.set_deterministic(False)
