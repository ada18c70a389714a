"""Kernel launches per training step of each reference workload, counted on the
dry-run CUDA device (bench/launches.py), must stay within the committed budget
(bench/launch_budget.json): a change that adds launches to a step fails here.
Lower the budget when a change removes launches.  The step is the training
loop's: bf16 autocast, fused AdamW (SGD for reverse), gradient clipping."""
import json
import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # bench/ is a package at the repository root
    sys.path.insert(0, _ROOT)

from bench import launches  # noqa: E402

with open(os.path.join(os.path.dirname(launches.__file__), "launch_budget.json")) as _f:
    BUDGET = json.load(_f)


@pytest.mark.parametrize("workload", launches.WORKLOADS)
def test_launches_per_step_within_budget(workload):
    from cutegrad.models import PRESETS
    row = launches.workload_row(workload, PRESETS[workload])
    budget = BUDGET[workload]
    assert row["forward"] + row["backward"] + row["optimizer"] == row["total"] == sum(row["by_kernel"].values())
    assert row["total"] <= budget["per_step"], (
        f"{workload}: {row['total']} launches per step, budget {budget['per_step']}: {row['by_kernel']}")
    assert row["per_block_fwd_bwd"] <= budget["per_block_fwd_bwd"], (
        f"{workload}: {row['per_block_fwd_bwd']} launches per transformer block (fwd+bwd), "
        f"budget {budget['per_block_fwd_bwd']}")


def test_counting_rules_cover_multi_kernel_entries():
    # 100 parameters: three groups of 48, each an increment launch and an update launch
    assert launches.LAUNCHES_PER_CALL["adamw"]([None, [0] * 100] + [None] * 14 + [True]) == 6
    assert launches.LAUNCHES_PER_CALL["grad_norm"]([[0] * 49]) == 3
    # the embedding backward: the one-block sort and the run sums; longer: chunks, 5 merge passes, unpack
    assert launches.LAUNCHES_PER_CALL["index_add_rows"]([0, 0, 0, 0, 8192, 50304]) == 2
    assert launches.LAUNCHES_PER_CALL["index_add_rows"]([0, 0, 0, 0, 70001, 50304]) == 8
    short_k = (0, (1, 64, 64), (), 0, (1, 64, 64)) + (0,) * 12 + (0, 0, 0)
    calls = [("gemm", short_k, {}), ("load_kernels", (), {}), ("elementwise", (5,), {})]
    assert launches.count(calls, [("cuMemsetD32Async", ())]) == {"gemm": 1, "elementwise:copy": 1,
                                                                 "driver:cuMemsetD32Async": 1}
    assert launches.LAUNCHES_PER_CALL["attention_backward"](()) == 3


def test_a_gemm_counts_the_split_k_kernels_its_plan_launches():
    from cutegrad import _C
    gemm = launches.LAUNCHES_PER_CALL["gemm"]

    def call(m, n, k, batch=1, path=0, split_k=0):
        return (0, (batch, m, k), (), 0, (batch, k, n)) + (0,) * 12 + (path, 0, split_k)

    assert gemm(call(4096, 768, 768)) == 1  # K too short to split
    assert gemm(call(768, 768, 8192, split_k=4)) == 2  # slices + the fixed-order reduction
    assert gemm(call(768, 768, 8192, path=2)) == 1  # SIMT never splits
    assert gemm(call(768, 768, 8192, batch=2)) == 1
    dp_rows, dp_cols, splits = _C.gemm_split_plan(768, 3072, 8192, 1, launches.H200_SMS, 8)
    assert gemm(call(768, 3072, 8192)) == (1 if splits == 1 else 2 + bool(dp_rows or dp_cols))
