"""The register layouts the fused attention backward relies on, checked value for
value for every thread by tracing (no GPU): the kernel's own helpers from
kernels/cute/attention_bwd.py, evaluated with static thread indices, so each
coordinate below is a compile-time constant.

* The S^T accumulator (keys x queries), rounded to 16 bits and viewed with
  `acc_as_operand_a`, is exactly the register A operand of the dV / dK wgmma
  (M = keys, K = queries): every register holds the element the wgmma expects.
* `ds_store_source` hands the transposing stmatrix copy of dS each register
  at the (key, query) the copy's source layout assigns to it.
* The two warpgroups own keys [0, 64) and [64, 128) of S^T and of dK/dV, and
  the dQ product splits D between them.
Needs the CUTLASS DSL (a build requirement); skipped without it.
"""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cutlass = pytest.importorskip("cutlass")
cute = pytest.importorskip("cutlass.cute")


def _kernel_module():
    spec = importlib.util.spec_from_file_location("cutegrad_kernel_attention_bwd_layouts",
                                                  os.path.join(ROOT, "kernels", "cute", "attention_bwd.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


K = _kernel_module()
THREADS = 256  # the two compute warpgroups
# unrolling 256 threads at trace time is the point here, not a slow kernel
pytestmark = pytest.mark.filterwarnings("ignore::cutlass.base_dsl.ast_helpers.DSLOptimizationWarning")


def _run(check):
    """Trace `check` (a @cute.jit function appending mismatches to a list) and return the list."""
    found = []
    check(found)
    return found


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_softmax_registers_are_the_dv_dk_wgmma_a_operand(head_dim):
    @cute.jit
    def check(bad: cutlass.Constexpr):
        sdp, dkv, _ = K.tiled_mmas(cutlass.BFloat16, head_dim)
        ident = cute.make_identity_tensor((K.BLOCK_N, K.BLOCK_M))   # (keys, queries)
        for t in cutlass.range_constexpr(THREADS):
            acc = sdp.get_slice(t).partition_C(ident)
            view = K.acc_as_operand_a(cute.make_layout(acc.shape))   # registers as make_rmem_tensor lays them out
            a = dkv.get_slice(t).partition_A(ident)
            assert cute.size(a) == cute.size(acc) == 32
            for j in cutlass.range_constexpr(cute.size(a)):
                if cutlass.const_expr(str(a[j]) != str(acc[view(cute.idx2crd(j, a.shape))])):
                    bad.append((t, j))

    assert _run(check) == []


def test_ds_store_source_matches_the_stmatrix_copy():
    @cute.jit
    def check(bad: cutlass.Constexpr):
        sdp, _, _ = K.tiled_mmas(cutlass.BFloat16, 64)
        copy = K.ds_store_copy(cutlass.BFloat16, sdp)
        ident = cute.make_identity_tensor((K.BLOCK_N, K.BLOCK_M))
        for t in cutlass.range_constexpr(THREADS):
            acc = sdp.get_slice(t).partition_C(ident)
            regs = cute.make_tensor(acc.iterator, cute.make_layout(acc.shape))  # register offsets = flat index
            src = copy.get_slice(t).partition_S(ident)
            dst = copy.get_slice(t).partition_D(ident)
            view = K.ds_store_source(regs, dst)
            assert cute.size(view) == cute.size(src) == 32
            for rep in cutlass.range_constexpr(cute.size(dst, mode=[2])):
                for v in cutlass.range_constexpr(cute.size(dst, mode=[0])):
                    flat = cute.crd2idx(((v, 0), 0, rep), view.layout)
                    if cutlass.const_expr(str(acc[flat]) != str(src[(v, 0), 0, rep])):
                        bad.append((t, v, rep))

    assert _run(check) == []


@pytest.mark.parametrize("head_dim", [32, 128])
def test_warpgroups_split_keys_and_dq_columns(head_dim):
    @cute.jit
    def check(bad: cutlass.Constexpr):
        sdp, dkv, dq = K.tiled_mmas(cutlass.BFloat16, head_dim)
        for t in cutlass.range_constexpr(THREADS):
            wg = t // 128
            s = sdp.get_slice(t).partition_C(cute.make_identity_tensor((K.BLOCK_N, K.BLOCK_M)))
            kv = dkv.get_slice(t).partition_C(cute.make_identity_tensor((K.BLOCK_N, head_dim)))
            q = dq.get_slice(t).partition_C(cute.make_identity_tensor((K.BLOCK_M, head_dim)))
            for i in cutlass.range_constexpr(cute.size(s)):
                if cutlass.const_expr(s[i][0] // 64 != wg):
                    bad.append(("S^T key", t, i))
            for i in cutlass.range_constexpr(cute.size(kv)):
                if cutlass.const_expr(kv[i][0] // 64 != wg):
                    bad.append(("dK/dV key", t, i))
            for i in cutlass.range_constexpr(cute.size(q)):
                if cutlass.const_expr(q[i][1] // (head_dim // 2) != wg):
                    bad.append(("dQ column", t, i))

    assert _run(check) == []
