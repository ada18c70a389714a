"""Hopper (sm_90a) GEMM written in CuTeDSL, compiled ahead of time.

Computes, for every batch index l,

    D[l] = epilogue(A[l] @ B[l]^T (+ D[l] when accumulating))

where A is (M, K), B is (N, K) (so B^T is the usual K x N right operand) and D
is (M, N) row-major.  A may be K-major (row-major A) or M-major (a transposed
view); B may be K-major (PyTorch's Linear weight layout) or N-major (a
row-major K x N matrix).  These four layouts cover a Linear's forward
(x @ W^T: A K-major, B K-major), its input gradient (dY @ W: A K-major,
B N-major) and its weight gradient (dY^T @ X: A M-major, B N-major) with no
transpose copies.

Design
------
* Warp specialization: one producer warpgroup (only its first warp issues
  TMA) and two consumer warpgroups that split the CTA tile along M (each owns
  64 rows).  The producer gives registers away (setmaxnreg 40) and the
  consumers take them (232), which is what lets a 128x256 fp32 accumulator
  (128 registers per consumer thread) live without spilling.
* Mainloop: TMA loads of A and B K-blocks (64 wide) into a multi-stage
  shared-memory ring (as many stages as fit next to the epilogue buffers),
  full/empty mbarriers per stage (PipelineTmaAsync).  Consumers issue wgmma
  over the four 16-wide K slices of a stage, keep one wgmma batch in flight
  and free a stage only when the batch that read it has retired.
* Persistent scheduling: the grid is min(#tiles, #SMs) CTAs; each walks the
  linear tile index space with stride gridDim.x.  Tiles are rasterized in
  groups of GROUP_M row-tiles so CTAs that run together share A and B panels
  in L2.  The batch index is the slowest coordinate.
* Epilogue: the fp32 accumulator is transformed in registers (optional + D
  read back for beta=1, + bias[n], GELU(tanh), GELU-backward that
  multiplies by gelu'(pre-activation[m, n]), + residual[m, n] last), converted
  to the output dtype, staged through swizzled shared memory in 32-column
  slices and written with TMA stores (which clip partial tiles, so M and N
  need no padding).  A ring of epi_stages slice buffers with one TMA commit
  group per buffer lets the stores of the last buffers run while the next
  slice is staged.
  bias_gelu_aux has a second output, stored the same way: the registers keep
  A @ B + bias; per slice the pre-activation rounded to the output dtype is
  staged and TMA-stored to aux (a store descriptor of its own), then GELU of
  that rounded value (what the backward reads back from aux) is staged and
  stored to D.  Both take buffers of the same ring, one after the other, so
  aux costs no mainloop stage (see Shared memory).
  Narrow tiles (128x16/32/64, for classifier heads with N = 10 or 36) skip
  the shared-memory staging and write D from registers with predicated
  per-element stores, because rows of 10 or 36 half-precision values are not
  16-byte multiples and TMA cannot address them.
  Out-of-range reads of bias / pre-activation are clamped to the last valid
  index; the values they produce land only in rows/columns TMA clips.
* TMA zero-fills out-of-bounds loads, so a K that is not a multiple of 64
  needs no special case.

Shared memory
-------------
SMEM_BYTES (232448, the sm_90 opt-in maximum) less 1024 bytes (mbarriers,
alignment) holds the epilogue ring, 128x32 slices: 4 x 8 KiB for 16-bit
outputs, 2 x 16 KiB for fp32, 32 KiB either way; the mainloop stages fill the
rest: ab_stages = 4 for 128x256 tiles (48 KiB a stage), 6 for 128x128 (32 KiB),
for 16-bit and TF32 operands alike, with 2 KiB to spare in every case.  A
separate ring for aux would have cost a stage (4 -> 3, 6 -> 5), so
bias_gelu_aux shares D's ring: its epilogue issues twice the TMA stores of
bias_gelu through the same buffers and has the same ab_stages.

Constraints (checked in C++ before launch, otherwise the SIMT fallback runs)
----------------------------------------------------------------------------
* every non-unit stride and every base pointer 16-byte aligned; the
  contiguous dimension has stride 1;
* every contiguous extent (K or M of A, K or N of B, N of D; N of D not for
  the narrow tiles) a multiple of 16 bytes: on an H100, D with N = 127 inside a padded buffer had its padding
  columns overwritten, so such shapes take the fallback;
* bias_gelu_aux: aux (TMA-stored like D) has a 16-byte aligned base, row
  stride and batch stride (its extents are D's);
* operand dtypes equal (bf16 or fp16); output dtype = input dtype or fp32;
  bias and pre-activation tensors have the output dtype;
* tf32 specializations: fp32 operands in memory, both K-major (PTX allows
  the wgmma transpose bits for 16-bit types only), fp32 output.

TF32
----
The "high" float32 matmul precision multiplies fp32 operands on TF32 tensor
cores (``wgmma.mma_async.m64nNk8.f32.tf32.tf32``, SASS ``HGMMA.64xNx8.F32.TF32``).
The operand tensors are typed TFloat32 (fp32 in memory; the TMA descriptors
carry the tfloat32 data type) and the MMA reads them as TF32: 10 of the 23
mantissa bits take part (whether they are rounded or truncated is for the GPU
run to show; the tests bound the error by 2^-9 relative either way).  A pipeline stage holds
32 K values (128 bytes per row, one 128-byte swizzle atom), so a stage moves
as many bytes as a 16-bit stage of 64.  CuTeDSL 4.8.1 has no public TF32
warpgroup op (``cute.nvgpu.warpgroup.MmaF16BF16Op`` checks for 16-bit types,
``utils.hopper_helpers.make_trivial_tiled_mma`` has no TF32 branch); its
dialect's ``MmaAtomSM90Type`` does take TF32, and ``_tf32_tiled_mma`` builds
the atom from it.

Split-K lives outside the kernel: kernels/cuda/module.cpp runs K-slices as a
batch through an fp32-output specialization and reduces them in CUDA C++
(with the data-parallel + split-K hybrid for a wave tail, see plan_split).

Specializations
---------------
``SPECS`` (built by ``specializations()``) is the list the AOT build compiles:
for bf16 and fp16 inputs, each of the four operand layouts, tiles 128x256 and
128x128, epilogues none / accumulate (beta=1) with the input dtype as output,
none / accumulate with fp32 output (gradient accumulation into fp32), and on
the forward layout (A K-major, B K-major) the epilogues of a fused Linear
(bias, gelu, bias_gelu, residual, bias_residual, bias_gelu_aux), on the
input-gradient layout (A K-major, B N-major) the gelu_bwd epilogue, the
residual epilogues also with fp32 output (an fp32 residual stream under
autocast), bf16 -> fp32 bias / bias_gelu_aux / gelu_bwd (fp32 layers at the
"medium" and "high" float32 matmul precisions), and the narrow 128x16 / 128x32 / 128x64 tiles on the forward layout
with the none and bias epilogues, and the nine ``TF32_SPECS`` (tf32 -> fp32,
forward layout): 127 in all.  Each spec's ``name`` is the C symbol prefix the build exports.
"""

