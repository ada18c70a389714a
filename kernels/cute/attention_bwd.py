"""Hopper (sm_90a) fused attention backward written in CuTeDSL, compiled ahead of time.

Given q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) (any strides on B, S, H, unit
stride on D; Hq a multiple of Hkv), the forward's output O and row log-sum-exp
(natural log, B, Hq, Sq) and the output gradient dO, it computes

    dV = P^T dO,  dS = P * (dP - rowsum(dO * O)),  dP = dO V^T,
    dK = scale * dS^T Q,  dQ = scale * dS K,   P = exp(scale * Q K^T - lse)

with P = 0 where top-left causality hides key j from query i (j > i).  The
algorithm, block for block, is kernels/reference/attention_backward.py (the
NumPy model CI proves against float64 gradients).

Three launches (cutegrad._C's attention_backward runs them in order on one stream)
-----------------------------------------------------------------------------
1. preprocess (CUDA C++, kernels/cuda/attention_bwd.cu): delta = rowsum(dO*O)
   and lse2 = lse * log2(e) in fp32 workspaces padded to a multiple of
   BLOCK_M rows (padding: delta = 0, lse2 = +inf, so a padded query row gets
   P = exp2(-inf) = 0 with no mask); zeroes the fp32 dQ accumulator.
2. main (this file), one CTA per (key block of BLOCK_N = 128 keys, kv head,
   batch); see Design.
3. postprocess (CUDA C++): dQ = scale * accumulator (or the key-block-ordered
   sum of the deterministic partials), rounded once to the input dtype.
   The two memory-bound steps are plain CUDA C++ so they need no per-dtype,
   per-head-dim specializations here.

Design of the main kernel
-------------------------
* 384 threads: warpgroup 0 is the producer (its first warp issues TMA;
  setmaxnreg 24), warpgroups 1 and 2 compute (setmaxnreg 240), each owning 64
  of the block's 128 keys.
* The K and V tiles of the block are loaded once (TMA, one mbarrier).  The
  CTA then walks every q head of its kv head's group (GQA: dK and dV sum
  over the group in registers, no extra pass) and, per head, the query blocks
  of BLOCK_M = 64 rows from the first one causality lets see the key block.
  Q and dO tiles of a query block arrive through a 2-stage TMA + mbarrier
  ring (PipelineTmaAsync), so the next block loads while this one computes.
* Per query block, with S^T (keys x queries) so that P^T and dS^T come out of
  the accumulator in the layout the dV/dK products want as their A operand:
    S^T  = K Q^T, dP^T = V dO^T           (wgmma, A and B from shared memory)
    P^T  = exp2(S^T * scale*log2e - lse2[q]), -inf first where causal hides
           the key (only on blocks the diagonal crosses)
    dS^T = P^T * (dP^T - delta[q])
    dV  += P^T dO, dK += dS^T Q           (wgmma with A from registers: P and
                                           dS rounded to the input dtype)
    dQ   = dS K                           (dS^T stored to shared memory as dS;
                                           the two warpgroups split D)
  dQ goes to the fp32 accumulator with red.global.add (atomics: key blocks
  of one query block land in any order), or in deterministic mode is stored
  as this key block's partial, which the postprocess sums in key-block
  order.  Per-row lse2/delta are read from the padded workspaces (L1-cached).
* Epilogue: dK *= scale, both rounded once and stored from registers with the
  key rows past Sk dropped.  A key block that no query sees (causal with
  Sk > Sq) stores zeros.
* TMA zero-fills rows past Sq and Sk: a padded key row adds 0 to dQ (its K
  row is 0) and its dK/dV rows are never stored; a padded query row has
  P = 0 through lse2 = +inf.

Constraints (checked in C++ before launch)
------------------------------------------
head_dim in HEAD_DIMS, q/k/v/dO bf16 or fp16 (one dtype), unit stride on D,
16-byte aligned base pointers and every other stride a multiple of 8
elements; Sq, Sk >= 1.  Causality and the deterministic mode are runtime
arguments, so they add no specializations.

Dropout ("_dropout" specializations): before issuing a block's products each
thread draws the keep bits of its 32 elements with the forward's mapping
(element (b, h, i, j) of the (B, Hq, Sq, Sk) probabilities, linear index v, is
kept iff word v % 4 of Philox4x32-10(seed, offset / 4 + v / 4), as 24-bit
uniform, is below float32(1 - p)); dV takes P * keep (its 1 / (1 - p) in the
epilogue) and dS = P * (dP * keep / (1 - p) - delta).  The preprocess resolves
the forward's (seed, offset) -- read from device memory under graph capture --
into a 16-byte workspace the kernel reads.  A compile-time flag, so the kernels
without dropout carry none of its registers.

Not in this kernel yet: shared-memory staging of lse2/delta; a TMA store
epilogue for dK/dV; dQ through shared memory and TMA reduce-add instead of
per-element atomics; a 128-row query tile for head dim 64 (FA3's choice);
overlap of the softmax with the next block's products.

Specializations
---------------
``SPECS``: for bf16 and fp16, head dims 32, 64 and 128, without and with
dropout: twelve kernels, all sm_90a (wgmma does not exist elsewhere).  Each
spec's ``name`` is the C symbol prefix the build exports.
"""

