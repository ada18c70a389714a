"""Hopper (sm_90a) fused attention forward (FlashAttention-2/3 style) in CuTeDSL, compiled ahead of time.

For every batch b and query head h (key/value head h // group, grouped-query
attention), with the scores s = q k^T * scale:

    O[b, :, h]   = softmax(s + causal mask) @ V          (B, Sq, Hq, D), the input dtype
    LSE[b, h, :] = log(sum(exp(s + causal mask)))         (B, Hq, Sq), fp32, natural log

kernels/reference/attention.py is the NumPy model of this exact algorithm
(tests/test_attention_model.py proves it against float64 attention).

Design
------
* Grid (query tiles, Hq, B); a CTA owns BLOCK_M = 128 query rows of one
  (batch, head) pair.  Causal grids visit the query tiles in reverse so the
  longest CTAs start first.
* Warp specialization: warpgroup 0 is the producer (it gives registers away,
  setmaxnreg 24; its first warp issues every TMA load), warpgroups 1 and 2 are
  consumers (setmaxnreg 240), each owning 64 of the 128 rows with its own Q
  tile in shared memory.
* Loads: the Q tile once (both halves on one mbarrier), then K and V blocks of
  BLOCK_N = 128 keys into a ring of KV_STAGES stages (each stage holds one K
  and one V block; full/empty mbarriers, PipelineTmaAsync).  q, k and v are
  4-D (S, D, H, B) views with arbitrary (16-byte multiple) strides on S, H and
  B, so the fused projection's (B, T, 3, H, D) output is read in place; TMA
  zero-fills rows past Sq / Sk.
* Per key block, each consumer warpgroup: S = Q K^T with wgmma (fp32
  accumulator in registers, 64 x 128), scaled into the log2 domain; elements
  past Sk (last, partial block) and above the diagonal (causal) set to -inf,
  only on the blocks that need it; the online softmax (row max over the quad
  of threads sharing a row, rescale of O and of the partial row sums by
  exp2(m_old - m_new), P = exp2(s - m)); P converted to the input dtype in
  registers, where the 16-bit accumulator layout is already wgmma's A-operand
  layout, and O += P V with wgmma reading P from registers and V (N-major
  view of the (Sk, D) rows) from shared memory.  The long kernels pipeline
  these steps (next section); the arithmetic is the same.
* Tensor-core schedule (long kernels; FlashAttention-3's two overlaps):
  - intra-warpgroup: block 0's S, softmax and P run alone; then iteration
    nb = 1 .. n_blocks - 1 issues S(nb) = Q K(nb)^T and O += P(nb - 1) V(nb - 1)
    as two commit groups, waits for the first only (wgmma.wait_group 1), runs
    block nb's mask and softmax and converts P(nb) into a second P buffer
    while P V still runs, then waits for it, releases stage nb - 1, rescales
    O by block nb's alpha and copies P(nb) into the registers P V reads (ptxas
    may sink the conversion there instead); the last P V follows the loop.
    O sees the same operations in the same order as before (O * alpha(nb)
    after + P(nb - 1) V(nb - 1), before + P(nb) V(nb)), so the NumPy model
    holds (flash_forward(pipelined=True) runs this order; tests show it is
    bitwise the plain loop).  A warpgroup holds two stages (nb - 1 and nb):
    KV_STAGES >= 2.
  - ptxas places a wgmma wait at the top of its basic block -- here before
    the softmax, leaving nothing to overlap -- so the code from the P V wait
    on sits under an always-taken branch (block nb starts before Sk) that
    begins a new block; tests/test_attention_build.py checks that the
    softmax's exp2s lie between the two waits.
  - dropout: Philox zeroes the converted P(nb) in the second buffer while
    P V runs (D = 32, 64); at D = 128 that spilled (O, both P buffers and
    Philox's temporaries), so it runs after the P V wait.
  - inter-warpgroup ("ping-pong"): the two consumer warpgroups take turns
    issuing an iteration's GEMMs, so one's softmax runs while the other's
    GEMMs own the tensor cores.  Named barrier TURN_BARRIERS[h] (1 and 2;
    0 is __syncthreads, nothing else here uses a named barrier) is warpgroup
    h's turn, 2 x 128 threads: warpgroup h waits on its own (bar.sync) after
    its K/V wait and before its fence + GEMMs, and hands the turn over
    (bar.arrive on the other's) right after issuing them.  Warpgroup 1's first
    turn is a bar.arrive on its own barrier before the loop.
  - No deadlock, no pending arrival at exit: both warpgroups serve the same
    128-row tile, so both run the same n_blocks - 1 iterations.  Barrier 1
    sees n_blocks - 1 syncs (warpgroup 1) and 1 + (n_blocks - 2) arrivals
    (the first turn, then warpgroup 2's hand-overs but its last, which has no
    taker and is skipped); barrier 2 sees n_blocks - 1 syncs and n_blocks - 1
    arrivals (warpgroup 1); with n_blocks == 1 nothing is touched.  Order the
    turns (nb, wg 1) < (nb, wg 2) < (nb + 1, wg 1): each blocking wait
    depends only on earlier turns -- wg 1's turn nb on wg 2's hand-over of
    turn nb - 1, wg 2's on wg 1's of turn nb, and the K/V wait for block nb
    on both warpgroups releasing block nb - KV_STAGES, which each does in its
    iteration nb - KV_STAGES + 1 <= nb - 1 -- and everything between two
    waits (issue, wgmma completion, softmax) finishes on its own, so by
    induction every wait is satisfied.
  - The short kernel is not scheduled: its warpgroups serve different items
    and an invalid item runs no block, so it runs the plain sequence once.
  - Registers (setmaxnreg 240 per consumer thread): S (64 fp32), O (D / 2
    fp32) and two P buffers (64 16-bit values in 32 registers each) are live
    together while both GEMMs run; ptxas reports 168 per thread at launch
    (384 threads); the consumer code uses up to about 190 registers without
    dropout and 236 with it, no local memory (tests/test_attention_build.py).
* Causal: the top-left aligned mask of PyTorch's is_causal (row i sees keys
  j <= i for any Sq, Sk); a CTA stops after the key block holding its last
  row, so fully masked blocks are never loaded.
* Dropout (the specializations built with it): after a block's row sums
  are taken (the normaliser counts every key) and P is converted to the input
  dtype (rounding and zeroing commute; the fp32 scores' registers then hold
  Philox's temporaries), each probability (b, h, i, j) is kept
  iff lane v % 4 of Philox4x32-10(seed, offset / 4 + v / 4), v = ((b * Hq + h)
  * Sq + i) * Sk + j, shifted right by 8, is below (1 - p) * 2^24 -- the stream
  of kernels/cuda/random.cu and dropout_keep_mask in the NumPy model; O is
  scaled by 1 / (1 - p) in the epilogue.  Seed and offset come from arguments,
  or (graph capture) from the generator's device buffer plus an offset.
* Short sequences (the ``short`` specializations, chosen by the backend for
  Sq <= 64 and Sk <= BLOCK_N without dropout, where a 128-row tile would be at
  least half padding): each consumer warpgroup takes its own work item, a
  64-row query tile of some (batch, head), so one CTA serves two (batch, head)
  pairs; the producer loads each item's Q tile and the whole K/V of its head
  (one block) into that warpgroup's own buffers on a single-use mbarrier, and
  the warpgroup runs the same block step once.  No K/V ring, no stage reuse.
* Epilogue: the row sums are reduced over the quad, O = acc / l written with
  bounds-checked stores into the contiguous (B, Sq, Hq, D) output (rows past
  Sq are dropped), and one thread per row writes LSE = (m + log2 l) * ln 2.

Constraints (checked before launch by the binding; the dispatcher in
frontend/ops/attention.py sends everything else to the composite path)
----------------------------------------------------------------------
* q, k, v bf16 or fp16 (one dtype), unit stride on D, every other stride and
  every base address a multiple of 16 bytes; O contiguous; LSE fp32 contiguous;
* head dim D in HEAD_DIMS, the same for q, k and v; Hq a multiple of Hkv;
* Sq, Sk >= 1; Hq and B at most 65535 (grid dims).
* Not in the kernel: attention masks (the dispatcher falls back).

Specializations
---------------
``specializations()`` builds, for sm_90a, one kernel per (dtype, head dim,
dropout) and a short-sequence kernel per (dtype, head dim): bf16 and fp16 x
D = 32, 64, 128 x (long, long with dropout, short) -- 18 kernels.  Causal or not, the softmax scale, the dropout probability and
Philox state, the GQA group and every extent and stride are runtime arguments.
"""