import math
from dataclasses import dataclass

# Order = the codes of Epilogue in kernels/cuda/gemm_args.h and cutegrad._gemm.
EPILOGUES = ("none", "bias", "gelu", "bias_gelu", "gelu_bwd", "residual", "bias_residual", "bias_gelu_aux")
# Epilogues of a Linear forward (A K-major, B K-major), each with the input dtype as output.
FORWARD_EPILOGUES = ("bias", "gelu", "bias_gelu", "residual", "bias_residual", "bias_gelu_aux")
TILES = ((128, 256), (128, 128))
# Narrow tiles for classifier heads (N = 10, 36): their D rows are not 16-byte
# multiples, so these write D with predicated per-element stores, not TMA.
NARROW_TILES = ((128, 16), (128, 32), (128, 64))
NARROW_EPILOGUES = ("none", "bias")
# TF32 specializations (tile_m, tile_n, epilogue, accumulate): every epilogue a fused Linear
# uses on 128x128 tiles, the plain GEMM and the bias forward also on 128x256.  A call whose
# heuristic tile has no TF32 specialization takes the 128x128 one (kernels/cuda/module.cpp).
TF32_SPECS = (
    (128, 256, "none", False), (128, 256, "bias", False),
    (128, 128, "none", False), (128, 128, "none", True), (128, 128, "bias", False),
    (128, 128, "bias_gelu_aux", False), (128, 128, "residual", False), (128, 128, "bias_residual", False),
    (128, 128, "gelu_bwd", False),
)
GROUP_M = 8
K_BLOCK = 64
SMEM_BYTES = 232448  # sm_90 opt-in maximum per block


@dataclass(frozen=True)
class GemmSpec:
    """One AOT specialization; every field is baked into the compiled kernel."""

    ab_dtype: str  # "bf16" | "fp16" | "tf32" (fp32 in memory, TF32 tensor-core products)
    out_dtype: str  # "bf16" | "fp16" | "fp32"
    a_major: str  # "k" | "m"
    b_major: str  # "k" | "n"
    tile_m: int
    tile_n: int
    epilogue: str  # one of EPILOGUES
    accumulate: bool  # D = epilogue(A @ B^T + D)
    arch: str = "sm_90a"

    @property
    def name(self) -> str:
        acc = "_acc" if self.accumulate else ""
        return (
            f"gemm_{self.arch}_{self.ab_dtype}_{self.out_dtype}_a{self.a_major}"
            f"_b{self.b_major}_{self.tile_m}x{self.tile_n}_{self.epilogue}{acc}"
        )