import math
from dataclasses import dataclass

BLOCK_M = 64   # query rows per main-loop step
BLOCK_N = 128  # keys per CTA (64 per compute warpgroup)
HEAD_DIMS = (32, 64, 128)
Q_STAGES = 2
LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class AttentionBwdSpec:
    """One AOT specialization of the main backward kernel."""

    dtype: str  # "bf16" | "fp16"
    head_dim: int
    dropout: bool  # regenerates the forward's dropout mask (Philox) in the main loop
    arch: str = "sm_90a"

    @property
    def name(self) -> str:
        return f"attention_bwd_{self.arch}_{self.dtype}_d{self.head_dim}{'_dropout' if self.dropout else ''}"


def specializations(archs=("sm_90a",)):
    return [AttentionBwdSpec(dtype, d, dropout, arch)
            for arch in archs if arch == "sm_90a"
            for dtype in ("bf16", "fp16") for d in HEAD_DIMS for dropout in (False, True)]


SPECS = specializations()


# Layout helpers the kernel is built from.  Module level so that
# tests/test_attention_backward_layouts.py checks the very functions the kernel
# uses (value for value, every thread) without a GPU.  Called while tracing.
def tiled_mmas(dtype, head_dim):
    """(S^T / dP^T, dV / dK, dQ) tiled MMAs for 2 compute warpgroups.

    S^T = K Q^T: M = 128 keys (64 per warpgroup), N = BLOCK_M queries, both
    operands K-major.  dV = P^T dO, dK = dS^T Q: M = keys, N = D, A from
    registers, B MN-major (Q and dO are stored D-contiguous).  dQ = dS K:
    M = queries, N = D split over the warpgroups, B MN-major."""
    import cutlass
    import cutlass.cute as cute
    import cutlass.utils.hopper_helpers as sm90
    from cutlass.cute.nvgpu import warpgroup

    k_major, mn_major, f32 = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN, cutlass.Float32
    sdp = sm90.make_trivial_tiled_mma(dtype, dtype, k_major, k_major, f32, (2, 1, 1), tiler_mn=(64, BLOCK_M))
    dkv = sm90.make_trivial_tiled_mma(dtype, dtype, k_major, mn_major, f32, (2, 1, 1), tiler_mn=(64, head_dim),
                                      a_source=warpgroup.OperandSource.RMEM)
    dq = sm90.make_trivial_tiled_mma(dtype, dtype, k_major, mn_major, f32, (1, 2, 1), tiler_mn=(64, head_dim // 2))
    return sdp, dkv, dq


def acc_as_operand_a(acc_layout):
    """View an accumulator's registers ((2, 2, N/8), M, 1) as the register A operand
    of the next wgmma, ((2, 2, 2), M, (N/16, 1)): 16 accumulator columns (two
    groups of 8) make one k slice of 16; no data moves."""
    import cutlass.cute as cute

    split = cute.logical_divide(acc_layout, ((None, None, 2), None, None))
    return cute.make_layout(
        ((split.shape[0][0], split.shape[0][1], split.shape[0][2][0]), split.shape[1],
         (split.shape[0][2][1], split.shape[2])),
        stride=((split.stride[0][0], split.stride[0][1], split.stride[0][2][0]), split.stride[1],
                (split.stride[0][2][1], split.stride[2])),
    )


def ds_store_copy(dtype, mma_sdp):
    """Transposing stmatrix copy of the S^T accumulator tile into the (keys, queries)
    view of sdS, whose keys are contiguous."""
    import cutlass.cute as cute

    atom = cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(True, 4), dtype)
    return cute.make_tiled_copy_S(atom, cute.make_tiled_copy_C_atom(atom, mma_sdp))


def ds_store_source(regs, dst_partition):
    """The accumulator-ordered registers as the copy's source, shaped like its
    destination partition ((atom, 1), 1, reps): value v of repeat r is register
    v + atom * r (the copy's source layout in that order)."""
    import cutlass.cute as cute

    reps = cute.size(dst_partition, mode=[2])
    atom = cute.size(dst_partition, mode=[0])
    return cute.make_tensor(regs.iterator, cute.make_layout(((atom, 1), 1, reps), stride=((1, 0), 0, atom)))


def transposed(t):
    """The same shared-memory tensor with its first two modes swapped."""
    import cutlass.cute as cute

    shape = (t.shape[1], t.shape[0], *t.shape[2:])
    order = (1, 0, *range(2, cute.rank(t)))
    return cute.composition(t, cute.make_ordered_layout(shape, order=order))


def build_kernel(spec: AttentionBwdSpec):
    """Return (jit_function, fake_args) for cute.compile (imports the DSL lazily)."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    import cutlass.pipeline as pipeline
    import cutlass.utils as utils
    import cutlass.utils.hopper_helpers as sm90
    from cutlass.cute.nvgpu import cpasync, warpgroup
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor
    from philox import KEY_STEPS, MULTIPLIERS

    dtype = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16}[spec.dtype]
    f32 = cutlass.Float32
    D = spec.head_dim
    use_dropout = spec.dropout
    BM, BN = BLOCK_M, BLOCK_N
    wg_threads = 128
    mma_threads = 2 * wg_threads
    threads = wg_threads + mma_threads
    producer_regs, mma_regs = 24, 240

    def smem_layout(rows, cols, stages, major_size):
        """Row-major (cols contiguous) wgmma-compatible layout; the swizzle is chosen
        by major_size, the narrowest extent the contiguous axis is read with."""
        kind = sm90.get_smem_layout_atom(utils.LayoutEnum.ROW_MAJOR, dtype, major_size)
        atom = warpgroup.make_smem_layout_atom(kind, dtype)
        shape = (rows, cols) if stages is None else (rows, cols, stages)
        order = (0, 1) if stages is None else (0, 1, 2)
        return cute.tile_to_shape(atom, shape, order=order)

    @cute.jit
    def philox_word(key_lo: cutlass.Uint32, key_hi: cutlass.Uint32, counter: cutlass.Int64,
                    lane: cutlass.Int64) -> cutlass.Uint32:
        """Word `lane` (0..3) of Philox4x32-10 with key (key_lo, key_hi) and 128-bit
        counter (counter, 0): the generator of kernels/cuda/philox.h, with kernels/cute/philox.py's
        constants.  The rounds stay a loop (not philox.py's unrolled ones): small code, and dropout
        is not the fast path."""
        w0 = cutlass.Uint32(counter)
        w1 = cutlass.Uint32(counter >> 32)
        w2 = cutlass.Uint32(0)
        w3 = cutlass.Uint32(0)
        k0 = key_lo
        k1 = key_hi
        for _ in cutlass.range(10, unroll=1):
            a_hi = cute.arch.mul_hi(w0, cutlass.Uint32(MULTIPLIERS[0]))
            a_lo = w0 * cutlass.Uint32(MULTIPLIERS[0])
            b_hi = cute.arch.mul_hi(w2, cutlass.Uint32(MULTIPLIERS[1]))
            b_lo = w2 * cutlass.Uint32(MULTIPLIERS[1])
            w0 = b_hi ^ w1 ^ k0
            w1 = b_lo
            w2 = a_hi ^ w3 ^ k1
            w3 = a_lo
            k0 = k0 + cutlass.Uint32(KEY_STEPS[0])
            k1 = k1 + cutlass.Uint32(KEY_STEPS[1])
        odd = (lane & 1) != 0
        even_pair = cutlass.select_(odd, w1, w0)
        odd_pair = cutlass.select_(odd, w3, w2)
        return cutlass.Uint32(cutlass.select_((lane & 2) != 0, odd_pair, even_pair))

    def mma_batch(tiled_mma, acc, frag_a, frag_b, zero_init):
        """acc (+)= A B over the k slices of this warpgroup's fragments.  zero_init
        overwrites acc with the first slice (no zero fill, no register for 0.0); a
        fresh atom per batch, as its ACCUMULATE field changes inside the loop."""
        atom = cute.make_mma_atom(tiled_mma.op)
        atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
        for ks in range(cute.size(frag_a, mode=[2])):  # a plain helper: unrolled while tracing
            cute.gemm(atom, acc, frag_a[None, None, ks], frag_b[None, None, ks], acc)
            atom.set(warpgroup.Field.ACCUMULATE, True)

    @cute.kernel
    def kernel(
        tma_q: cute.CopyAtom, gQ_tma: cute.Tensor,
        tma_do: cute.CopyAtom, gdO_tma: cute.Tensor,
        tma_k: cute.CopyAtom, gK_tma: cute.Tensor,
        tma_v: cute.CopyAtom, gV_tma: cute.Tensor,
        mLse2: cute.Tensor, mDelta: cute.Tensor, mdQacc: cute.Tensor,
        mdK: cute.Tensor, mdV: cute.Tensor, mRng: cute.Tensor,
        mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma, mma_dq: cute.TiledMma,
        sq_layout: cute.ComposedLayout, sk_layout: cute.ComposedLayout, sv_layout: cute.ComposedLayout,
        sds_layout: cute.ComposedLayout,
        scale: cutlass.Float32, scale_log2: cutlass.Float32,
        is_causal: cutlass.Int32, deterministic: cutlass.Int32,
        keep_prob: cutlass.Float32, keep_scale: cutlass.Float32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        n_block, kv_head, batch = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // wg_threads)

        if warp == 0:
            cpasync.prefetch_descriptor(tma_q)
            cpasync.prefetch_descriptor(tma_do)
            cpasync.prefetch_descriptor(tma_k)
            cpasync.prefetch_descriptor(tma_v)

        @cute.struct
        class Storage:
            qdo_barriers: cute.struct.MemRange[cutlass.Int64, Q_STAGES * 2]
            kv_barriers: cute.struct.MemRange[cutlass.Int64, 2]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sq_layout)], 1024]
            sdO: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sq_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sk_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sv_layout)], 1024]
            sdS: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sds_layout)], 1024]

        storage = utils.SmemAllocator().allocate(Storage)
        sQ = storage.sQ.get_tensor(sq_layout.outer, swizzle=sq_layout.inner)
        sdO = storage.sdO.get_tensor(sq_layout.outer, swizzle=sq_layout.inner)
        sK = storage.sK.get_tensor(sk_layout.outer, swizzle=sk_layout.inner)
        sV = storage.sV.get_tensor(sv_layout.outer, swizzle=sv_layout.inner)
        sdS = storage.sdS.get_tensor(sds_layout.outer, swizzle=sds_layout.inner)

        q_tile_bytes = cute.size_in_bytes(dtype, cute.slice_(sq_layout, (None, None, 0)))
        kv_tile_bytes = cute.size_in_bytes(dtype, sk_layout)
        # One arrival per compute warp frees a stage.
        qdo_pipe = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.qdo_barriers.data_ptr(),
            num_stages=Q_STAGES,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, mma_threads // 32),
            tx_count=2 * q_tile_bytes,
            cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
        )
        kv_pipe = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.kv_barriers.data_ptr(),
            num_stages=1,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, mma_threads // 32),
            tx_count=2 * kv_tile_bytes,
            cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
        )

        seqlen_q = gQ_tma.shape[0]
        seqlen_k = mdK.shape[0]
        q_heads = gQ_tma.shape[2]
        group = q_heads // gK_tma.shape[2]
        m_blocks = (seqlen_q + BM - 1) // BM
        n_base = n_block * BN
        m_first = cutlass.Int32(0)
        if is_causal != 0:
            m_first = n_base // BM

        cute.arch.sync_threads()

        if wg == 0:
            cute.arch.setmaxregister_decrease(producer_regs)
            if warp == 0:
                gK = cute.local_tile(gK_tma[(None, None, kv_head, batch)], (BN, D), (None, 0))
                gV = cute.local_tile(gV_tma[(None, None, kv_head, batch)], (BN, D), (None, 0))
                tKsK, tKgK = cpasync.tma_partition(
                    tma_k, 0, cute.make_layout(1), cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2))
                tVsV, tVgV = cpasync.tma_partition(
                    tma_v, 0, cute.make_layout(1), cute.group_modes(sV, 0, 2), cute.group_modes(gV, 0, 2))
                kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
                kv_pipe.producer_acquire(kv_state)
                kv_bar = kv_pipe.producer_get_barrier(kv_state)
                cute.copy(tma_k, tKgK[(None, n_block)], tKsK, tma_bar_ptr=kv_bar)
                cute.copy(tma_v, tVgV[(None, n_block)], tVsV, tma_bar_ptr=kv_bar)
                kv_pipe.producer_commit(kv_state)

                prod = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, Q_STAGES)
                for g in range(group):
                    head = kv_head * group + g
                    gQ = cute.local_tile(gQ_tma[(None, None, head, batch)], (BM, D), (None, 0))
                    gdO = cute.local_tile(gdO_tma[(None, None, head, batch)], (BM, D), (None, 0))
                    tQsQ, tQgQ = cpasync.tma_partition(
                        tma_q, 0, cute.make_layout(1), cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2))
                    tOsdO, tOgdO = cpasync.tma_partition(
                        tma_do, 0, cute.make_layout(1), cute.group_modes(sdO, 0, 2), cute.group_modes(gdO, 0, 2))
                    for m_block in range(m_first, m_blocks):
                        qdo_pipe.producer_acquire(prod)
                        bar = qdo_pipe.producer_get_barrier(prod)
                        cute.copy(tma_q, tQgQ[(None, m_block)], tQsQ[(None, prod.index)], tma_bar_ptr=bar)
                        cute.copy(tma_do, tOgdO[(None, m_block)], tOsdO[(None, prod.index)], tma_bar_ptr=bar)
                        qdo_pipe.producer_commit(prod)
                        prod.advance()
                qdo_pipe.producer_tail(prod)
        else:
            cute.arch.setmaxregister_increase(mma_regs)
            mtid = tidx - wg_threads
            wg_base = (wg - 1) * wg_threads
            pds_barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=mma_threads)

            # S^T = K Q^T and dP^T = V dO^T: M = keys (64 per warpgroup), N = queries, K = D.
            wg_sdp = mma_sdp.get_slice(wg_base)
            tSrK = mma_sdp.make_fragment_A(wg_sdp.partition_A(sK))
            tSrQ = mma_sdp.make_fragment_B(wg_sdp.partition_B(sQ))
            tPrV = mma_sdp.make_fragment_A(wg_sdp.partition_A(sV))
            tPrdO = mma_sdp.make_fragment_B(wg_sdp.partition_B(sdO))
            thr_sdp = mma_sdp.get_slice(mtid)
            tScS = thr_sdp.partition_C(cute.make_identity_tensor((BN, BM)))
            acc_s = cute.make_rmem_tensor(tScS.shape, f32)
            acc_dp = cute.make_rmem_tensor(tScS.shape, f32)
            r_p = cute.make_rmem_tensor(tScS.shape, dtype)
            r_ds = cute.make_rmem_tensor(tScS.shape, dtype)
            r_p_a = cute.make_tensor(r_p.iterator, acc_as_operand_a(r_p.layout))
            r_ds_a = cute.make_tensor(r_ds.iterator, acc_as_operand_a(r_ds.layout))
            # dS^T -> sdS with transposing stmatrix (keys are contiguous in sdS).
            ds_r2s = ds_store_copy(dtype, mma_sdp)
            tDSsdS = ds_r2s.get_slice(mtid).partition_D(transposed(sdS))
            tDSrdS = ds_store_source(r_ds, tDSsdS)

            # dV += P^T dO and dK += dS^T Q: M = keys, N = D, K = queries; A from registers.
            wg_dkv = mma_dkv.get_slice(wg_base)
            tVrdO = mma_dkv.make_fragment_B(wg_dkv.partition_B(transposed(sdO)))
            tKrQ = mma_dkv.make_fragment_B(wg_dkv.partition_B(transposed(sQ)))
            thr_dkv = mma_dkv.get_slice(mtid)
            tKcK = thr_dkv.partition_C(cute.make_identity_tensor((BN, D)))
            acc_dk = cute.make_rmem_tensor(tKcK.shape, f32)
            acc_dv = cute.make_rmem_tensor(tKcK.shape, f32)
            acc_dk.fill(0.0)
            acc_dv.fill(0.0)

            # dQ = dS K: M = queries, N = D (split over the warpgroups), K = keys.
            wg_dq = mma_dq.get_slice(wg_base)
            tQrdS = mma_dq.make_fragment_A(wg_dq.partition_A(sdS))
            tQrK = mma_dq.make_fragment_B(wg_dq.partition_B(transposed(sK)))
            thr_dq = mma_dq.get_slice(mtid)
            tQcQ = thr_dq.partition_C(cute.make_identity_tensor((BM, D)))
            acc_dq = cute.make_rmem_tensor(tQcQ.shape, f32)

            kv_cons = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
            kv_pipe.consumer_wait(kv_cons)
            cons = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, Q_STAGES)
            for g in range(group):
                head = kv_head * group + g
                for m_block in range(m_first, m_blocks):
                    m_base = m_block * BM
                    # Dropout keep bits of this thread's 32 elements, drawn before the
                    # products are issued (their accumulators would pin 64 more registers).
                    # Element (b, h, i, j) is kept iff uniform(v) < 1 - p, v its linear index
                    # in (B, Hq, Sq, Sk): word v % 4 of Philox(seed, offset / 4 + v / 4).
                    keep_bits = cutlass.Uint32(0)
                    if cutlass.const_expr(use_dropout):
                        seed = mRng[0]
                        key_lo = cutlass.Uint32(seed)
                        key_hi = cutlass.Uint32(seed >> 32)
                        counter0 = mRng[1] >> 2
                        row_base = (cutlass.Int64(batch) * q_heads + head) * seqlen_q + m_base
                        for i in cutlass.range_constexpr(cute.size(acc_s)):
                            key_q = tScS[i]
                            v = (row_base + key_q[1]) * seqlen_k + (n_base + key_q[0])
                            word = philox_word(key_lo, key_hi, counter0 + (v >> 2), v & 3)
                            if f32(word >> 8) * f32(2.0 ** -24) < keep_prob:
                                keep_bits = keep_bits | (cutlass.Uint32(1) << cutlass.Uint32(i))
                    qdo_pipe.consumer_wait(cons)
                    stage = cons.index
                    warpgroup.fence()
                    mma_batch(mma_sdp, acc_s, tSrK, tSrQ[None, None, None, stage], True)
                    mma_batch(mma_sdp, acc_dp, tPrV, tPrdO[None, None, None, stage], True)
                    warpgroup.commit_group()

                    warpgroup.wait_group(0)

                    # P^T and dS^T in registers; the causal mask only where the
                    # diagonal crosses the block (some key after some query).
                    crosses = cutlass.Int32(0)
                    if is_causal != 0:
                        if n_base + BN - 1 > m_base:
                            crosses = cutlass.Int32(1)
                    for i in cutlass.range_constexpr(cute.size(acc_s)):
                        key_q = tScS[i]
                        row_q = m_base + key_q[1]
                        s = acc_s[i] * scale_log2 - mLse2[(row_q, head, batch)]
                        if crosses != 0:
                            if n_base + key_q[0] > row_q:
                                s = -f32.inf
                        p = cute.math.exp2(s, fastmath=True)
                        if cutlass.const_expr(use_dropout):
                            # dV takes P * keep (its 1 / (1 - p) is applied in the epilogue),
                            # dS = P * (dP * keep / (1 - p) - delta); rounded as they are made
                            kept = ((keep_bits >> i) & 1) != 0
                            r_p[i] = f32(cutlass.select_(kept, p, f32(0.0))).to(dtype)
                            dp = f32(cutlass.select_(kept, acc_dp[i] * keep_scale, f32(0.0)))
                            r_ds[i] = (p * (dp - mDelta[(row_q, head, batch)])).to(dtype)
                        else:
                            acc_s[i] = p
                            acc_dp[i] = p * (acc_dp[i] - mDelta[(row_q, head, batch)])
                    if cutlass.const_expr(not use_dropout):
                        r_p.store(acc_s.load().to(dtype))
                        r_ds.store(acc_dp.load().to(dtype))

                    # Both warpgroups' dQ products of the previous step have read sdS.
                    pds_barrier.arrive_and_wait()
                    cute.copy(ds_r2s, tDSrdS, tDSsdS)
                    cute.arch.fence_proxy("async.shared", space="cta")
                    pds_barrier.arrive_and_wait()

                    warpgroup.fence()
                    mma_batch(mma_dkv, acc_dv, r_p_a, tVrdO[None, None, None, stage], False)
                    mma_batch(mma_dkv, acc_dk, r_ds_a, tKrQ[None, None, None, stage], False)
                    mma_batch(mma_dq, acc_dq, tQrdS, tQrK, True)
                    warpgroup.commit_group()
                    warpgroup.wait_group(0)
                    qdo_pipe.consumer_release(cons)
                    cons.advance()

                    if deterministic != 0:
                        for i in cutlass.range_constexpr(cute.size(acc_dq)):
                            row_d = tQcQ[i]
                            mdQacc[(row_d[1], m_base + row_d[0], head, batch, n_block)] = acc_dq[i]
                    else:
                        for i in cutlass.range_constexpr(cute.size(acc_dq)):
                            row_d = tQcQ[i]
                            ptr = mdQacc.iterator + cute.crd2idx(
                                (row_d[1], m_base + row_d[0], head, batch, 0), mdQacc.layout)
                            cute.arch.atomic_add(ptr.llvm_ptr, acc_dq[i], sem="relaxed", scope="gpu")

            kv_pipe.consumer_release(kv_cons)

            # Epilogue: dK scaled, both rounded once; key rows past Sk dropped.
            for i in cutlass.range_constexpr(cute.size(acc_dk)):
                key_d = tKcK[i]
                key = n_base + key_d[0]
                if key < seqlen_k:
                    mdK[(key, key_d[1], kv_head, batch)] = (acc_dk[i] * scale).to(dtype)
                    if cutlass.const_expr(use_dropout):
                        mdV[(key, key_d[1], kv_head, batch)] = (acc_dv[i] * keep_scale).to(dtype)
                    else:
                        mdV[(key, key_d[1], kv_head, batch)] = acc_dv[i].to(dtype)

    @cute.jit
    def launch(
        mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mdO: cute.Tensor,
        mLse2: cute.Tensor, mDelta: cute.Tensor, mdQacc: cute.Tensor,
        mdK: cute.Tensor, mdV: cute.Tensor, mRng: cute.Tensor,
        scale: cutlass.Float32, is_causal: cutlass.Int32, deterministic: cutlass.Int32,
        keep_prob: cutlass.Float32, keep_scale: cutlass.Float32,
        stream: cuda.CUstream,
    ):
        mma_sdp, mma_dkv, mma_dq = tiled_mmas(dtype, D)
        # Q and dO: B operand K-major (D) of S^T / dP^T and B operand MN-major of dK / dV (N = D).
        sq_layout = smem_layout(BM, D, Q_STAGES, D)
        # K: A operand K-major of S^T and B operand MN-major of dQ, where each warpgroup reads D/2.
        sk_layout = smem_layout(BN, D, None, D // 2)
        sv_layout = smem_layout(BN, D, None, D)
        # dS (queries x keys): A operand K-major (keys) of dQ.
        sds_layout = smem_layout(BM, BN, None, BN)
        g2s = cpasync.CopyBulkTensorTileG2SOp()
        tma_q, gQ_tma = cpasync.make_tiled_tma_atom(g2s, mQ, cute.slice_(sq_layout, (None, None, 0)), (BM, D))
        tma_do, gdO_tma = cpasync.make_tiled_tma_atom(g2s, mdO, cute.slice_(sq_layout, (None, None, 0)), (BM, D))
        tma_k, gK_tma = cpasync.make_tiled_tma_atom(g2s, mK, sk_layout, (BN, D))
        tma_v, gV_tma = cpasync.make_tiled_tma_atom(g2s, mV, sv_layout, (BN, D))
        n_blocks = (mK.shape[0] + BN - 1) // BN
        kernel(
            tma_q, gQ_tma, tma_do, gdO_tma, tma_k, gK_tma, tma_v, gV_tma,
            mLse2, mDelta, mdQacc, mdK, mdV, mRng, mma_sdp, mma_dkv, mma_dq,
            sq_layout, sk_layout, sv_layout, sds_layout, scale, scale * LOG2E, is_causal, deterministic,
            keep_prob, keep_scale,
        ).launch(grid=[n_blocks, mK.shape[2], mK.shape[3]], block=[threads, 1, 1], min_blocks_per_mp=1,
                 stream=stream)

    # Fake arguments.  q/k/v/dO are (S, D, H, B) views with unit D stride; shared
    # symbols tie equal extents together; strides promise 16-byte multiples.
    sq, sk = cute.sym_int32(symbol="Sq"), cute.sym_int32(symbol="Sk")
    hq, hkv, nb = cute.sym_int32(symbol="Hq"), cute.sym_int32(symbol="Hkv"), cute.sym_int32(symbol="B")
    sq_pad, parts = cute.sym_int32(symbol="SqPad"), cute.sym_int32(symbol="P")
    vec = 128 // dtype.width

    def seq_tensor(seq, heads, dt=dtype):
        strides = (cute.sym_int64(divisibility=vec), 1, cute.sym_int64(divisibility=vec),
                   cute.sym_int64(divisibility=vec))
        return make_fake_tensor(dt, (seq, D, heads, nb), strides, assumed_align=16)

    def row_stats():  # (Sq_pad, Hq, B) fp32, contiguous over rows
        return make_fake_tensor(f32, (sq_pad, hq, nb), (1, cute.sym_int64(), cute.sym_int64()), assumed_align=16)

    fdq = make_fake_tensor(f32, (D, sq_pad, hq, nb, parts),
                           (1, D, cute.sym_int64(), cute.sym_int64(), cute.sym_int64()), assumed_align=16)
    fake_args = (seq_tensor(sq, hq), seq_tensor(sk, hkv), seq_tensor(sk, hkv), seq_tensor(sq, hq),
                 row_stats(), row_stats(), fdq, seq_tensor(sk, hkv), seq_tensor(sk, hkv),
                 make_fake_tensor(cutlass.Int64, (2,), (1,), assumed_align=16),
                 cutlass.Float32(1.0), cutlass.Int32(0), cutlass.Int32(0),
                 cutlass.Float32(1.0), cutlass.Float32(1.0), make_fake_stream())
    return launch, fake_args


def emit_registry(entries):
    """C++ table of the exported main kernels (kernels/cuda/attention_bwd_args.h).

    entries: [(AttentionBwdSpec, path of its exported header)].  Each entry gets
    a loader and a launcher that fill the header's tensor structs from an
    AttentionBwdArgs (extents and the dynamic strides of each tensor)."""
    dt = {"bf16": "AttnDType::bf16", "fp16": "AttnDType::fp16"}
    out = [
        "// Generated by kernels/cute/aot.py from kernels/cute/attention_bwd.py; do not edit.",
        "#include <cuda_runtime.h>",
        "#include \"attention_bwd_args.h\"",
        "static int* g_attn_bwd_load_error;",
        "#define CUTE_DSL_CUDA_ERROR_CHECK(err) do { cudaError_t e_ = (err); "
        "if (e_ != cudaSuccess && *g_attn_bwd_load_error == 0) *g_attn_bwd_load_error = (int)e_; } while (0)",
    ]
    out += [f'#include "{header}"' for _, header in entries]
    out.append("namespace cutegrad {")
    table = []
    for i, (s, _) in enumerate(entries):
        n = s.name
        out.append(f"static {n}_Kernel_Module_t mod_{i};")
        out.append(f"static void load_{i}(int* err) {{ g_attn_bwd_load_error = err; {n}_Kernel_Module_Load(&mod_{i}); }}")
        out.append(
            f"static int launch_{i}(const AttentionBwdArgs& a, void* stream) {{\n"
            f"  int32_t Sq = (int32_t)a.sq, Sk = (int32_t)a.sk, Hq = (int32_t)a.hq, Hkv = (int32_t)a.hkv,"
            f" B = (int32_t)a.batch, SqPad = (int32_t)a.sq_pad, P = (int32_t)a.dq_parts;\n"
            f"  {n}_Tensor_mQ_t q{{const_cast<void*>(a.q), {{Sq, Hq, B}}, {{a.q_ss, a.q_sh, a.q_sb}}}};\n"
            f"  {n}_Tensor_mK_t k{{const_cast<void*>(a.k), {{Sk, Hkv, B}}, {{a.k_ss, a.k_sh, a.k_sb}}}};\n"
            f"  {n}_Tensor_mV_t v{{const_cast<void*>(a.v), {{Sk, Hkv, B}}, {{a.v_ss, a.v_sh, a.v_sb}}}};\n"
            f"  {n}_Tensor_mdO_t dout{{const_cast<void*>(a.dout), {{Sq, Hq, B}}, {{a.do_ss, a.do_sh, a.do_sb}}}};\n"
            f"  {n}_Tensor_mLse2_t lse2{{a.lse2, {{SqPad, Hq, B}}, {{(int64_t)SqPad, (int64_t)SqPad * Hq}}}};\n"
            f"  {n}_Tensor_mDelta_t delta{{a.delta, {{SqPad, Hq, B}}, {{(int64_t)SqPad, (int64_t)SqPad * Hq}}}};\n"
            f"  int64_t dq_sh = (int64_t)SqPad * {s.head_dim}, dq_sb = dq_sh * Hq, dq_sp = dq_sb * B;\n"
            f"  {n}_Tensor_mdQacc_t dq{{a.dq_acc, {{SqPad, Hq, B, P}}, {{dq_sh, dq_sb, dq_sp}}}};\n"
            f"  {n}_Tensor_mdK_t dk{{a.dk, {{Sk, Hkv, B}}, {{a.dk_ss, a.dk_sh, a.dk_sb}}}};\n"
            f"  {n}_Tensor_mdV_t dv{{a.dv, {{Sk, Hkv, B}}, {{a.dv_ss, a.dv_sh, a.dv_sb}}}};\n"
            f"  {n}_Tensor_mRng_t rng{{a.rng}};\n"
            f"  return cute_dsl_{n}_wrapper(&mod_{i}, &q, &k, &v, &dout, &lse2, &delta, &dq, &dk, &dv, &rng,"
            f" a.scale, a.is_causal ? 1 : 0, a.deterministic ? 1 : 0, a.keep_prob, a.keep_scale,"
            f" (cudaStream_t)stream);\n"
            f"}}"
        )
        table.append(f'  {{"{n}", {dt[s.dtype]}, {s.head_dim}, {str(s.dropout).lower()}, {int(s.arch[3:5])}, '
                     f'load_{i}, launch_{i}}},')
    out.append("extern const AttentionBwdKernelEntry kAttentionBwdKernels[] = {")
    out += table
    if not table:
        out.append('  {"", AttnDType::bf16, 0, false, -1, nullptr, nullptr},')
    out.append("};")
    out.append(f"extern const int kNumAttentionBwdKernels = {len(table)};")
    out.append(f"extern const int kAttentionBwdBlockM = {BLOCK_M};")
    out.append(f"extern const int kAttentionBwdBlockN = {BLOCK_N};")
    out.append("}  // namespace cutegrad")
    return "\n".join(out) + "\n"
