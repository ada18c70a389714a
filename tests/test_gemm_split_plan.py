"""The split-K planner of _C.gemm (plan_split in kernels/cuda/module.cpp, a pure function exposed as
_C.gemm_split_plan) and a NumPy model of the schedule it produces, without a GPU.

A plan (dp_rows, dp_cols, splits) means: with splits == 1 one unsplit GEMM; otherwise the first
dp_rows rows (or dp_cols columns) of D run as one unsplit GEMM and the rest as `splits` equal
K-slices whose fp32 partial products are summed in slice order 0..S-1 by one reduction kernel,
which then applies the epilogue.  The model below follows that order in float32 and is checked
against float64; the GPU test in tests/test_gemm.py checks the kernels against the same rules."""
import numpy as np
import pytest

from bench.gemm import workload_linears

H200_SMS = 132


@pytest.fixture(scope="module")
def plan():
    try:
        from cutegrad import _C
    except ImportError as exc:  # the extension is built by CI before the tests
        pytest.skip(f"cutegrad._C not built: {exc}")
    return _C.gemm_split_plan


# Each reference workload's weight gradient (M = out_features, N = in_features, K = tokens; both
# operands MN-major, so any slice length keeps the TMA batch stride aligned: k_align 1) on 132 SMs.
# Why, in 128x128 output tiles:
WGRAD_PLANS = {
    # 1-4 tiles, K = 4096: as many slices as keep a slice >= 128 long and the partials cheap
    "reverse.qkv": (0, 0, 16), "reverse.proj": (0, 0, 32), "reverse.fc1": (0, 0, 16), "reverse.fc2": (0, 0, 16),
    "reverse.head": (0, 0, 32),
    # K = 20480: 4 tiles take 32 slices (<= 128 work units); 12 tiles x 10 = 120 units (11 does
    # not divide K); 16 tiles x 8 = 128 units: each one wave.  The patch embedding (K = 16384
    # patches, 2 tiles) takes 32 slices too; the head (K = 256 pooled rows) is too short to split
    "vit.patch": (0, 0, 32), "vit.qkv": (0, 0, 10), "vit.proj": (0, 0, 32), "vit.fc1": (0, 0, 8),
    "vit.fc2": (0, 0, 8), "vit.head": (0, 0, 1),
    # K = 8192: 12-16 tiles x 8 and 4 tiles x 16 fill one wave; 64 tiles x 2 = 128 units
    "minigpt.qkv": (0, 0, 8), "minigpt.proj": (0, 0, 16), "minigpt.fc1": (0, 0, 8), "minigpt.fc2": (0, 0, 8),
    "minigpt.head": (0, 0, 2),
    # 108 tiles (0.82 wave) and 2358 tiles (17.9 waves): splitting gains too little
    "gpt2-small.qkv": (0, 0, 1), "gpt2-small.head": (0, 0, 1),
    # 36 tiles: 2 slices (72 units, one wave of K/2) beat 4 (144 units: two waves of K/4 plus
    # twice the partials); 3 would fit better but does not divide K = 8192
    "gpt2-small.proj": (0, 0, 2),
    # 144 tiles = 1.09 waves: 22 tile rows (fc1) / 22 tile columns (fc2) = 132 tiles unsplit,
    # the other 12 tiles in 8 slices (96 units, one short wave): 1 + 1/8 waves of K instead of 2
    "gpt2-small.fc1": (2816, 0, 8), "gpt2-small.fc2": (0, 2816, 8),
}


def wgrad_shapes():
    for wl, lin, rows, fin, fout in workload_linears():
        yield f"{wl}.{lin}", fout, fin, rows


def test_every_reference_weight_gradient_has_its_plan(plan):
    got = {name: plan(m, n, k, 1, H200_SMS, 1) for name, m, n, k in wgrad_shapes()}
    assert got == WGRAD_PLANS