def specializations(archs=("sm_90a",)):
    specs = []
    for arch in archs:
        if arch != "sm_90a":
            # wgmma exists only on sm_90a; other targets use the CUDA C++ kernels.
            continue
        for ab in ("bf16", "fp16"):
            for a_major in ("k", "m"):
                for b_major in ("k", "n"):
                    for tm, tn in TILES:
                        for out in (ab, "fp32"):
                            for acc in (False, True):
                                specs.append(GemmSpec(ab, out, a_major, b_major, tm, tn, "none", acc, arch))
                        if a_major == "k" and b_major == "k":
                            for epi in FORWARD_EPILOGUES:
                                specs.append(GemmSpec(ab, ab, a_major, b_major, tm, tn, epi, False, arch))
                            # an fp32 residual stream (autocast) takes the bf16 GEMM's sum in fp32;
                            # fp32 layers at the "medium"/"high" matmul precision run bf16 products
                            # into fp32 outputs
                            fp32_out = ("residual", "bias_residual") + (("bias", "bias_gelu_aux") if ab == "bf16" else ())
                            for epi in fp32_out:
                                specs.append(GemmSpec(ab, "fp32", a_major, b_major, tm, tn, epi, False, arch))
                        if a_major == "k" and b_major == "n":
                            for out in (ab, "fp32") if ab == "bf16" else (ab,):
                                specs.append(GemmSpec(ab, out, a_major, b_major, tm, tn, "gelu_bwd", False, arch))
            for tm, tn in NARROW_TILES:
                for epi in NARROW_EPILOGUES:
                    specs.append(GemmSpec(ab, ab, "k", "k", tm, tn, epi, False, arch))
        # fp32 operands on TF32 tensor cores ("high" float32 matmul precision): both operands
        # K-major (the backend copies an MN-major operand), fp32 output.
        for tm, tn, epi, acc in TF32_SPECS:
            specs.append(GemmSpec("tf32", "fp32", "k", "k", tm, tn, epi, acc, arch))
    return specs


SPECS = specializations()


def _cutlass_dtype(cutlass, name):
    return {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16, "fp32": cutlass.Float32, "tf32": cutlass.TFloat32}[name]


def k_block(ab_dtype: str) -> int:
    """K extent of one pipeline stage: 128 bytes of each operand row (one 128-byte swizzle atom)."""
    return 32 if ab_dtype == "tf32" else K_BLOCK


def _tf32_tiled_mma(tile_n):
    """Warpgroup MMA with TF32 operands read from shared memory (``wgmma.mma_async
    .m64nNk8.f32.tf32.tf32``), two atoms along M as the 16-bit path uses.

    CuTeDSL 4.8.1's public ``warpgroup.MmaF16BF16Op`` accepts only 16-bit operands and
    ``make_trivial_tiled_mma`` has no TF32 branch, but the SM90 MMA atom type of the
    cute_nvgpu dialect it builds (``MmaAtomSM90Type``) takes any element types; TF32
    needs K = 8 per instruction and both operands K-major (PTX allows the transpose
    bits only for 16-bit types)."""
    import cutlass
    import cutlass._mlir.dialects.cute_nvgpu as cute_nvgpu_ir
    import cutlass.cute as cute
    from cutlass.cute.atom import make_atom
    from cutlass.cute.core import _pack_shape
    from cutlass.cute.nvgpu import OperandMajorMode
    from cutlass.cute.nvgpu.warpgroup import MmaF16BF16Trait, MmaOp, OperandSource

    class MmaTF32Op(MmaOp):
        descriptive_name = "warpgroup TF32 MMA Operation"

        def _make_trait(self, *, loc=None, ip=None, **kwargs):
            ty = cute_nvgpu_ir.MmaAtomSM90Type.get(
                _pack_shape(self.shape_mnk, loc=loc, ip=ip).type.attribute,
                self.a_major_mode._to_ir(),
                self.b_major_mode._to_ir(),
                self.a_dtype.mlir_type,
                self.b_dtype.mlir_type,
                self.acc_dtype.mlir_type,
                self.a_src._to_ir(),
            )
            # The trait class only carries the accumulate field, which every SM90 atom has.
            return MmaF16BF16Trait(make_atom(ty, [cutlass.Boolean(False).ir_value(loc=loc, ip=ip)], loc=loc, ip=ip))

    op = MmaTF32Op(
        cutlass.TFloat32, cutlass.TFloat32, cutlass.Float32, (64, tile_n, 8),
        OperandSource.SMEM, OperandMajorMode.K, OperandMajorMode.K,
    )
    return cute.make_tiled_mma(cute.make_mma_atom(op), (2, 1, 1))


