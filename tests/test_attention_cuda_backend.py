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