import math
from dataclasses import dataclass

HEAD_DIMS = (32, 64, 128)
DTYPES = ("bf16", "fp16")
BLOCK_M = 128           # query rows per CTA
WG_ROWS = 64            # query rows per consumer warpgroup
BLOCK_N = 128           # keys per K/V block
SMEM_BYTES = 232448     # sm_90 opt-in maximum per block
MAX_KV_STAGES = 4
# Named barriers of the long kernels' tensor-core schedule: TURN_BARRIERS[h] is consumer
# warpgroup h's turn (0 is __syncthreads; nothing else in these kernels uses named barriers).
TURN_BARRIERS = (1, 2)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclass(frozen=True)
class AttentionFwdSpec:
    """One AOT specialization; every field is baked into the compiled kernel."""
    dtype: str
    head_dim: int
    dropout: bool = False
    short: bool = False   # the short-sequence kernel: Sk <= BLOCK_N, one 64-row item per warpgroup
    arch: str = "sm_90a"

    @property
    def name(self):
        return (f"attention_fwd_{self.arch}_{self.dtype}_d{self.head_dim}{'_dropout' if self.dropout else ''}"
                f"{'_short' if self.short else ''}")


def kv_stages(head_dim):
    """K/V ring depth: as many (K block + V block) stages as fit next to the Q tile."""
    q_bytes = BLOCK_M * head_dim * 2
    stage_bytes = 2 * BLOCK_N * head_dim * 2
    return min(MAX_KV_STAGES, (SMEM_BYTES - 2048 - q_bytes) // stage_bytes)


def specializations(archs=("sm_90a",)):
    specs = []
    for arch in archs:
        if arch != "sm_90a":
            # wgmma exists only on sm_90a; other GPUs take the composite attention.
            continue
        for dtype in DTYPES:
            for d in HEAD_DIMS:
                for dropout in (False, True):
                    specs.append(AttentionFwdSpec(dtype, d, dropout, False, arch))
                specs.append(AttentionFwdSpec(dtype, d, False, True, arch))
    return specs


SPECS = specializations()


def build_kernel(spec: AttentionFwdSpec):
    """Return (jit_function, fake_args) for cute.compile.  Imports the DSL lazily:
    the caller must have set CUTE_DSL_ARCH before the first cutlass import."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    import cutlass.pipeline as pipeline
    import cutlass.utils as utils
    import cutlass.utils.hopper_helpers as sm90
    from cutlass.cute.nvgpu import warpgroup
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor
    from philox import philox4x32_10

    dtype = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16}[spec.dtype]
    acc_dtype = cutlass.Float32
    D = spec.head_dim
    short = spec.short
    # the short kernel holds one K/V block per consumer warpgroup (each may serve another head)
    stages = 2 if short else kv_stages(D)
    assert stages >= 2, "the pipelined loop holds two K/V stages at a time"
    # Dropout's Philox runs while P V does, except at D = 128: there O (64 registers), both P
    # buffers and Philox's temporaries exceed the 240 registers (ptxas spilled), and it runs
    # after the P V wait instead, when P V's registers are free.
    dropout_during_pv = D < 128
    threads_per_wg = 128
    threads = 3 * threads_per_wg
    producer_regs, consumer_regs = 24, 240
    k_major = warpgroup.OperandMajorMode.K
    mn_major = warpgroup.OperandMajorMode.MN
    qk_tiler = (WG_ROWS, BLOCK_N, D)      # (M, N, K) of S = Q K^T
    pv_tiler = (WG_ROWS, D, BLOCK_N)      # (M, N, K) of O = P V
    neg_inf = -cutlass.Float32.inf

    def philox_lane(seed_lo, seed_hi, counter, lane):
        """Lane `lane` (0..3) of Philox4x32-10(key = seed, counter = (counter lo, counter hi, 0, 0)):
        the stream of kernels/cuda/philox.h and kernels/reference/attention.py (kernels/cute/philox.py)."""
        c0, c1, c2, c3 = philox4x32_10(seed_lo, seed_hi, counter)
        low = cutlass.select_(lane == 0, c0, c1)
        high = cutlass.select_(lane == 2, c2, c3)
        return cutlass.Uint32(cutlass.select_(lane < 2, low, high))

    # qk_gemm, pv_gemm, rescale_o and apply_dropout are traced as plain Python (their loops
    # unroll); online_softmax branches on runtime values, so it is a jit function.  Each GEMM
    # issues through an MMA atom of its own: the accumulate flag is state of the atom, and a
    # flag set on a shared TiledMma inside one loop body would leave it holding a value of
    # that body (invalid IR where the next body or the code after the loop reads it).
    def qk_gemm(qk_mma, acc_s, q_frag, k_frag):
        """Issue S = Q K^T (D / 16 wgmmas, one commit group); the caller fences before and waits after."""
        atom = cute.make_mma_atom(qk_mma.op)
        for ks in range(D // 16):
            atom.set(warpgroup.Field.ACCUMULATE, ks != 0)
            cute.gemm(atom, acc_s, q_frag[(None, None, ks)], k_frag[(None, None, ks)], acc_s)
        cute.nvgpu.warpgroup.commit_group()

    def pv_gemm(pv_mma, acc_o, tOrP, v_frag):
        """Issue O += P V (BLOCK_N / 16 wgmmas, P from registers, one commit group)."""
        atom = cute.make_mma_atom(pv_mma.op)
        atom.set(warpgroup.Field.ACCUMULATE, True)
        for ks in range(BLOCK_N // 16):
            cute.gemm(atom, acc_o, tOrP[(None, None, ks)], v_frag[(None, None, ks)], acc_o)
        cute.nvgpu.warpgroup.commit_group()

    @cute.jit
    def online_softmax(acc_s, tScS, row_max, row_sum, alpha, scale_log2, n0, row0, tile_m0, seqlen_k, causal):
        """One key block's scores (acc_s, in place) -> unnormalised probabilities P = exp2(s - m):
        scaled into the log2 domain; past Sk and (causal) above the diagonal set to -inf, only on
        the blocks that need it; running max and partial row sums updated.  alpha gets each row's
        rescale factor exp2(m_old - m_new), which the caller applies to O -- before this block's
        P V is added, in whichever place of the schedule O is free."""
        for i in cutlass.range_constexpr(cute.size(acc_s)):
            acc_s[i] = acc_s[i] * scale_log2
        if n0 + BLOCK_N > seqlen_k or (causal != 0 and n0 + BLOCK_N - 1 > tile_m0):
            for i in cutlass.range_constexpr(cute.size(acc_s)):
                col = n0 + tScS[i][1]
                if col >= seqlen_k or (causal != 0 and col > row0 + tScS[i][0]):
                    acc_s[i] = neg_inf
        for r in cutlass.range_constexpr(2):
            m_new = row_max[r]
            for j in cutlass.range_constexpr(BLOCK_N // 8):
                for c in cutlass.range_constexpr(2):
                    m_new = cute.arch.fmax(m_new, acc_s[c + 2 * r + 4 * j])
            m_new = cute.arch.warp_reduction_max(m_new, threads_in_group=4)
            # a row with every score so far masked keeps -inf: subtract 0 so exp2 gives 0, not NaN
            m_safe = m_new
            if m_new == neg_inf:
                m_safe = 0.0
            alpha[r] = cute.math.exp2(row_max[r] - m_safe, fastmath=True)
            row_max[r] = m_new
            block_sum = acc_dtype(0.0)
            for j in cutlass.range_constexpr(BLOCK_N // 8):
                for c in cutlass.range_constexpr(2):
                    p = cute.math.exp2(acc_s[c + 2 * r + 4 * j] - m_safe, fastmath=True)
                    acc_s[c + 2 * r + 4 * j] = p
                    block_sum = block_sum + p
            row_sum[r] = row_sum[r] * alpha[r] + block_sum

    def rescale_o(acc_o, alpha):
        for r in range(2):
            for j in range(D // 8):
                for c in range(2):
                    acc_o[c + 2 * r + 4 * j] = acc_o[c + 2 * r + 4 * j] * alpha[r]

    def apply_dropout(p, tScS, row_base, row0, n0, seqlen_k_64, seed_lo, seed_hi, counter0, keep_scaled):
        """Zero the dropped probabilities of one block, after its row sums were taken (the
        normaliser counts every key): element (b, h, i, j) is value ((b * Hq + h) * Sq + i) * Sk + j
        of the launch's Philox stream.  p is P already in the input dtype (rounding and zeroing
        commute), so the fp32 scores' registers are free for Philox's temporaries."""
        for i in range(cute.size(p)):
            v = (row_base + cutlass.Int64(row0 + tScS[i][0])) * seqlen_k_64 + cutlass.Int64(n0 + tScS[i][1])
            x = philox_lane(seed_lo, seed_hi, counter0 + (v >> 2), cutlass.Int32(v & 3))
            kept = cutlass.Float32(x >> cutlass.Uint32(8)) < keep_scaled
            p[i] = cutlass.select_(kept, p[i], dtype(0.0))

    def short_item(h, bid, m_tiles64, n_heads, total_items):
        """(valid, b, head, 64-row tile) of consumer warpgroup h's work item in the short kernel:
        CTA `bid` takes items 2 * bid and 2 * bid + 1 of (b, head, tile) in row-major order."""
        item = 2 * bid + h
        bh = item // m_tiles64
        b_h = bh // n_heads
        return item < total_items, b_h, bh - b_h * n_heads, item - bh * m_tiles64

    def acc_to_operand_a(acc_layout, a_value_shape):
        """The register layout that reads a 16-bit copy of a (64 x N) wgmma accumulator
        as the A operand of a wgmma with K = N: the accumulator's values per thread,
        (2 columns, 2 row halves, N / 8 column groups), regrouped into K slices of 16
        (two column groups each) -- the same registers, no data movement."""
        k_groups = cute.size(acc_layout, mode=[0]) // cute.size(a_value_shape)
        return cute.make_layout(
            (a_value_shape, acc_layout.shape[1], (acc_layout.shape[2], k_groups)),
            stride=(acc_layout.stride[0], acc_layout.stride[1],
                    (acc_layout.stride[2], cute.size(a_value_shape, mode=[2]) * acc_layout.stride[0][2])),
        )

    @cute.kernel
    def kernel(
        qk_mma: cute.TiledMma,
        pv_mma: cute.TiledMma,
        tma_q: cute.CopyAtom,
        gQ_tma: cute.Tensor,
        tma_k: cute.CopyAtom,
        gK_tma: cute.Tensor,
        tma_v: cute.CopyAtom,
        gV_tma: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        q_staged: cute.ComposedLayout,
        k_staged: cute.ComposedLayout,
        v_staged: cute.ComposedLayout,
        scale_log2: cutlass.Float32,
        causal: cutlass.Int32,
        group: cutlass.Int32,
        mRng: cute.Tensor,
        rng_seed: cutlass.Int64,
        rng_offset: cutlass.Int64,
        rng_in_memory: cutlass.Int32,
        keep_scaled: cutlass.Float32,
        rp_keep: cutlass.Float32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bid_m, hq, b = cute.arch.block_idx()
        grid_m, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // threads_per_wg)

        if warp == 0:
            cute.nvgpu.cpasync.prefetch_descriptor(tma_q)
            cute.nvgpu.cpasync.prefetch_descriptor(tma_k)
            cute.nvgpu.cpasync.prefetch_descriptor(tma_v)

        q_smem = cute.slice_(q_staged, (None, None, 0))
        k_smem = cute.slice_(k_staged, (None, None, 0))
        v_smem = cute.slice_(v_staged, (None, None, 0))
        q_tx_bytes = 2 * cute.size_in_bytes(dtype, q_smem)
        kv_tx_bytes = cute.size_in_bytes(dtype, k_smem) + cute.size_in_bytes(dtype, v_smem)

        @cute.struct
        class Storage:
            q_barriers: cute.struct.MemRange[cutlass.Int64, 2]
            short_barriers: cute.struct.MemRange[cutlass.Int64, 2]
            kv_barriers: cute.struct.MemRange[cutlass.Int64, stages * 2]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(q_staged)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(k_staged)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(v_staged)], 1024]

        storage = utils.SmemAllocator().allocate(Storage)
        no_cluster = cute.make_layout((1, 1, 1, 1))
        if cutlass.const_expr(not short):
            # Q: one stage, both 64-row halves on one barrier; every consumer warp waits on it.
            q_pipe = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.q_barriers.data_ptr(),
                num_stages=1,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 8),
                tx_count=q_tx_bytes,
                cta_layout_vmnk=no_cluster,
            )
            # K/V ring: a stage is free once all eight consumer warps (both warpgroups) are done with it.
            kv_pipe = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.kv_barriers.data_ptr(),
                num_stages=stages,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 8),
                tx_count=kv_tx_bytes,
                cta_layout_vmnk=no_cluster,
            )
        else:
            # Short kernel: one single-use barrier per consumer warpgroup for its Q tile, K and V.
            if tidx == 0:
                for h in cutlass.range_constexpr(2):
                    cute.arch.mbarrier_init(storage.short_barriers.data_ptr() + h, 1)
            cute.arch.mbarrier_init_fence()
        sQ = storage.sQ.get_tensor(q_staged.outer, swizzle=q_staged.inner)
        sK = storage.sK.get_tensor(k_staged.outer, swizzle=k_staged.inner)
        sV = storage.sV.get_tensor(v_staged.outer, swizzle=v_staged.inner)

        seqlen_q = mO.shape[0]
        seqlen_k = gK_tma.shape[0]
        n_heads = mO.shape[2]
        if cutlass.const_expr(short):
            m_tiles64 = (seqlen_q + WG_ROWS - 1) // WG_ROWS
            total_items = m_tiles64 * n_heads * mO.shape[3]
        else:
            # heavy (long) causal CTAs first
            m_idx = bid_m
            if causal != 0:
                m_idx = grid_m - 1 - bid_m
            m0 = m_idx * BLOCK_M
            n_blocks = (seqlen_k + BLOCK_N - 1) // BLOCK_N
            if causal != 0:
                n_blocks = cutlass.min(n_blocks, (m0 + BLOCK_M + BLOCK_N - 1) // BLOCK_N)
            hk = hq // group

        cute.arch.sync_threads()

        if wg == 0:
            cute.arch.setmaxregister_decrease(producer_regs)
            if warp == 0:
                # (TMA, 64-row tiles, 1, H, B) etc.
                tQsQ, tQgQ = cute.nvgpu.cpasync.tma_partition(
                    tma_q, 0, cute.make_layout(1), cute.group_modes(sQ, 0, 2),
                    cute.group_modes(cute.flat_divide(gQ_tma, (WG_ROWS, D)), 0, 2))
                tKsK, tKgK = cute.nvgpu.cpasync.tma_partition(
                    tma_k, 0, cute.make_layout(1), cute.group_modes(sK, 0, 2),
                    cute.group_modes(cute.flat_divide(gK_tma, (BLOCK_N, D)), 0, 2))
                tVsV, tVgV = cute.nvgpu.cpasync.tma_partition(
                    tma_v, 0, cute.make_layout(1), cute.group_modes(sV, 0, 2),
                    cute.group_modes(cute.flat_divide(gV_tma, (D, BLOCK_N)), 0, 2))
                if cutlass.const_expr(short):
                    for h in cutlass.range_constexpr(2):
                        valid_h, b_h, hq_h, mt_h = short_item(h, bid_m, m_tiles64, n_heads, total_items)
                        if valid_h:
                            bar = storage.short_barriers.data_ptr() + h
                            hk_h = hq_h // group
                            # one arrival (the barrier counts 1): the whole warp arriving overflows it,
                            # a fault on the device; the TMA copies below are issued once per warp anyway
                            with cute.arch.elect_one():
                                cute.arch.mbarrier_arrive_and_expect_tx(bar, q_tx_bytes // 2 + kv_tx_bytes)
                            cute.copy(tma_q, tQgQ[(None, mt_h, 0, hq_h, b_h)], tQsQ[(None, h)], tma_bar_ptr=bar)
                            cute.copy(tma_k, tKgK[(None, 0, 0, hk_h, b_h)], tKsK[(None, h)], tma_bar_ptr=bar)
                            cute.copy(tma_v, tVgV[(None, 0, 0, hk_h, b_h)], tVsV[(None, h)], tma_bar_ptr=bar)
                else:
                    q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
                    q_pipe.producer_acquire(q_state)
                    q_bar = q_pipe.producer_get_barrier(q_state)
                    for half in cutlass.range_constexpr(2):
                        cute.copy(tma_q, tQgQ[(None, 2 * m_idx + half, 0, hq, b)], tQsQ[(None, half)],
                                  tma_bar_ptr=q_bar)
                    q_pipe.producer_commit(q_state)
                    prod = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, stages)
                    for nb in range(n_blocks):
                        kv_pipe.producer_acquire(prod)
                        bar = kv_pipe.producer_get_barrier(prod)
                        cute.copy(tma_k, tKgK[(None, nb, 0, hk, b)], tKsK[(None, prod.index)], tma_bar_ptr=bar)
                        cute.copy(tma_v, tVgV[(None, 0, nb, hk, b)], tVsV[(None, prod.index)], tma_bar_ptr=bar)
                        kv_pipe.producer_commit(prod)
                        prod.advance()
                    kv_pipe.producer_tail(prod)
        else:
            cute.arch.setmaxregister_increase(consumer_regs)
            half = wg - 1
            ctid = tidx - wg * threads_per_wg
            if cutlass.const_expr(short):
                valid, b_c, hq_c, mt_c = short_item(half, bid_m, m_tiles64, n_heads, total_items)
                row0 = mt_c * WG_ROWS
                tile_m0 = row0          # the mask test's first row
            else:
                valid = True
                b_c, hq_c, mt_c = b, hq, 2 * m_idx + half
                row0 = m0 + half * WG_ROWS
                tile_m0 = m0

            thr_qk = qk_mma.get_slice(ctid)
            thr_pv = pv_mma.get_slice(ctid)
            tSrQ = qk_mma.make_fragment_A(thr_qk.partition_A(sQ))
            tSrK = qk_mma.make_fragment_B(thr_qk.partition_B(sK))
            tOrV = pv_mma.make_fragment_B(thr_pv.partition_B(sV))
            tScS = thr_qk.partition_C(cute.make_identity_tensor((WG_ROWS, BLOCK_N)))
            tOcO = thr_pv.partition_C(cute.make_identity_tensor((WG_ROWS, D)))
            acc_s = cute.make_rmem_tensor(tScS.shape, acc_dtype)
            acc_o = cute.make_rmem_tensor(tOcO.shape, acc_dtype)
            acc_o.fill(0.0)
            tOrP = cute.make_rmem_tensor(acc_to_operand_a(acc_s.layout, pv_mma.tv_layout_A.shape[1]), dtype)
            tOrP_as_acc = cute.make_tensor(tOrP.iterator, acc_s.layout)
            if cutlass.const_expr(not short):
                # the next block's P, converted while P V still reads tOrP (long kernels' loop)
                p_next = cute.make_rmem_tensor(tOrP.layout, dtype)
                p_next_as_acc = cute.make_tensor(p_next.iterator, acc_s.layout)
            # Per thread: two rows (value index bit 1), the running max (log2 domain) and a partial row sum.
            row_max = cute.make_rmem_tensor((2,), acc_dtype)
            row_sum = cute.make_rmem_tensor((2,), acc_dtype)
            row_max.fill(neg_inf)
            row_sum.fill(0.0)
            if cutlass.const_expr(spec.dropout):
                # graph-safe Philox state: under capture seed and base offset are read from device memory
                seed = rng_seed
                base = rng_offset
                if rng_in_memory != 0:
                    seed = mRng[0]
                    base = mRng[1] + rng_offset
                seed_lo = cutlass.Uint32(seed)
                seed_hi = cutlass.Uint32(seed >> 32)
                counter0 = base >> 2
                seqlen_q_64 = cutlass.Int64(seqlen_q)
                seqlen_k_64 = cutlass.Int64(seqlen_k)
                row_base = (cutlass.Int64(b_c) * cutlass.Int64(n_heads) + cutlass.Int64(hq_c)) * seqlen_q_64
            o_cols = D // 8
            alpha = cute.make_rmem_tensor((2,), acc_dtype)

            if cutlass.const_expr(short):
                # one block (the whole K/V of the item's head) in this warpgroup's own buffers;
                # an invalid (past the end) item runs nothing and writes nothing
                if valid:
                    cute.arch.mbarrier_wait(storage.short_barriers.data_ptr() + half, 0)
                    cute.nvgpu.warpgroup.fence()
                    qk_gemm(qk_mma, acc_s, tSrQ[(None, None, None, half)], tSrK[(None, None, None, half)])
                    cute.nvgpu.warpgroup.wait_group(0)
                    # O is still zero: its rescale is skipped (0 * alpha is 0)
                    online_softmax(acc_s, tScS, row_max, row_sum, alpha, scale_log2, 0, row0, tile_m0,
                                   seqlen_k, causal)
                    tOrP_as_acc.store(acc_s.load().to(dtype))
                    cute.nvgpu.warpgroup.fence()
                    pv_gemm(pv_mma, acc_o, tOrP, tOrV[(None, None, None, half)])
                    cute.nvgpu.warpgroup.wait_group(0)
            else:
                q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
                q_pipe.consumer_wait(q_state)
                # cons: the stage of the block whose P is in registers, waiting for its P V
                cons = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, stages)
                # Block 0 (n_blocks >= 1 always): S, softmax and P, outside the schedule.
                kv_pipe.consumer_wait(cons)
                cute.nvgpu.warpgroup.fence()
                qk_gemm(qk_mma, acc_s, tSrQ[(None, None, None, half)], tSrK[(None, None, None, cons.index)])
                cute.nvgpu.warpgroup.wait_group(0)
                online_softmax(acc_s, tScS, row_max, row_sum, alpha, scale_log2, 0, row0, tile_m0,
                               seqlen_k, causal)
                tOrP_as_acc.store(acc_s.load().to(dtype))
                if cutlass.const_expr(spec.dropout):
                    apply_dropout(tOrP_as_acc, tScS, row_base, row0, 0, seqlen_k_64, seed_lo, seed_hi, counter0,
                                  keep_scaled)
                # Warpgroup 1 takes the first turn at the tensor cores (see the design: the turn
                # barriers, and why every sync has its arrival).
                if half == 0 and n_blocks > 1:
                    cute.arch.barrier_arrive(barrier_id=TURN_BARRIERS[0], number_of_threads=2 * threads_per_wg)
                for nb in range(1, n_blocks):
                    n0 = nb * BLOCK_N
                    nxt = cons.clone()
                    nxt.advance()
                    kv_pipe.consumer_wait(nxt)
                    # my turn: S of block nb and O += P V of block nb - 1, back to back
                    if half == 0:
                        cute.arch.barrier(barrier_id=TURN_BARRIERS[0], number_of_threads=2 * threads_per_wg)
                    else:
                        cute.arch.barrier(barrier_id=TURN_BARRIERS[1], number_of_threads=2 * threads_per_wg)
                    cute.nvgpu.warpgroup.fence()
                    qk_gemm(qk_mma, acc_s, tSrQ[(None, None, None, half)], tSrK[(None, None, None, nxt.index)])
                    pv_gemm(pv_mma, acc_o, tOrP, tOrV[(None, None, None, cons.index)])
                    # hand the turn over; warpgroup 2's last hand-over would have no taker
                    if half == 0:
                        cute.arch.barrier_arrive(barrier_id=TURN_BARRIERS[1], number_of_threads=2 * threads_per_wg)
                    elif nb < n_blocks - 1:
                        cute.arch.barrier_arrive(barrier_id=TURN_BARRIERS[0], number_of_threads=2 * threads_per_wg)
                    # S is ready (groups complete in order); the softmax runs while P V still does
                    cute.nvgpu.warpgroup.wait_group(1)
                    online_softmax(acc_s, tScS, row_max, row_sum, alpha, scale_log2, n0, row0, tile_m0,
                                   seqlen_k, causal)
                    # the new P in the input dtype, beside the P that P V still reads
                    p_next_as_acc.store(acc_s.load().to(dtype))
                    if cutlass.const_expr(spec.dropout and dropout_during_pv):
                        apply_dropout(p_next_as_acc, tScS, row_base, row0, n0, seqlen_k_64, seed_lo, seed_hi,
                                      counter0, keep_scaled)
                    # O and the registers of P are the in-flight P V's until it completes.  ptxas
                    # schedules a wgmma wait at the top of its basic block, which would put it before
                    # the softmax above; this branch (always taken: block nb starts before Sk)
                    # starts a new block after the softmax.
                    if n0 < seqlen_k:
                        cute.nvgpu.warpgroup.wait_group(0)
                        kv_pipe.consumer_release(cons)
                        rescale_o(acc_o, alpha)
                        if cutlass.const_expr(spec.dropout and not dropout_during_pv):
                            apply_dropout(p_next_as_acc, tScS, row_base, row0, n0, seqlen_k_64, seed_lo, seed_hi,
                                          counter0, keep_scaled)
                        tOrP.store(p_next.load())
                    cons.advance()
                # the last block's O += P V, outside the schedule
                cute.nvgpu.warpgroup.fence()
                pv_gemm(pv_mma, acc_o, tOrP, tOrV[(None, None, None, cons.index)])
                cute.nvgpu.warpgroup.wait_group(0)
                kv_pipe.consumer_release(cons)

            # Epilogue: O = acc / l into the contiguous output, LSE by one thread of each row's quad.
            gO = cute.local_tile(mO[(None, None, hq_c, b_c)], (WG_ROWS, D), (mt_c, 0))
            tOgO = thr_pv.partition_C(gO)
            for r in cutlass.range_constexpr(2):
                total = cute.arch.warp_reduction_sum(row_sum[r], threads_in_group=4)
                inv = acc_dtype(0.0)
                lse = cutlass.Float32.inf
                if total > 0.0:
                    inv = 1.0 / total
                    if cutlass.const_expr(spec.dropout):
                        inv = inv * rp_keep
                    lse = (row_max[r] + cute.math.log2(total, fastmath=True)) * LN2
                row = row0 + tOcO[2 * r][0]
                if valid and row < seqlen_q:
                    for j in cutlass.range_constexpr(o_cols):
                        for c in cutlass.range_constexpr(2):
                            tOgO[c + 2 * r + 4 * j] = (acc_o[c + 2 * r + 4 * j] * inv).to(dtype)
                    if ctid % 4 == 0:
                        mLSE[(row, hq_c, b_c)] = lse

    @cute.jit
    def launch(
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        scale_log2: cutlass.Float32,
        causal: cutlass.Int32,
        group: cutlass.Int32,
        mRng: cute.Tensor,
        rng_seed: cutlass.Int64,
        rng_offset: cutlass.Int64,
        rng_in_memory: cutlass.Int32,
        keep_scaled: cutlass.Float32,
        rp_keep: cutlass.Float32,
        stream: cuda.CUstream,
    ):
        qk_mma = sm90.make_trivial_tiled_mma(dtype, dtype, k_major, k_major, acc_dtype, (1, 1, 1), qk_tiler[:2])
        pv_mma = sm90.make_trivial_tiled_mma(dtype, dtype, k_major, mn_major, acc_dtype, (1, 1, 1), pv_tiler[:2],
                                             warpgroup.OperandSource.RMEM)
        q_staged = sm90.make_smem_layout_a(utils.LayoutEnum.ROW_MAJOR, qk_tiler, dtype, 2)
        k_staged = sm90.make_smem_layout_b(utils.LayoutEnum.ROW_MAJOR, qk_tiler, dtype, stages)
        v_staged = sm90.make_smem_layout_b(utils.LayoutEnum.COL_MAJOR, pv_tiler, dtype, stages)
        g2s = cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp()
        tma_q, gQ_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(g2s, mQ, cute.slice_(q_staged, (None, None, 0)),
                                                               (WG_ROWS, D))
        tma_k, gK_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(g2s, mK, cute.slice_(k_staged, (None, None, 0)),
                                                               (BLOCK_N, D))
        tma_v, gV_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(g2s, mV, cute.slice_(v_staged, (None, None, 0)),
                                                               (D, BLOCK_N))
        if cutlass.const_expr(short):
            items = (mQ.shape[0] + WG_ROWS - 1) // WG_ROWS * mQ.shape[2] * mQ.shape[3]
            grid = [(items + 1) // 2, 1, 1]
        else:
            grid = [(mQ.shape[0] + BLOCK_M - 1) // BLOCK_M, mQ.shape[2], mQ.shape[3]]
        kernel(
            qk_mma, pv_mma, tma_q, gQ_tma, tma_k, gK_tma, tma_v, gV_tma, mO, mLSE, q_staged, k_staged, v_staged,
            scale_log2, causal, group, mRng, rng_seed, rng_offset, rng_in_memory, keep_scaled, rp_keep,
        ).launch(grid=grid, block=[threads, 1, 1], min_blocks_per_mp=1,
                 stream=stream)

    # Fake arguments: dynamic extents and strides (16-byte multiples promised; the
    # binding checks them).  Shared symbols tie equal extents together.
    sq = cute.sym_int32(symbol="Sq")
    sk = cute.sym_int32(symbol="Sk")
    hq = cute.sym_int32(symbol="Hq")
    hkv = cute.sym_int32(symbol="Hkv")
    batch = cute.sym_int32(symbol="B")
    vec = 128 // dtype.width

    def strided():
        return cute.sym_int64(divisibility=vec)

    fq = make_fake_tensor(dtype, (sq, D, hq, batch), (strided(), 1, strided(), strided()), assumed_align=16)
    fk = make_fake_tensor(dtype, (sk, D, hkv, batch), (strided(), 1, strided(), strided()), assumed_align=16)
    # V as the (D, Sk) N-major B operand of P V
    fv = make_fake_tensor(dtype, (D, sk, hkv, batch), (1, strided(), strided(), strided()), assumed_align=16)
    fo = make_fake_tensor(dtype, (sq, D, hq, batch), (strided(), 1, strided(), strided()), assumed_align=16)
    flse = make_fake_tensor(cutlass.Float32, (sq, hq, batch), (1, cute.sym_int64(), cute.sym_int64()),
                            assumed_align=4)
    frng = make_fake_tensor(cutlass.Int64, (2,), (1,), assumed_align=8)
    fake_args = (fq, fk, fv, fo, flse, cutlass.Float32(1.0), cutlass.Int32(0), cutlass.Int32(1), frng,
                 cutlass.Int64(0), cutlass.Int64(0), cutlass.Int32(0), cutlass.Float32(1.0), cutlass.Float32(1.0),
                 make_fake_stream())
    return launch, fake_args


def emit_registry(entries):
    """C++ source for cutegrad._C's table of exported attention forwards (kernels/cuda/attention_args.h).

    entries: [(AttentionFwdSpec, path of its exported header)].  Each entry gets a
    loader and a launcher that fills the header's tensor structs: the dynamic
    extents and strides of q (Sq, Hq, B), k and v (Sk, Hkv, B), O (Sq, Hq, B)
    and LSE (Sq, Hq, B), in the order of build_kernel's fake tensors, and the
    dropout arguments (ignored by the kernels built without dropout)."""
    dt = {"bf16": 0, "fp16": 1}
    out = [
        "// Generated by kernels/cute/aot.py from kernels/cute/attention_fwd.py; do not edit.",
        "#include <cuda_runtime.h>",
        "#include \"attention_args.h\"",
        "static int* g_attention_fwd_load_error;",
        "#define CUTE_DSL_CUDA_ERROR_CHECK(err) do { cudaError_t e_ = (err); "
        "if (e_ != cudaSuccess && *g_attention_fwd_load_error == 0) *g_attention_fwd_load_error = (int)e_; } while (0)",
    ]
    out += [f'#include "{header}"' for _, header in entries]
    out.append("namespace cutegrad {")
    table = []
    for i, (s, _) in enumerate(entries):
        n = s.name
        out.append(f"static {n}_Kernel_Module_t attn_fwd_mod_{i};")
        out.append(f"static void attn_fwd_load_{i}(int* err) {{ g_attention_fwd_load_error = err; "
                   f"{n}_Kernel_Module_Load(&attn_fwd_mod_{i}); }}")
        out.append(
            f"static int attn_fwd_launch_{i}(const AttentionFwdArgs& a, void* stream) {{\n"
            f"  int32_t Sq = a.sq, Sk = a.sk, Hq = a.hq, Hkv = a.hkv, B = a.batch;\n"
            f"  {n}_Tensor_mQ_t q{{const_cast<void*>(a.q), {{Sq, Hq, B}}, {{a.q_ss, a.q_sh, a.q_sb}}}};\n"
            f"  {n}_Tensor_mK_t k{{const_cast<void*>(a.k), {{Sk, Hkv, B}}, {{a.k_ss, a.k_sh, a.k_sb}}}};\n"
            f"  {n}_Tensor_mV_t v{{const_cast<void*>(a.v), {{Sk, Hkv, B}}, {{a.v_ss, a.v_sh, a.v_sb}}}};\n"
            f"  int64_t os = (int64_t)Hq * a.head_dim;\n"
            f"  {n}_Tensor_mO_t o{{a.o, {{Sq, Hq, B}}, {{os, (int64_t)a.head_dim, os * Sq}}}};\n"
            f"  {n}_Tensor_mLSE_t lse{{a.lse, {{Sq, Hq, B}}, {{(int64_t)Sq, (int64_t)Sq * Hq}}}};\n"
            f"  // without a device-memory Philox state the kernel never reads rng: any valid pointer serves\n"
            f"  {n}_Tensor_mRng_t rng{{a.rng_state ? a.rng_state : a.lse}};\n"
            f"  return cute_dsl_{n}_wrapper(&attn_fwd_mod_{i}, &q, &k, &v, &o, &lse, a.scale_log2, a.causal ? 1 : 0,"
            f" Hq / Hkv, &rng, a.rng_seed, a.rng_offset, a.rng_state ? 1 : 0, a.keep_scaled, a.rp_keep,"
            f" (cudaStream_t)stream);\n"
            f"}}"
        )
        flags = ", ".join("true" if f else "false" for f in (s.dropout, s.short))
        table.append(f'  {{"{n}", {dt[s.dtype]}, {s.head_dim}, {flags}, {int(s.arch[3:5])}, attn_fwd_load_{i}, '
                     f"attn_fwd_launch_{i}}},")
    out.append("extern const AttentionFwdKernelEntry kAttentionFwdKernels[] = {")
    out += table
    if not table:
        out.append('  {"", 0, 0, false, false, -1, nullptr, nullptr},')
    out.append("};")
    out.append(f"extern const int kNumAttentionFwdKernels = {len(table)};")
    out.append("}  // namespace cutegrad")
    return "\n".join(out) + "\n"