def build_kernel(spec: GemmSpec):
    """Return (jit_function, fake_args) for cute.compile.  Imports the DSL lazily:
    the caller must have set CUTE_DSL_ARCH before the first cutlass import."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    import cutlass.pipeline as pipeline
    import cutlass.utils as utils
    import cutlass.utils.hopper_helpers as sm90
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    ab_dtype = _cutlass_dtype(cutlass, spec.ab_dtype)
    out_dtype = _cutlass_dtype(cutlass, spec.out_dtype)
    acc_dtype = cutlass.Float32
    tile_m, tile_n, tile_k = spec.tile_m, spec.tile_n, k_block(spec.ab_dtype)
    epilogue = spec.epilogue
    accumulate = spec.accumulate
    use_bias = epilogue in ("bias", "bias_gelu", "bias_residual", "bias_gelu_aux")
    use_gelu = epilogue in ("gelu", "bias_gelu", "bias_gelu_aux")
    use_gelu_bwd = epilogue == "gelu_bwd"
    use_residual = epilogue in ("residual", "bias_residual")
    store_preact = epilogue == "bias_gelu_aux"
    direct_store = tile_n < 128  # narrow tiles: D written from registers, no TMA descriptor for it

    consumer_wgs = 2
    threads_per_wg = 128
    consumer_threads = consumer_wgs * threads_per_wg
    threads = threads_per_wg * (1 + consumer_wgs)
    producer_regs, consumer_regs = 40, 232
    epi_tile = (tile_m, 32)
    epi_stages = 4 if out_dtype.width == 16 else 2
    ab_stage_bytes = (tile_m + tile_n) * tile_k * ab_dtype.width // 8
    epi_bytes = epi_tile[0] * epi_tile[1] * out_dtype.width // 8 * epi_stages
    ab_stages = (SMEM_BYTES - 1024 - epi_bytes) // ab_stage_bytes
    gelu_k0 = math.sqrt(2.0 / math.pi)
    gelu_k1 = 0.044715
    assert not (store_preact and direct_store), "the narrow tiles have no pre-activation store"

    def gelu(v):
        # tanh GELU of one fp32 value, traced inline where the kernel calls it.
        inner = gelu_k0 * (v + gelu_k1 * v * v * v)
        return 0.5 * v * (1.0 + cute.math.tanh(inner, fastmath=True))

    a_layout_enum = utils.LayoutEnum.ROW_MAJOR if spec.a_major == "k" else utils.LayoutEnum.COL_MAJOR
    b_layout_enum = utils.LayoutEnum.ROW_MAJOR if spec.b_major == "k" else utils.LayoutEnum.COL_MAJOR
    c_layout_enum = utils.LayoutEnum.ROW_MAJOR

    @cute.kernel
    def kernel(
        tma_a: cute.CopyAtom,
        gA_tma: cute.Tensor,
        tma_b: cute.CopyAtom,
        gB_tma: cute.Tensor,
        tma_c: cute.CopyAtom,
        gC_tma: cute.Tensor,
        tma_aux: cute.CopyAtom,
        gAux_tma: cute.Tensor,
        mC: cute.Tensor,
        mBias: cute.Tensor,
        mAux: cute.Tensor,
        tiled_mma: cute.TiledMma,
        a_smem_staged: cute.ComposedLayout,
        b_smem_staged: cute.ComposedLayout,
        c_smem_staged: cute.ComposedLayout,
        tiles_m: cutlass.Int32,
        tiles_n: cutlass.Int32,
        total_tiles: cutlass.Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // threads_per_wg)

        if warp == 0:
            cute.nvgpu.cpasync.prefetch_descriptor(tma_a)
            cute.nvgpu.cpasync.prefetch_descriptor(tma_b)
            if cutlass.const_expr(not direct_store):
                cute.nvgpu.cpasync.prefetch_descriptor(tma_c)
            if cutlass.const_expr(store_preact):
                cute.nvgpu.cpasync.prefetch_descriptor(tma_aux)

        a_smem = cute.slice_(a_smem_staged, (None, None, 0))
        b_smem = cute.slice_(b_smem_staged, (None, None, 0))
        stage_tx_bytes = cute.size_in_bytes(ab_dtype, a_smem) + cute.size_in_bytes(ab_dtype, b_smem)

        @cute.struct
        class Storage:
            barriers: cute.struct.MemRange[cutlass.Int64, ab_stages * 2]
            sA: cute.struct.Align[cute.struct.MemRange[ab_dtype, cute.cosize(a_smem_staged)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[ab_dtype, cute.cosize(b_smem_staged)], 1024]
            sC: cute.struct.Align[cute.struct.MemRange[out_dtype, cute.cosize(c_smem_staged)], 1024]

        storage = utils.SmemAllocator().allocate(Storage)

        # One arrival per consumer warp frees a stage (no cluster multicast).
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.barriers.data_ptr(),
            num_stages=ab_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, consumer_wgs * 4),
            tx_count=stage_tx_bytes,
            cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
        )

        sA = storage.sA.get_tensor(a_smem_staged.outer, swizzle=a_smem_staged.inner)
        sB = storage.sB.get_tensor(b_smem_staged.outer, swizzle=b_smem_staged.inner)
        sC = storage.sC.get_tensor(c_smem_staged.outer, swizzle=c_smem_staged.inner)

        # (bM, bK, tiles_m, tiles_k, L) etc.
        gA = cute.local_tile(gA_tma, (tile_m, tile_k), (None, None, None))
        gB = cute.local_tile(gB_tma, (tile_n, tile_k), (None, None, None))
        if cutlass.const_expr(not direct_store):
            gC = cute.local_tile(gC_tma, (tile_m, tile_n), (None, None, None))
        if cutlass.const_expr(store_preact):
            gAux = cute.local_tile(gAux_tma, (tile_m, tile_n), (None, None, None))
        k_tiles = cute.size(gA, mode=[3])

        tAsA, tAgA = cute.nvgpu.cpasync.tma_partition(
            tma_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2)
        )
        tBsB, tBgB = cute.nvgpu.cpasync.tma_partition(
            tma_b, 0, cute.make_layout(1), cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2)
        )

        m_extent = mC.shape[0]
        n_extent = mC.shape[1]
        tiles_mn = tiles_m * tiles_n
        group_span = GROUP_M * tiles_n

        cute.arch.sync_threads()

        if wg == 0:
            cute.arch.setmaxregister_decrease(producer_regs)
            if warp == 0:
                prod = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, ab_stages)
                tile = bidx
                while tile < total_tiles:
                    l_idx = tile // tiles_mn
                    rest = tile - l_idx * tiles_mn
                    group = rest // group_span
                    first_m = group * GROUP_M
                    rows = cutlass.min(tiles_m - first_m, GROUP_M)
                    in_group = rest - group * group_span
                    m_idx = first_m + in_group % rows
                    n_idx = in_group // rows
                    tAgA_t = tAgA[(None, m_idx, None, l_idx)]
                    tBgB_t = tBgB[(None, n_idx, None, l_idx)]
                    for kt in range(k_tiles):
                        mainloop.producer_acquire(prod)
                        bar = mainloop.producer_get_barrier(prod)
                        cute.copy(tma_a, tAgA_t[(None, kt)], tAsA[(None, prod.index)], tma_bar_ptr=bar)
                        cute.copy(tma_b, tBgB_t[(None, kt)], tBsB[(None, prod.index)], tma_bar_ptr=bar)
                        mainloop.producer_commit(prod)
                        prod.advance()
                    tile += gdim
                mainloop.producer_tail(prod)
        else:
            cute.arch.setmaxregister_increase(consumer_regs)
            ctid = tidx - threads_per_wg
            # wgmma operands are described per warpgroup; the accumulator is per thread.
            wg_mma = tiled_mma.get_slice((wg - 1) * threads_per_wg)
            tCsA = wg_mma.partition_A(sA)
            tCsB = wg_mma.partition_B(sB)
            tCrA = tiled_mma.make_fragment_A(tCsA)
            tCrB = tiled_mma.make_fragment_B(tCsB)
            thr_mma = tiled_mma.get_slice(ctid)
            tCcC = thr_mma.partition_C(cute.make_identity_tensor((tile_m, tile_n)))
            acc = cute.make_rmem_tensor(tCcC.shape, acc_dtype)
            k_slices = cute.size(tCrA, mode=[2])

            if cutlass.const_expr(not direct_store):
                # The stmatrix atom fixes the thread/value order of the epilogue
                # slices for every output dtype (the accumulator is copied slice by
                # slice in that order below); 32-bit outputs then store with plain
                # shared-memory stores over that same layout.
                store_atom = sm90.get_smem_store_op(c_layout_enum, out_dtype, acc_dtype)
                c_atom = cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(False, 4), out_dtype)
                r2s = cute.make_tiled_copy_S(store_atom, cute.make_tiled_copy_C_atom(c_atom, tiled_mma))
                thr_r2s = r2s.get_slice(ctid)
                tRS_sC = thr_r2s.partition_D(sC)
                tRS_acc = r2s.retile(acc)
                frag_shape = cute.shape(thr_r2s.partition_S(sC))[:3]
                frag_acc = cute.make_rmem_tensor(frag_shape, acc_dtype)
                frag_out = cute.make_rmem_tensor(frag_shape, out_dtype)
                frag_size = cute.size(frag_acc)

                store_pipe = pipeline.PipelineTmaStore.create(
                    num_stages=epi_stages,
                    producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, consumer_threads),
                )
                epi_barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=consumer_threads)
            cons = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, ab_stages)
            release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, ab_stages)
            epi_count = cutlass.Int32(0)

            tile = bidx
            while tile < total_tiles:
                l_idx = tile // tiles_mn
                rest = tile - l_idx * tiles_mn
                group = rest // group_span
                first_m = group * GROUP_M
                rows = cutlass.min(tiles_m - first_m, GROUP_M)
                in_group = rest - group * group_span
                m_idx = first_m + in_group % rows
                n_idx = in_group // rows

                acc.fill(0.0)
                tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                cute.nvgpu.warpgroup.fence()
                for kt in range(k_tiles):
                    mainloop.consumer_wait(cons)
                    for ks in cutlass.range_constexpr(k_slices):
                        coord = (None, None, ks, cons.index)
                        cute.gemm(tiled_mma, acc, tCrA[coord], tCrB[coord], acc)
                    cute.nvgpu.warpgroup.commit_group()
                    # Keep this stage's wgmma in flight; the previous one has retired.
                    cute.nvgpu.warpgroup.wait_group(1)
                    if kt > 0:
                        mainloop.consumer_release(release)
                        release.advance()
                    cons.advance()
                cute.nvgpu.warpgroup.wait_group(0)
                if k_tiles > 0:
                    mainloop.consumer_release(release)
                    release.advance()

                # Register epilogue on the whole accumulator.
                m_base = m_idx * tile_m
                n_base = n_idx * tile_n
                if cutlass.const_expr(accumulate or use_bias or use_gelu or use_gelu_bwd or use_residual):
                    for i in cutlass.range_constexpr(cute.size(acc)):
                        crd = tCcC[i]
                        gm = cutlass.min(m_base + crd[0], m_extent - 1)
                        gn = cutlass.min(n_base + crd[1], n_extent - 1)
                        v = acc[i]
                        if cutlass.const_expr(accumulate):
                            v = v + mC[(gm, gn, l_idx)].to(acc_dtype)
                        if cutlass.const_expr(use_bias):
                            v = v + mBias[gn].to(acc_dtype)
                        if cutlass.const_expr(use_gelu and not store_preact):
                            v = gelu(v)
                        if cutlass.const_expr(use_gelu_bwd):
                            x = mAux[(gm, gn, l_idx)].to(acc_dtype)
                            t = cute.math.tanh(gelu_k0 * (x + gelu_k1 * x * x * x), fastmath=True)
                            dinner = gelu_k0 * (1.0 + 3.0 * gelu_k1 * x * x)
                            v = v * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner)
                        if cutlass.const_expr(use_residual):
                            v = v + mAux[(gm, gn, l_idx)].to(acc_dtype)
                        acc[i] = v

                if cutlass.const_expr(direct_store):
                    for i in cutlass.range_constexpr(cute.size(acc)):
                        crd = tCcC[i]
                        if m_base + crd[0] < m_extent:
                            if n_base + crd[1] < n_extent:
                                mC[(m_base + crd[0], n_base + crd[1], l_idx)] = acc[i].to(out_dtype)
                else:
                    gC_t = gC[(None, None, m_idx, n_idx, l_idx)]
                    gC_epi = cute.zipped_divide(gC_t, epi_tile)
                    bSG_sC, bSG_gC = cute.nvgpu.cpasync.tma_partition(
                        tma_c, 0, cute.make_layout(1), cute.group_modes(sC, 0, 2), gC_epi
                    )
                    if cutlass.const_expr(store_preact):
                        gAux_epi = cute.zipped_divide(gAux[(None, None, m_idx, n_idx, l_idx)], epi_tile)
                        bSG_sAux, bSG_gAux = cute.nvgpu.cpasync.tma_partition(
                            tma_aux, 0, cute.make_layout(1), cute.group_modes(sC, 0, 2), gAux_epi
                        )
                    epi_n = cute.size(gC_epi, mode=[1])
                    epi_shape = gC_epi.shape[1]
                    epi_order = cute.make_layout(epi_shape, stride=(epi_shape[1], 1))
                    for e in cutlass.range_constexpr(epi_n):
                        for j in cutlass.range_constexpr(frag_size):
                            frag_acc[j] = tRS_acc[e * frag_size + j]
                        frag_out.store(frag_acc.load().to(out_dtype))
                        # bias_gelu_aux stages each slice twice through the same buffer ring:
                        # first the rounded pre-activation for aux, then D = GELU of that
                        # rounded value (the value the backward reads from aux).
                        for o in cutlass.range_constexpr(2 if store_preact else 1):
                            if cutlass.const_expr(store_preact and o == 1):
                                for j in cutlass.range_constexpr(frag_size):
                                    frag_acc[j] = gelu(frag_out[j].to(acc_dtype))
                                frag_out.store(frag_acc.load().to(out_dtype))
                            buf = epi_count % epi_stages
                            cute.copy(r2s, frag_out, tRS_sC[(None, None, None, buf)])
                            # Make the generic-proxy smem writes visible to the TMA engine.
                            cute.arch.fence_proxy("async.shared", space="cta")
                            epi_barrier.arrive_and_wait()
                            if warp == 4:
                                if cutlass.const_expr(store_preact and o == 0):
                                    cute.copy(tma_aux, bSG_sAux[(None, buf)], bSG_gAux[(None, epi_order.get_hier_coord(e))])
                                else:
                                    cute.copy(tma_c, bSG_sC[(None, buf)], bSG_gC[(None, epi_order.get_hier_coord(e))])
                                # One commit group per buffer: acquire waits until the oldest of the
                                # epi_stages buffers has been read, the one the next store fills.
                                store_pipe.producer_commit()
                                store_pipe.producer_acquire()
                            epi_barrier.arrive_and_wait()
                            epi_count += 1
                tile += gdim
            if cutlass.const_expr(not direct_store):
                if warp == 4:
                    store_pipe.producer_tail()

    @cute.jit
    def launch(
        mA: cute.Tensor,
        mB: cute.Tensor,
        mC: cute.Tensor,
        mBias: cute.Tensor,
        mAux: cute.Tensor,
        max_ctas: cutlass.Int32,
        stream: cuda.CUstream,
    ):
        if cutlass.const_expr(spec.ab_dtype == "tf32"):
            mma = _tf32_tiled_mma(tile_n)
        else:
            mma = sm90.make_trivial_tiled_mma(
                ab_dtype,
                ab_dtype,
                a_layout_enum.sm90_mma_major_mode(),
                b_layout_enum.sm90_mma_major_mode(),
                acc_dtype,
                (2, 1, 1),
                tiler_mn=(64, tile_n),
            )
        tile_mnk = (tile_m, tile_n, tile_k)
        a_staged = sm90.make_smem_layout_a(a_layout_enum, tile_mnk, ab_dtype, ab_stages)
        b_staged = sm90.make_smem_layout_b(b_layout_enum, tile_mnk, ab_dtype, ab_stages)
        c_staged = sm90.make_smem_layout_epi(out_dtype, c_layout_enum, epi_tile, epi_stages)
        tma_a, gA_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(
            cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp(),
            mA,
            cute.slice_(a_staged, (None, None, 0)),
            (tile_m, tile_k),
        )
        tma_b, gB_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(
            cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp(),
            mB,
            cute.slice_(b_staged, (None, None, 0)),
            (tile_n, tile_k),
        )
        if cutlass.const_expr(direct_store):
            tma_c, gC_tma = tma_a, gA_tma  # placeholders: the kernel never touches them
        else:
            tma_c, gC_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(
                cute.nvgpu.cpasync.CopyBulkTensorTileS2GOp(),
                mC,
                cute.slice_(c_staged, (None, None, 0)),
                epi_tile,
            )
        if cutlass.const_expr(store_preact):
            tma_aux, gAux_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(
                cute.nvgpu.cpasync.CopyBulkTensorTileS2GOp(),
                mAux,
                cute.slice_(c_staged, (None, None, 0)),
                epi_tile,
            )
        else:
            tma_aux, gAux_tma = tma_a, gA_tma  # placeholders: aux is read (or unused), never TMA-stored
        tiles_m = (mC.shape[0] + tile_m - 1) // tile_m
        tiles_n = (mC.shape[1] + tile_n - 1) // tile_n
        total = tiles_m * tiles_n * mC.shape[2]
        grid_x = cutlass.min(total, max_ctas)
        kernel(
            tma_a, gA_tma, tma_b, gB_tma, tma_c, gC_tma, tma_aux, gAux_tma, mC, mBias, mAux, mma,
            a_staged, b_staged, c_staged, tiles_m, tiles_n, total,
        ).launch(grid=[grid_x, 1, 1], block=[threads, 1, 1], min_blocks_per_mp=1, stream=stream)

    # Fake arguments: dynamic extents and strides, 16-byte alignment promised
    # (the C++ launcher checks it).  A shared symbol ties equal extents together.
    m = cute.sym_int32(symbol="M")
    n = cute.sym_int32(symbol="N")
    k = cute.sym_int32(symbol="K")
    batch = cute.sym_int32(symbol="L")
    ab_vec = 128 // ab_dtype.width
    out_vec = 128 // out_dtype.width

    def operand(rows, major_is_k, vec):
        ld = cute.sym_int64(divisibility=vec)
        bs = cute.sym_int64(divisibility=vec)
        stride = (ld, 1, bs) if major_is_k else (1, ld, bs)
        return make_fake_tensor(ab_dtype, (rows, k, batch), stride, assumed_align=16)

    fa = operand(m, spec.a_major == "k", ab_vec)
    fb = operand(n, spec.b_major == "k", ab_vec)
    # Narrow tiles take any D row stride (N = 10 rows are 20 bytes); TMA needs 16-byte ones.
    d_vec = 1 if direct_store else out_vec
    fc = make_fake_tensor(
        out_dtype, (m, n, batch), (cute.sym_int64(divisibility=d_vec), 1, cute.sym_int64(divisibility=d_vec)),
        assumed_align=16,
    )
    fbias = make_fake_tensor(out_dtype, (cute.sym_int32(),), (1,), assumed_align=16)
    if store_preact:
        # aux is TMA-stored like D: D's extents, 16-byte row and batch strides (checked in C++).
        faux = make_fake_tensor(
            out_dtype, (m, n, batch), (cute.sym_int64(divisibility=out_vec), 1, cute.sym_int64(divisibility=out_vec)),
            assumed_align=16,
        )
    else:
        faux = make_fake_tensor(
            out_dtype, (cute.sym_int32(), cute.sym_int32(), cute.sym_int32()),
            (cute.sym_int64(), 1, cute.sym_int64()), assumed_align=16,
        )
    fake_args = (fa, fb, fc, fbias, faux, cutlass.Int32(132), make_fake_stream())
    return launch, fake_args


def emit_registry(entries):
    """C++ source for cutegrad._C's table of exported GEMMs (kernels/cuda/gemm_args.h).

    entries: [(GemmSpec, path of its exported header)].  Each entry gets a
    loader and a launcher that fills the header's tensor structs: extents
    (M, K, L) / (N, K, L) / (M, N, L) and the two dynamic strides of each
    operand (leading dimension, batch stride)."""
    dt = {"bf16": "DType::bf16", "fp16": "DType::fp16", "fp32": "DType::fp32", "tf32": "DType::tf32"}
    out = [
        "// Generated by kernels/cute/aot.py from kernels/cute/gemm.py; do not edit.",
        "#include <cuda_runtime.h>",
        "#include \"gemm_args.h\"",
        "static int* g_load_error;",
        "#define CUTE_DSL_CUDA_ERROR_CHECK(err) do { cudaError_t e_ = (err); "
        "if (e_ != cudaSuccess && *g_load_error == 0) *g_load_error = (int)e_; } while (0)",
    ]
    out += [f'#include "{header}"' for _, header in entries]
    out.append("namespace cutegrad {")
    table = []
    for i, (s, _) in enumerate(entries):
        n = s.name
        a_ld = "g.a_sm" if s.a_major == "k" else "g.a_sk"
        b_ld = "g.b_sn" if s.b_major == "k" else "g.b_sk"
        out.append(f"static {n}_Kernel_Module_t mod_{i};")
        out.append(f"static void load_{i}(int* err) {{ g_load_error = err; {n}_Kernel_Module_Load(&mod_{i}); }}")
        out.append(
            f"static int launch_{i}(const GemmArgs& g, void* stream) {{\n"
            f"  int32_t M = (int32_t)g.m, N = (int32_t)g.n, K = (int32_t)g.k, L = (int32_t)g.batch;\n"
            f"  void* d = g.d;\n"
            f"  {n}_Tensor_mA_t a{{const_cast<void*>(g.a), {{M, K, L}}, {{{a_ld}, g.a_sl}}}};\n"
            f"  {n}_Tensor_mB_t b{{const_cast<void*>(g.b), {{N, K, L}}, {{{b_ld}, g.b_sl}}}};\n"
            f"  {n}_Tensor_mC_t c{{d, {{M, N, L}}, {{g.d_sm, g.d_sl}}}};\n"
            f"  {n}_Tensor_mBias_t bias{{g.bias ? const_cast<void*>(g.bias) : d, {{N}}}};\n"
            f"  {n}_Tensor_mAux_t aux{{g.aux ? const_cast<void*>(g.aux) : d, {{M, N, L}},"
            f" {{g.aux ? g.aux_sm : g.d_sm, g.aux ? g.aux_sl : g.d_sl}}}};\n"
            f"  return cute_dsl_{n}_wrapper(&mod_{i}, &a, &b, &c, &bias, &aux, g.max_ctas, (cudaStream_t)stream);\n"
            f"}}"
        )
        sm = int(s.arch[3:5])
        table.append(
            f'  {{"{n}", {dt[s.ab_dtype]}, {dt[s.out_dtype]}, \'{s.a_major}\', \'{s.b_major}\', {s.tile_m}, '
            f"{s.tile_n}, Epilogue::{s.epilogue}, {'true' if s.accumulate else 'false'}, {sm}, load_{i}, launch_{i}}},"
        )
    out.append("extern const GemmKernelEntry kGemmKernels[] = {")
    out += table
    if not table:
        out.append('  {"", DType::bf16, DType::bf16, \'k\', \'k\', 0, 0, Epilogue::none, false, -1, nullptr, nullptr},')
    out.append("};")
    out.append(f"extern const int kNumGemmKernels = {len(table)};")
    out.append("}  // namespace cutegrad")
    return "\n".join(out) + "\n"
