"""The built CuTeDSL norms, read without a GPU: every sm_90a specialization is in
the extension's table, reads and writes its rows with 16-byte vector accesses
and uses no local memory arrays, and its stack frame (where ptxas spills) stays
within a few values: the row and the running sums stay in registers, not spilled;
the residual dropout's Philox code is in exactly the specializations that take it."""

import json
import os
import re

import pytest

from norms_loading import load_norms_module  # noqa: E402

norm_family = load_norms_module("cute")

from test_build import MANIFEST, local_bytes, needs_build, sass_listings  # noqa: E402

# Bytes of stack a norm kernel may use: ptxas spills a few scalars (a pointer, a loop
# bound) in the longest rows' backward; a spilled row vector or running sum would take
# KiBs (n = 2048's backward took 2.4 KiB before it read s and dy again instead).
STACK_BUDGET = 256


def test_row_tiling_covers_each_row_once_with_16_byte_vectors():
    for n in norm_family.ROW_LENGTHS:
        for dtypes in (("bf16", "fp32"), ("fp32",), ("bf16",)):
            vec, tpr, vpt, slots = norm_family.row_tiling(n, dtypes)
            narrow = min(16 if d == "bf16" else 32 for d in dtypes)
            assert vec * narrow == 128 and vec * tpr * vpt == n and tpr * slots == norm_family.THREADS
            assert tpr & (tpr - 1) == 0 and tpr <= 32
            cols = sorted((v * tpr + lane) * vec + e for lane in range(tpr) for v in range(vpt) for e in range(vec))
            assert cols == list(range(n))
    with pytest.raises(ValueError, match="not a multiple"):
        norm_family.row_tiling(100, ("bf16",))


def test_specialization_names_are_unique_c_identifiers():
    names = [s.name for s in norm_family.SPECS]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names)
    assert not norm_family.specializations(("sm_100a",))


@needs_build
def test_every_norm_specialization_is_built_vectorized_and_spill_free():
    manifest = json.load(open(MANIFEST))
    objects = [o for o in manifest["objects"] if os.path.basename(o).startswith("norm_sm_90a_")]
    assert len(objects) == len(norm_family.SPECS)
    from cutegrad import _C
    assert {d["name"] for d in _C.cute_norm_specializations()} == {s.name for s in norm_family.SPECS}
    dropout_specs = {s.name: s.dropout for s in norm_family.SPECS}
    for name, listing in sass_listings(objects):
        usage = local_bytes(listing)
        assert usage and max(usage) == 0, f"{name}: local memory {usage}"
        stack = [int(x) for x in re.findall(r"STACK:(\d+)", listing)]
        assert stack and max(stack) <= STACK_BUDGET, f"{name}: stack frame {stack} bytes"
        if "_finish_" not in name:
            assert "LDG.E.128" in listing and "STG.E.128" in listing, f"{name}: no 16-byte row accesses"
        # the residual dropout's Philox rounds (multiplier 0xD2511F53) exactly where the spec takes dropout
        philox = "0xd2511f53" in listing.lower()
        assert philox == dropout_specs[name.removesuffix(".o")], f"{name}: Philox code present: {philox}"

