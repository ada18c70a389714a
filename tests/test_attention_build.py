"""The built attention forward kernels, read without a GPU: every sm_90a
specialization is in the build and its SASS has the tensor-core MMA (HGMMA), the
TMA loads (UTMALDG), the exp2 of the softmax (MUFU.EX2), no local memory, every
TMA barrier arrival made by one elected thread, and (long kernels) the
tensor-core schedule: the two consumer warpgroups take turns on named barriers,
and each issues the next block's S = Q K^T with the last block's P V, then waits
for S alone and runs the softmax before it waits for P V."""
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


# named barriers: BAR.SYNC / BAR.ARV <id>[, <thread count>]
_BARRIER = re.compile(r"\bBAR\.(SYNC(?:\.DEFER_BLOCKING)?|ARV) (0x[0-9a-f]+)(?:, (0x[0-9a-f]+))?")
# S = Q K^T reads both operands from shared memory; O += P V reads P from registers
_QK_MMA = re.compile(r"HGMMA\.64x\d+x16\S* R\d+, gdesc")
_PV_MMA = re.compile(r"HGMMA\.64x\d+x16\S* R\d+, R\d+, gdesc")


@needs_build
@pytest.mark.parametrize("spec", attention_fwd.SPECS, ids=lambda s: s.name)
def test_attention_forward_schedule_sass(spec):
    listing = _cached_listings()[spec.name]
    barriers = [(kind.split(".")[0], int(bid, 16), int(count, 16) if count else None)
                for kind, bid, count in _BARRIER.findall(listing)]
    named = [b for b in barriers if b[1] != 0]
    if spec.short:
        # the short kernel's warpgroups serve different items (one may have none): no schedule
        assert not named, named
        assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" not in listing
        return
    # each warpgroup waits for its turn on its own barrier and hands the turn to the other's,
    # 2 x 128 threads per barrier; no other named barrier
    turns = set(attention_fwd.TURN_BARRIERS)
    assert {b[1] for b in named} == turns, named
    assert {(kind, bid) for kind, bid, _ in named} == {(k, t) for k in ("SYNC", "ARV") for t in turns}, named
    assert {count for _, _, count in named} == {256}, named
    # the loop: after the turn's BAR.SYNC, the next block's S (D / 16 MMAs) and the last block's
    # P V (BLOCK_N / 16) are issued back to back and the turn handed over before the wait for S
    # alone (at most one group, P V, still in flight) -- the softmax overlaps this P V
    loop = listing[re.search(r"BAR\.SYNC\S* 0x[1-9a-f]", listing).start():]
    loop = loop[:loop.index("WARPGROUP.DEPBAR.LE gsb0, 0x1")]
    assert len(_QK_MMA.findall(loop)) == spec.head_dim // 16, loop
    assert len(_PV_MMA.findall(loop)) == attention_fwd.BLOCK_N // 16, loop
    assert "BAR.ARV" in loop
    assert loop.index("BAR.ARV") > max(m.start() for m in _PV_MMA.finditer(loop))
    # and the softmax (an exp2 per score: BLOCK_N / 2 per thread) runs before the wait for P V;
    # ptxas hoists a wgmma wait to the top of its basic block, which would leave only the scaling here
    window = listing[listing.index("WARPGROUP.DEPBAR.LE gsb0, 0x1"):]
    window = window[:window.index("WARPGROUP.DEPBAR.LE gsb0, 0x0")]
    assert window.count("MUFU.EX2") >= attention_fwd.WG_ROWS * attention_fwd.BLOCK_N // 128, window.count("MUFU.EX2")


_CACHE = {}


def _cached_listings():
    if not _CACHE:
        _CACHE.update(_listings())
    return _CACHE
