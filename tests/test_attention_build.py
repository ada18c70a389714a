"""The built attention forward kernels, read without a GPU: every sm_90a
specialization is in the build and its SASS has the tensor-core MMA (HGMMA), the
TMA loads (UTMALDG), the exp2 of the softmax (MUFU.EX2), no local memory, and
every TMA barrier arrival made by one elected thread."""
import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_build import MANIFEST, local_bytes, needs_build, sass_listings, unelected_tx_arrivals  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "cute"))
import attention_fwd  # noqa: E402


def _listings():
    manifest = json.load(open(MANIFEST))
    objects = sorted(o for o in manifest["objects"] if "attention_fwd_sm_90a_" in o)
    return {name[:-2]: listing for name, listing in sass_listings(objects)}


@needs_build
def test_every_attention_forward_specialization_is_built():
    built = {os.path.basename(o)[:-2] for o in json.load(open(MANIFEST))["objects"]}
    assert {s.name for s in attention_fwd.specializations(("sm_90a",))} <= built


@needs_build
@pytest.mark.parametrize("spec", attention_fwd.SPECS, ids=lambda s: s.name)
def test_attention_forward_sass(spec):
    listings = _cached_listings()
    listing = listings[spec.name]
    # fp16 inputs print no type suffix: HGMMA.64x128x16.F32 vs HGMMA.64x128x16.F32.BF16
    mma = set(re.findall(r"HGMMA\.64x(\d+)x16\.F32(\.BF16)?\b", listing))
    suffix = ".BF16" if spec.dtype == "bf16" else ""
    # S = Q K^T is 64 x BLOCK_N, O += P V is 64 x D
    assert mma == {(str(attention_fwd.BLOCK_N), suffix), (str(spec.head_dim), suffix)}, mma
    assert "UTMALDG" in listing
    assert "MUFU.EX2" in listing
    # dropout kernels carry Philox: 10 rounds of 32x32-bit multiplies for each of a thread's
    # 64 scores of a block (two per round, often fused into one IMAD.WIDE.U32); the others none
    philox = len(re.findall(r"IMAD\.(?:HI\.U32|WIDE\.U32)", listing))
    assert (philox >= 10 * 64) if spec.dropout else (philox < 64), philox
    assert not re.search(r"\b(STL|LDL)\b", listing), "local memory spills"
    usage = local_bytes(listing)
    assert usage and max(usage) == 0, f"local memory {usage}"
    assert not unelected_tx_arrivals(listing), unelected_tx_arrivals(listing)


_CACHE = {}


def _cached_listings():
    if not _CACHE:
        _CACHE.update(_listings())
    return _CACHE