def check_plan(p, m, n, k, batch, sms, k_align):
    dp_rows, dp_cols, s = p
    assert s >= 1 and dp_rows >= 0 and dp_cols >= 0
    if s == 1:
        assert dp_rows == dp_cols == 0, "an unsplit plan has no data-parallel part"
        return
    assert batch == 1 and k % s == 0 and k // s >= 128 and (k // s) % max(k_align, 1) == 0, p
    assert not (dp_rows and dp_cols), "the hybrid cuts along one dimension"
    tiles_m, tiles_n = -(-m // 128), -(-n // 128)
    if dp_rows:
        assert dp_rows % 128 == 0 and dp_rows < m
        assert (dp_rows // 128) * tiles_n <= (tiles_m * tiles_n // sms) * sms, "DP part within whole waves"
    if dp_cols:
        assert dp_cols % 128 == 0 and dp_cols < n
        assert (dp_cols // 128) * tiles_m <= (tiles_m * tiles_n // sms) * sms, "DP part within whole waves"


def test_plans_obey_the_launch_rules_on_random_shapes(plan):
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        m, n = (int(x) for x in rng.integers(1, 6000, 2))
        k = int(rng.choice([int(rng.integers(1, 70000)), 64 * int(rng.integers(1, 700))]))
        batch = int(rng.choice([1, 1, 1, 3]))
        sms, k_align = int(rng.choice([8, 78, 114, 132])), int(rng.choice([0, 1, 4, 8]))
        p = plan(m, n, k, batch, sms, k_align)
        check_plan(p, m, n, k, batch, sms, k_align)
        seen.add(("split" if p[2] > 1 else "unsplit") + ("-rows" if p[0] else "-cols" if p[1] else ""))
    assert {"unsplit", "split", "split-rows", "split-cols"} <= seen, seen


def test_no_split_for_short_k_batches_or_full_outputs(plan):
    assert plan(128, 128, 255, 1, 132, 1) == (0, 0, 1)
    assert plan(128, 128, 8192, 2, 132, 1) == (0, 0, 1)
    assert plan(8192, 8192, 8192, 1, 132, 8) == (0, 0, 1)  # 4096 tiles: 31 full waves
    assert plan(256, 256, 8191, 1, 132, 1)[2] in (1, 8191)  # a prime K has no equal slices


def test_slice_length_follows_k_align(plan):
    # K = 20480 with 12 tiles: 10 slices of 2048; K = 1000 * 8 with an 8-element alignment
    assert plan(768, 256, 20480, 1, 132, 8) == (0, 0, 10)
    _, _, s = plan(128, 128, 8000, 1, 132, 64)
    assert (8000 // s) % 64 == 0


# ---- the schedule, in NumPy ----------------------------------------------------------------

def split_gemm_model(a, b, p, bias=None):
    """D = A @ B (+ bias) computed the way _C.gemm schedules plan p: float32 partial products,
    summed in slice order, the epilogue after the sum.  Returns (D, list of the pieces computed:
    (row range, column range, K range))."""
    m, k = a.shape
    n = b.shape[1]
    dp_rows, dp_cols, s = p
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    d = np.full((m, n), np.nan, dtype=np.float32)
    pieces = []
    rows, cols = slice(0, m), slice(0, n)
    if s == 1:
        d[:] = a32 @ b32
        pieces.append((rows, cols, slice(0, k)))
    else:
        if dp_rows:
            d[:dp_rows] = a32[:dp_rows] @ b32
            pieces.append((slice(0, dp_rows), cols, slice(0, k)))
            rows = slice(dp_rows, m)
        if dp_cols:
            d[:, :dp_cols] = a32 @ b32[:, :dp_cols]
            pieces.append((rows, slice(0, dp_cols), slice(0, k)))
            cols = slice(dp_cols, n)
        chunk = k // s
        partials = []
        for i in range(s):
            ks = slice(i * chunk, (i + 1) * chunk)
            partials.append(a32[rows, ks] @ b32[ks, cols])
            pieces.append((rows, cols, ks))
        acc = partials[0].copy()
        for part in partials[1:]:
            acc += part  # float32 adds in slice order: the reduction kernel's order
        d[rows, cols] = acc
    if bias is not None:
        d += bias.astype(np.float32)
    return d, pieces


# (m, n, k, plan, SM count the plan is valid for): each kind of plan, at sizes NumPy runs quickly.
# (The planner picks hybrids only where the partials of a full split would cost more than an extra
# launch, i.e. outputs of millions of elements: too large for a quick float64 check.)
MODEL_CASES = [
    (300, 260, 2048, (0, 0, 1), 4), (200, 136, 1024, (0, 0, 8), 4), (96, 40, 12800, (0, 0, 32), 132),
    (300, 260, 2048, (256, 0, 4), 4), (260, 300, 2048, (0, 256, 8), 4), (1030, 130, 4096, (896, 0, 2), 4),
]


@pytest.mark.parametrize("m,n,k,p,sms", MODEL_CASES, ids=str)
def test_model_of_the_schedule_matches_float64(m, n, k, p, sms):
    check_plan(p, m, n, k, 1, sms, 1)
    rng = np.random.default_rng(m * n + k)
    a, b, bias = rng.standard_normal((m, k)), rng.standard_normal((k, n)), rng.standard_normal(n)
    d, pieces = split_gemm_model(a, b, p, bias)
    want = a @ b + bias
    assert not np.isnan(d).any(), f"plan {p} left outputs unwritten"
    err = np.abs(d - want).max() / np.abs(want).max()
    assert err < 1e-5, (p, err)
    # every output element gets each K index exactly once
    cover = np.zeros((m, n), dtype=np.int64)
    for rows, cols, ks in pieces:
        cover[rows, cols] += ks.stop - ks.start
    assert (cover == k).all(), p
    # the order is fixed: the same plan gives the same bits
    again, _ = split_gemm_model(a, b, p, bias)
    assert np.array_equal(d.view(np.uint32), again.view(np.uint32))
