"""The CUDA backend's fused-attention module, checked without a GPU: it offers the
head dims and dtypes the build compiles, only on sm_90 devices."""
import os
import sys

import cutegrad.backends.cuda.attention as backend
from cutegrad import dtypes as dt
from cutegrad.device import CUDA, device
from cutegrad.dispatch import has_impl
from cutegrad.ops import attention as A

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "cute"))
import attention_fwd  # noqa: E402


def test_backend_offers_what_the_build_compiles():
    specs = attention_fwd.specializations(("sm_90a",))
    # every (dtype, head dim): long without and with dropout, and short (no dropout)
    assert {(s.dtype, s.head_dim, s.dropout, s.short) for s in specs} == {
        (d, h, p, short) for d in ("bf16", "fp16") for h in (32, 64, 128)
        for p, short in ((False, False), (True, False), (False, True))}
    assert backend.HEAD_DIMS == attention_fwd.HEAD_DIMS == tuple(sorted({s.head_dim for s in specs}))
    names = {"bf16": dt.bfloat16, "fp16": dt.float16}
    assert set(backend._DTYPE_NAMES) == {names[s.dtype] for s in specs}
    assert has_impl("sdpa_flash", CUDA)


def test_fused_path_only_on_sm90(monkeypatch):
    dev = device("cuda:0")
    monkeypatch.setitem(backend._device_ok, 0, True)
    caps = A.flash_caps(dev)
    assert caps.head_dims == (32, 64, 128) and caps.dtypes == (dt.bfloat16, dt.float16)
    assert caps.dropout is True and caps.align_elems == 8
    assert caps.backward == has_impl("sdpa_flash_backward", CUDA)
    monkeypatch.setitem(backend._device_ok, 0, False)
    assert A.flash_caps(dev) is None


def test_kernel_strides_replace_those_of_extent_one_dims():
    import cutegrad as cg
    x = cg.zeros(1, 5, 1, 64, dtype=cg.bfloat16).as_strided((1, 5, 1, 64), (0, 64, 0, 1))
    assert backend.kernel_strides(x) == [5 * 64, 64, 64]
    y = cg.zeros(2, 7, 3, 3, 32)[:, :, 1]          # a (B, T, 3, H, D) projection's k
    assert backend.kernel_strides(y) == [7 * 9 * 32, 9 * 32, 32]


def test_kernel_variant_by_sequence_length():
    assert backend.kernel_variant(64, 64, 64, 4, 0.0) == "short"        # reverse
    assert backend.kernel_variant(5, 1, 128, 8, 0.0) == "short"         # decode over a short cache
    assert backend.kernel_variant(256, 80, 80, 8, 0.0) == "long"        # vit: 80 rows fill 128 better than 2 x 64
    assert backend.kernel_variant(64, 128, 128, 8, 0.0) == "long"       # minigpt
    assert backend.kernel_variant(1, 1, 129, 8, 0.0) == "long"          # K/V past one block
    assert backend.kernel_variant(64, 64, 64, 4, 0.1) == "dropout"
    assert backend.kernel_variant(65536, 1, 1, 65535, 0.0) == "long"    # items past 32 bits


BAD_CALLS = [
    (dict(dtype="fp32"), "dtype must be"),
    (dict(sq=0), "extents must be >= 1"),
    (dict(batch=65536), "at most 65535"),
    (dict(hq=3, hkv=2), "not a multiple of key/value heads"),
    (dict(q_strides=[8, 8, 12]), "multiple of 8 elements"),
    (dict(k_strides=[8, 0, 8]), "multiple of 8 elements"),
    (dict(v_strides=[8, 8]), "needs 3 strides"),
    (dict(q=0), "q is a null pointer"),
    (dict(o=24), "o is not 16-byte aligned"),
    (dict(lse=2), "lse is a null or misaligned"),
    (dict(dropout_p=1.0), "dropout_p must be in"),
    (dict(dropout_p=0.1, rng_offset=2), "multiple of 4"),
    (dict(dropout_p=0.1, rng_seed_ptr=64, rng_offset_ptr=80), "rng_seed_ptr \\+ 8"),
    (dict(sq=65, short_seq=True), "short-sequence kernel takes"),
    (dict(dropout_p=0.1, short_seq=True), "short-sequence kernel takes"),
]


def _attention_fwd_args(**over):
    args = dict(q=16, k=16, v=16, o=16, lse=16, batch=1, sq=8, sk=8, hq=2, hkv=2, head_dim=64, q_strides=[8, 8, 8],
                k_strides=[8, 8, 8], v_strides=[8, 8, 8], dtype="bf16", scale=1.0, causal=False)
    args.update(over)
    return args


def test_native_attention_fwd_rejects_bad_arguments_before_touching_the_device():
    """_C.attention_fwd validates everything before it queries the device (so this runs without a GPU)."""
    import pytest
    try:
        from cutegrad import _C
    except ImportError as exc:
        pytest.skip(f"cutegrad._C is not built: {exc}")
    if not hasattr(_C, "attention_fwd"):
        pytest.skip("cutegrad._C was built without the attention kernels")
    for over, msg in BAD_CALLS:
        with pytest.raises(ValueError, match=msg):
            _C.attention_fwd(**_attention_fwd_args(**over))
