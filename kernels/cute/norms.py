"""LayerNorm and RMSNorm with the residual add fused in, written in CuTeDSL and
compiled ahead of time (sm_90a, plain SIMT code: no tensor cores, no TMA).

Forward (``stage="fwd"``), one pass over HBM per row:

    s = x + residual            (or s = x when there is no residual)
    y = (s - mean(s)) * rstd * weight (+ bias)       LayerNorm
    y = s * rstd * weight                            RMSNorm

It writes s (the new residual, in the residual's dtype), y (in ``out_dtype``:
bf16 under autocast, so the next GEMM reads it with no cast kernel) and the
per-row fp32 statistics (mean and rstd; RMSNorm only rstd) the backward uses.

Backward (``stage="bwd"``), for dy (the gradient of y) and the optional dres
(the gradient that reached the new residual from later layers):

    xhat = (s - mean) * rstd,  g = dy * weight
    ds   = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dres
           (RMSNorm: no mean(g) term)

It writes ds in s's dtype (the residual's gradient) and, when the branch input
x has another dtype (bf16 x, fp32 residual under autocast), ds again in x's
dtype, so no cast kernel runs either.  dweight = sum over rows of dy * xhat and
dbias = sum of dy are reduced in the kernel: each CTA keeps its running sums
in registers over the rows it owns, combines its row slots through shared
memory and writes one fp32 partial row per CTA; ``stage="finish"`` (one small
launch, a thread per column) adds the G partial rows in CTA order.

Residual dropout (``p`` a runtime argument; p = 0 runs the same code with an
all-ones mask, so the values are today's): the forward of a specialization
with a residual computes

    s = residual + dropout(x)     dropout(x) = x * mask / (1 - p), rounded to x's dtype

and the backward of one with a second ds output (x's dtype differs from s's:
the autocast stream) writes d(x) = dx * mask / (1 - p), dx = ds rounded to x's
dtype and the product rounded again, exactly what the standalone dropout kernel
(kernels/cuda/dropout.cu) computes from the dx it would receive.  The keep mask
is that kernel's: element v = row * n + column of the launch is kept iff
unit(lane v % 4 of Philox4x32-10(seed, offset / 4 + v / 4)) < 1 - p, the
forward reserving n * rows values from the generator as the dropout op does,
the backward regenerating them from the same (seed, offset).  A thread's
16-byte vector covers whole groups of 4 (VEC and n are multiples of 4), so it
makes one Philox draw per 4 elements.  Under graph capture seed and base offset
come from the graph's [seed, offset] device buffer (``mRng``), so a replay draws
a fresh mask.  Specializations without a residual (forward) or without the
second ds output (backward) take no dropout; the host composes the standalone
kernel there.

The same two stages also sum dx, the gradient handed to the branch input x
(ds as stored in x's dtype), over the rows: when x is a Linear's output (the
attention projection, the MLP's second Linear) that column sum is the
Linear's bias gradient, so it costs no launch of its own (ops/fused_norms.py
hands it to the Linear's backward).  Its running sums live in the CTA's
shared memory, not registers (a row of n = 2048 already fills the register
file): each thread adds its own columns of its own slot's row, so no barrier
is needed until the slots combine.

Tiling
------
* The row length ``n`` is a compile-time constant of each specialization, so
  a row lives in registers between the reduction and the write (one read of
  HBM per input).  Each 16-byte vector holds ``VEC`` elements (8 when any
  row tensor is 16-bit, else 4); ``tpr`` threads share a row, the largest power
  of two <= 32 dividing n / VEC, each holding ``vpt = n / (VEC * tpr)``
  vectors: thread ``lane`` owns the vectors ``v * tpr + lane``.  Every global
  access of a row tensor is a 16-byte vector load or store (LDG/STG.E.128).
* A CTA is 128 threads = ``128 / tpr`` row slots; row statistics reduce with
  warp butterflies over the ``tpr`` lanes of a slot (no shared memory, no
  barrier in the forward).  Out-of-range slots read the last row (so every
  lane of a butterfly is live) and store nothing.
* Backward registers: a thread holds its xhat and g between the row's
  reductions and the ds pass, next to its dweight/dbias running sums; where
  that would not fit (more than 32 values of a row per thread: n = 2048) it
  reads s and dy again in the ds pass (cache hits) instead of spilling.  The
  dx column sums live in shared memory (see above).
* Forward grid: one CTA per 128 / tpr rows.  Backward grid: G CTAs (chosen by
  the host, G <= ceil(rows / slots)); CTA b takes row blocks b, b + G, ...
  Sums run in one fixed order everywhere (per thread: vectors then lanes of a
  vector; then the butterfly; then slots 0..S-1; then CTAs 0..G-1), so the
  results have the same bits on every run, with no atomics and no memset.
  ``kernels/reference/norms.py`` is a NumPy model of exactly this order.

Constraints (checked in C++ before launch, else the CUDA C++ kernels of
kernels/cuda/norms.cu plus an add serve the call): row tensors contiguous
along n with a row stride that is a multiple of 16 bytes and 16-byte aligned
bases; weight and bias fp32 (master weights), contiguous, 16-byte aligned; n
one of ``ROW_LENGTHS``; the dtype combination one of those below.

Specializations
---------------
For LayerNorm (with bias) and RMSNorm and each n in ``ROW_LENGTHS``:
  forward (x, residual, out): (bf16, fp32, bf16) and (fp32, none, bf16) --
  autocast's residual stream; (bf16, fp32, fp32) -- a final norm whose output
  stays in the stream's dtype (ViT pools before its head); (fp32, fp32, fp32),
  (fp32, none, fp32); (bf16, bf16, bf16), (bf16, none, bf16);
  backward (s, dy, second dx dtype): (fp32, bf16, bf16), (fp32, bf16, none),
  (fp32, fp32, bf16), (fp32, fp32, none), (bf16, bf16, none), each with and
  without dres;
  plus the finish kernel of each kind (n dynamic; LayerNorm's also writes dbias).
Dropout adds no specialization: its probability and Philox state are runtime
arguments of the forwards with a residual and the backwards with a second ds
output.
"""

from dataclasses import dataclass

ROW_LENGTHS = (128, 256, 384, 512, 768, 1024, 2048)
THREADS = 128
WARP = 32
FWD_COMBOS = (("bf16", "fp32", "bf16"), ("fp32", "", "bf16"), ("bf16", "fp32", "fp32"), ("fp32", "fp32", "fp32"),
              ("fp32", "", "fp32"), ("bf16", "bf16", "bf16"), ("bf16", "", "bf16"))
BWD_COMBOS = (("fp32", "bf16", "bf16"), ("fp32", "bf16", ""), ("fp32", "fp32", "bf16"), ("fp32", "fp32", ""),
              ("bf16", "bf16", ""))
_WIDTH = {"bf16": 16, "fp16": 16, "fp32": 32}


@dataclass(frozen=True)
class NormSpec:
    """One AOT specialization; every field is baked into the compiled kernel.

    fwd: x_dtype / res_dtype ("" = no residual) / out_dtype are x, residual and y.
    bwd: x_dtype is s's dtype (the saved new residual), out_dtype dy's, res_dtype
    the dtype of the second ds output ("" = none); has_dres: dres is added.
    finish: n = 0 (dynamic), no dtypes; kind "layer" also writes dbias.
    """
    stage: str
    kind: str
    n: int
    x_dtype: str = ""
    res_dtype: str = ""
    out_dtype: str = ""
    has_dres: bool = False
    arch: str = "sm_90a"

    @property
    def dropout(self):
        """Whether the kernel takes the residual dropout's runtime arguments (see the module docstring)."""
        return self.stage != "finish" and bool(self.res_dtype)

    @property
    def name(self):
        if self.stage == "finish":
            return f"norm_{self.arch}_finish_{self.kind}"
        tail = f"_dres" if self.has_dres else ""
        return (f"norm_{self.arch}_{self.stage}_{self.kind}_{self.n}_{self.x_dtype}_{self.res_dtype or 'none'}_"
                f"{self.out_dtype}{tail}")


def row_tiling(n, dtypes):
    """(VEC, tpr, vpt, slots): elements per 16-byte vector, threads per row,
    vectors per thread and rows per CTA for a row of n elements."""
    vec = 8 if min(_WIDTH[d] for d in dtypes if d) == 16 else 4
    if n % vec:
        raise ValueError(f"norms: row length {n} is not a multiple of {vec}")
    chunks = n // vec
    tpr = WARP
    while chunks % tpr:
        tpr //= 2
    return vec, tpr, chunks // tpr, THREADS // tpr


def specializations(archs=("sm_90a",)):
    specs = []
    for arch in archs:
        if arch != "sm_90a":
            # Tuned and tested for Hopper; other targets keep the CUDA C++ norms.
            continue
        for kind in ("layer", "rms"):
            for n in ROW_LENGTHS:
                for x, res, out in FWD_COMBOS:
                    specs.append(NormSpec("fwd", kind, n, x, res, out, False, arch))
                for s, dy, dx in BWD_COMBOS:
                    for dres in (False, True):
                        specs.append(NormSpec("bwd", kind, n, s, dx, dy, dres, arch))
            specs.append(NormSpec("finish", kind, 0, arch=arch))
    return specs


SPECS = specializations()


def _cutlass_dtype(cutlass, name):
    return {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16, "fp32": cutlass.Float32}[name]


def build_kernel(spec: NormSpec):
    """Return (jit_function, fake_args) for cute.compile.  Imports the DSL lazily:
    the caller must have set CUTE_DSL_ARCH before the first cutlass import."""
    if spec.stage == "fwd":
        return _build_forward(spec)
    if spec.stage == "bwd":
        return _build_backward(spec)
    return _build_finish(spec)


def _row_vector(cute, vec):
    """at(m, r, c): the c-th vec-element vector of row r of the 2-D tensor m."""
    def at(m, r, c):
        return cute.local_tile(m[(r, None)], (vec,), (c,))
    return at


UNIT_SCALE = float(1 << 24)  # keep_scaled = (1 - p) * 2^24: unit(x) < keep  <=>  (x >> 8) < keep_scaled


def _dropout_mask(cutlass, vec, n):
    """(rng_row, fill): rng_row(r, ...) gives the Philox key and row r's first counter; fill(m, rng, c, ...)
    writes into the fp32 (vec,) tensor m the scale (kept) or 0 of each element of the row's vector c."""
    from philox import philox4x32_10

    U32, I64, F32 = cutlass.Uint32, cutlass.Int64, cutlass.Float32

    def rng_row(r, mRng, rng_seed, rng_offset, rng_in_memory):
        # Captured: this replay's seed and base offset from the graph's buffer (mRng is always a
        # readable pointer, so both loads are safe and the select stays branch-free).
        in_memory = rng_in_memory != 0
        seed = cutlass.select_(in_memory, mRng[0], rng_seed)
        base = cutlass.select_(in_memory, mRng[1], I64(0)) + rng_offset
        # element v = r * n + col has counter base / 4 + v / 4; n is a multiple of 4
        return U32(seed), U32(seed >> 32), (base >> 2) + I64(r) * I64(n // 4)

    def fill(m, rng, c, keep_scaled, scale):
        k0, k1, row_ctr = rng
        # Plain Python loops (a helper is not preprocessed by the DSL): traced, they unroll.
        for q in range(vec // 4):
            lanes = philox4x32_10(k0, k1, row_ctr + I64(c * (vec // 4) + q))
            for lane in range(4):
                m[q * 4 + lane] = cutlass.select_(F32(lanes[lane] >> U32(8)) < keep_scaled, scale, F32(0.0))

    return rng_row, fill


def _rng_fakes(cutlass):
    """Fake mRng, seed, offset, in-memory flag, keep_scaled and scale (compile-time placeholders)."""
    from cutlass.cute.runtime import make_fake_tensor
    return (make_fake_tensor(cutlass.Int64, (2,), (1,), assumed_align=8), cutlass.Int64(0), cutlass.Int64(0),
            cutlass.Int32(0), cutlass.Float32(UNIT_SCALE), cutlass.Float32(1.0))


def _fakes(spec, dtypes):
    """The DSL, fake-tensor builders and the tiling shared by forward and backward."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_tensor

    n = spec.n
    vec, tpr, vpt, slots = row_tiling(n, dtypes)
    rows = cute.sym_int32(symbol="R")

    def row_tensor(name):
        # Rows of n elements with a 16-byte-multiple row stride (checked in C++).
        dt = _cutlass_dtype(cutlass, name)
        return make_fake_tensor(dt, (rows, n), (cute.sym_int64(divisibility=128 // dt.width), 1), assumed_align=16)

    def param():
        return make_fake_tensor(cutlass.Float32, (n,), (1,), assumed_align=16)

    def stat():
        return make_fake_tensor(cutlass.Float32, (rows,), (1,), assumed_align=4)

    return (vec, tpr, vpt, slots), row_tensor, param, stat


def _build_forward(spec):
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_stream

    F32 = cutlass.Float32
    n = spec.n
    layer = spec.kind == "layer"
    has_res = bool(spec.res_dtype)
    (vec, tpr, vpt, slots), row_tensor, param, stat = _fakes(spec, (spec.x_dtype, spec.res_dtype, spec.out_dtype))
    inv_n = 1.0 / n
    _vec = _row_vector(cute, vec)
    rng_row, fill_mask = _dropout_mask(cutlass, vec, n)
    round_x = spec.x_dtype != "fp32"  # the dropped x is rounded to x's dtype, as the dropout kernel stores it

    def add(a, b):
        return a + b

    @cute.kernel
    def kernel(mX: cute.Tensor, mRes: cute.Tensor, mResOut: cute.Tensor, mY: cute.Tensor, mW: cute.Tensor,
               mB: cute.Tensor, mMean: cute.Tensor, mRstd: cute.Tensor, eps: F32, mRng: cute.Tensor,
               rng_seed: cutlass.Int64, rng_offset: cutlass.Int64, rng_in_memory: cutlass.Int32, keep_scaled: F32,
               scale: F32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % tpr
        row = bidx * slots + tidx // tpr
        rows = mX.shape[0]
        r = cutlass.min(row, rows - 1)
        # The row, widened to fp32, stays in registers: column (v * tpr + lane) * vec + e is s[e, v].
        s = cute.make_rmem_tensor(cute.make_layout((vec, vpt)), F32)
        if cutlass.const_expr(has_res):
            m = cute.make_rmem_tensor(cute.make_layout((vec,)), F32)  # per element: 1 / (1 - p) or 0
            rng = rng_row(r, mRng, rng_seed, rng_offset, rng_in_memory)
        for v in cutlass.range_constexpr(vpt):
            c = v * tpr + lane
            t = _vec(mX, r, c).load().to(F32)
            if cutlass.const_expr(has_res):
                m.fill(1.0)
                if keep_scaled < F32(UNIT_SCALE):  # p > 0 (warp-uniform)
                    fill_mask(m, rng, c, keep_scaled, scale)
                t = t * m.load()
                if cutlass.const_expr(round_x):
                    t = t.to(mX.element_type).to(F32)
                t = t + _vec(mRes, r, c).load().to(F32)
            s[(None, v)].store(t)
        mean = F32(0.0)
        if cutlass.const_expr(layer):
            acc = F32(0.0)
            for v in cutlass.range_constexpr(vpt):
                for e in cutlass.range_constexpr(vec):
                    acc = acc + s[e, v]
            mean = cute.arch.warp_reduction(acc, add, threads_in_group=tpr) * inv_n
        # Mean of squared deviations after the mean: no E[x^2] - E[x]^2 cancellation.
        sq = F32(0.0)
        for v in cutlass.range_constexpr(vpt):
            for e in cutlass.range_constexpr(vec):
                d = s[e, v] - mean
                sq = sq + d * d
        rstd = cute.math.rsqrt(cute.arch.warp_reduction(sq, add, threads_in_group=tpr) * inv_n + eps)
        if row < rows:
            for v in cutlass.range_constexpr(vpt):
                c = v * tpr + lane
                sv = s[(None, v)].load()
                if cutlass.const_expr(has_res):
                    _vec(mResOut, r, c).store(sv.to(mResOut.element_type))
                y = (sv - mean) * rstd * cute.local_tile(mW, (vec,), (c,)).load()
                if cutlass.const_expr(layer):
                    y = y + cute.local_tile(mB, (vec,), (c,)).load()
                _vec(mY, r, c).store(y.to(mY.element_type))
            if lane == 0:
                if cutlass.const_expr(layer):
                    mMean[row] = mean
                mRstd[row] = rstd

    @cute.jit
    def launch(mX: cute.Tensor, mRes: cute.Tensor, mResOut: cute.Tensor, mY: cute.Tensor, mW: cute.Tensor,
               mB: cute.Tensor, mMean: cute.Tensor, mRstd: cute.Tensor, eps: F32, mRng: cute.Tensor,
               rng_seed: cutlass.Int64, rng_offset: cutlass.Int64, rng_in_memory: cutlass.Int32, keep_scaled: F32,
               scale: F32, stream: cuda.CUstream):
        grid = (mX.shape[0] + slots - 1) // slots
        kernel(mX, mRes, mResOut, mY, mW, mB, mMean, mRstd, eps, mRng, rng_seed, rng_offset, rng_in_memory,
               keep_scaled, scale).launch(
            grid=[grid, 1, 1], block=[THREADS, 1, 1], stream=stream)

    res = spec.res_dtype or spec.x_dtype  # unused tensors get a harmless type
    fake_args = (row_tensor(spec.x_dtype), row_tensor(res), row_tensor(res), row_tensor(spec.out_dtype), param(),
                 param(), stat(), stat(), F32(1e-5), *_rng_fakes(cutlass), make_fake_stream())
    return launch, fake_args


def _build_backward(spec):
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    F32 = cutlass.Float32
    n = spec.n
    layer = spec.kind == "layer"
    has_dx2 = bool(spec.res_dtype)
    has_dres = spec.has_dres
    (vec, tpr, vpt, slots), row_tensor, param, stat = _fakes(spec, (spec.x_dtype, spec.res_dtype, spec.out_dtype))
    inv_n = 1.0 / n
    chunks = n // vec
    _vec = _row_vector(cute, vec)
    smem_bytes = slots * n * 4 + 16  # the slots' fp32 sums, 16-byte aligned
    # A thread keeps its xhat and g between the row's reduction and the ds pass when they fit
    # next to the dweight/dbias sums; for longer rows (n = 2048: 64 values each) it recomputes
    # them from s and dy read again (cache hits) rather than spill.
    keep_row = vpt * vec <= 32
    held = vpt if keep_row else 1
    rng_row, fill_mask = _dropout_mask(cutlass, vec, n)

    def add(a, b):
        return a + b

    @cute.kernel
    def kernel(mS: cute.Tensor, mDy: cute.Tensor, mDres: cute.Tensor, mDs: cute.Tensor, mDx: cute.Tensor,
               mW: cute.Tensor, mMean: cute.Tensor, mRstd: cute.Tensor, mPW: cute.Tensor, mPB: cute.Tensor,
               mPC: cute.Tensor, mRng: cute.Tensor, rng_seed: cutlass.Int64, rng_offset: cutlass.Int64,
               rng_in_memory: cutlass.Int32, keep_scaled: F32, scale: F32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        lane = tidx % tpr
        slot = tidx // tpr
        rows = mS.shape[0]
        blocks = (rows + slots - 1) // slots
        layout = cute.make_layout((vec, vpt))
        xhat = cute.make_rmem_tensor(cute.make_layout((vec, held)), F32)
        g = cute.make_rmem_tensor(cute.make_layout((vec, held)), F32)
        dw = cute.make_rmem_tensor(layout, F32)
        db = cute.make_rmem_tensor(layout, F32)
        dw.fill(0.0)
        db.fill(0.0)
        if cutlass.const_expr(has_dx2):
            m = cute.make_rmem_tensor(cute.make_layout((vec,)), F32)  # per element: 1 / (1 - p) or 0
        # buf[slot] holds this slot's running column sums of dx; a thread only
        # touches its own columns of it until the combine below.
        smem = cutlass.utils.SmemAllocator()
        buf = smem.allocate_tensor(F32, cute.make_layout((slots, n), stride=(n, 1)), byte_alignment=16)
        for v in cutlass.range_constexpr(vpt):
            _vec(buf, slot, v * tpr + lane).store(cute.full((vec,), 0.0, F32))
        blk = bidx
        while blk < blocks:
            row = blk * slots + slot
            r = cutlass.min(row, rows - 1)
            mean = F32(0.0)
            if cutlass.const_expr(layer):
                mean = mMean[r]
            rstd = mRstd[r]
            # Out-of-range slots compute on the last row but add nothing to dweight/dbias.
            keep = F32(1.0) if row < rows else F32(0.0)
            sum_g = F32(0.0)
            sum_gx = F32(0.0)
            for v in cutlass.range_constexpr(vpt):
                c = v * tpr + lane
                h = v if keep_row else 0
                dy = _vec(mDy, r, c).load().to(F32)
                xh = (_vec(mS, r, c).load().to(F32) - mean) * rstd
                gv = dy * cute.local_tile(mW, (vec,), (c,)).load()
                xhat[(None, h)].store(xh)
                g[(None, h)].store(gv)
                dw[(None, v)].store(dw[(None, v)].load() + (dy * keep) * xh)
                if cutlass.const_expr(layer):
                    db[(None, v)].store(db[(None, v)].load() + dy * keep)
                for e in cutlass.range_constexpr(vec):
                    sum_g = sum_g + g[e, h]
                    sum_gx = sum_gx + g[e, h] * xhat[e, h]
            mean_gx = cute.arch.warp_reduction(sum_gx, add, threads_in_group=tpr) * inv_n
            mean_g = F32(0.0)
            if cutlass.const_expr(layer):
                mean_g = cute.arch.warp_reduction(sum_g, add, threads_in_group=tpr) * inv_n
            if row < rows:
                if cutlass.const_expr(has_dx2):
                    rng = rng_row(r, mRng, rng_seed, rng_offset, rng_in_memory)
                for v in cutlass.range_constexpr(vpt):
                    c = v * tpr + lane
                    h = v if keep_row else 0
                    if cutlass.const_expr(not keep_row):
                        xhat[(None, 0)].store((_vec(mS, r, c).load().to(F32) - mean) * rstd)
                        g[(None, 0)].store(_vec(mDy, r, c).load().to(F32) * cute.local_tile(mW, (vec,), (c,)).load())
                    ds = (g[(None, h)].load() - mean_g - xhat[(None, h)].load() * mean_gx) * rstd
                    if cutlass.const_expr(has_dres):
                        ds = ds + _vec(mDres, r, c).load().to(F32)
                    dx = ds.to(mDs.element_type)
                    _vec(mDs, r, c).store(dx)
                    if cutlass.const_expr(has_dx2):
                        # x's gradient through the dropout: dx rounded as the dropout kernel would receive it
                        m.fill(1.0)
                        if keep_scaled < F32(UNIT_SCALE):  # p > 0 (warp-uniform)
                            fill_mask(m, rng, c, keep_scaled, scale)
                        dx = (ds.to(mDx.element_type).to(F32) * m.load()).to(mDx.element_type)
                        _vec(mDx, r, c).store(dx)
                    # Sum dx as stored, so the result is the column sum of the tensor x receives.
                    cur = _vec(buf, slot, c).load()
                    _vec(buf, slot, c).store(cur + dx.to(F32))
            blk += gdim

        # Combine the row slots' sums in slot order through shared memory and write
        # this CTA's partial rows: dx's (already in buf), then dweight's (and dbias').
        for which in cutlass.range_constexpr(3 if layer else 2):
            out = (mPC, mPW, mPB)[which]
            if cutlass.const_expr(which > 0):
                acc = dw if which == 1 else db
                for v in cutlass.range_constexpr(vpt):
                    _vec(buf, slot, v * tpr + lane).store(acc[(None, v)].load())
            cute.arch.barrier()
            for c in range(tidx, chunks, THREADS):
                tot = _vec(buf, 0, c).load()
                for k in cutlass.range_constexpr(1, slots):
                    tot = tot + _vec(buf, k, c).load()
                _vec(out, bidx, c).store(tot)
            cute.arch.barrier()

    @cute.jit
    def launch(mS: cute.Tensor, mDy: cute.Tensor, mDres: cute.Tensor, mDs: cute.Tensor, mDx: cute.Tensor,
               mW: cute.Tensor, mMean: cute.Tensor, mRstd: cute.Tensor, mPW: cute.Tensor, mPB: cute.Tensor,
               mPC: cute.Tensor, mRng: cute.Tensor, rng_seed: cutlass.Int64, rng_offset: cutlass.Int64,
               rng_in_memory: cutlass.Int32, keep_scaled: F32, scale: F32, stream: cuda.CUstream):
        kernel(mS, mDy, mDres, mDs, mDx, mW, mMean, mRstd, mPW, mPB, mPC, mRng, rng_seed, rng_offset, rng_in_memory,
               keep_scaled, scale).launch(
            grid=[mPW.shape[0], 1, 1], block=[THREADS, 1, 1], smem=smem_bytes, stream=stream)

    partial_rows = cute.sym_int32(symbol="G")

    def partial():
        return make_fake_tensor(F32, (partial_rows, n), (n, 1), assumed_align=16)

    s, dy = spec.x_dtype, spec.out_dtype
    fake_args = (row_tensor(s), row_tensor(dy), row_tensor(s), row_tensor(s), row_tensor(spec.res_dtype or s),
                 param(), stat(), stat(), partial(), partial(), partial(), *_rng_fakes(cutlass), make_fake_stream())
    return launch, fake_args


def _build_finish(spec):
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    F32 = cutlass.Float32
    layer = spec.kind == "layer"

    @cute.kernel
    def kernel(mPW: cute.Tensor, mPB: cute.Tensor, mPC: cute.Tensor, mDW: cute.Tensor, mDB: cute.Tensor,
               mDC: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        c = bidx * THREADS + tidx
        if c < mDW.shape[0]:
            w = F32(0.0)
            b = F32(0.0)
            d = F32(0.0)
            for k in range(mPW.shape[0]):
                w = w + mPW[k, c]
                if cutlass.const_expr(layer):
                    b = b + mPB[k, c]
                d = d + mPC[k, c]
            mDW[c] = w
            if cutlass.const_expr(layer):
                mDB[c] = b
            mDC[c] = d

    @cute.jit
    def launch(mPW: cute.Tensor, mPB: cute.Tensor, mPC: cute.Tensor, mDW: cute.Tensor, mDB: cute.Tensor,
               mDC: cute.Tensor, stream: cuda.CUstream):
        grid = (mDW.shape[0] + THREADS - 1) // THREADS
        kernel(mPW, mPB, mPC, mDW, mDB, mDC).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1], stream=stream)

    n = cute.sym_int32(symbol="N")
    g = cute.sym_int32(symbol="G")

    def partial():
        return make_fake_tensor(F32, (g, n), (cute.sym_int64(), 1), assumed_align=4)

    def param():
        return make_fake_tensor(F32, (n,), (1,), assumed_align=4)

    return launch, (partial(), partial(), partial(), param(), param(), param(), make_fake_stream())


_DTYPE_CODE = {"": "0", "bf16": "kNormBF16", "fp32": "kNormF32"}


def emit_registry(entries):
    """C++ source for cutegrad._C's table of exported norm kernels (kernels/cuda/norm_cute_args.h).

    entries: [(NormSpec, path of its exported header)].  Each entry gets a
    loader and a launcher that fills the header's tensor structs from
    CuteNormArgs: row tensors are contiguous (row stride n), so their
    dynamic extent is the row count and their dynamic stride n."""
    out = [
        "// Generated by kernels/cute/aot.py from kernels/cute/norms.py; do not edit.",
        "#include <cuda_runtime.h>",
        "#include \"norm_cute_args.h\"",
        "static int* g_norm_load_error;",
        "#define CUTE_DSL_CUDA_ERROR_CHECK(err) do { cudaError_t e_ = (err); "
        "if (e_ != cudaSuccess && *g_norm_load_error == 0) *g_norm_load_error = (int)e_; } while (0)",
    ]
    out += [f'#include "{header}"' for _, header in entries]
    out.append("namespace cutegrad {")
    table = []
    for i, (s, _) in enumerate(entries):
        n = s.name
        out.append(f"static {n}_Kernel_Module_t mod_{i};")
        out.append(f"static void load_{i}(int* err) {{ g_norm_load_error = err; {n}_Kernel_Module_Load(&mod_{i}); }}")

        def row(field, ptr):
            return f"  {n}_Tensor_{field}_t {field}{{const_cast<void*>({ptr}), {{R}}, {{N}}}};"

        def flat(field, ptr):
            return f"  {n}_Tensor_{field}_t {field}{{const_cast<void*>({ptr})}};"

        def stat(field, ptr):
            return f"  {n}_Tensor_{field}_t {field}{{const_cast<void*>({ptr}), {{R}}}};"

        body = ["  int32_t R = (int32_t)a.rows; int64_t N = a.n; (void)R; (void)N;"]
        # without a device-memory Philox state the kernel never reads mRng: any valid pointer serves
        rng = f"  {n}_Tensor_mRng_t mRng{{const_cast<void*>(a.rng_state ? a.rng_state : a.weight)}};"
        rng_args = "&mRng, a.rng_seed, a.rng_offset, a.rng_state ? 1 : 0, a.keep_scaled, a.drop_scale"
        if s.stage == "fwd":
            body += [row("mX", "a.x"), row("mRes", "a.res ? a.res : a.x"), row("mResOut", "a.res_out ? a.res_out : a.y"),
                     row("mY", "a.y"), flat("mW", "a.weight"), flat("mB", "a.bias ? a.bias : a.weight"),
                     stat("mMean", "a.mean ? a.mean : a.rstd"), stat("mRstd", "a.rstd")]
            body.append(rng)
            call = "&mX, &mRes, &mResOut, &mY, &mW, &mB, &mMean, &mRstd, a.eps, " + rng_args
        elif s.stage == "bwd":
            body += [row("mS", "a.x"), row("mDy", "a.dy"), row("mDres", "a.dres ? a.dres : a.dy"), row("mDs", "a.ds"),
                     row("mDx", "a.dx2 ? a.dx2 : a.ds"), flat("mW", "a.weight"),
                     stat("mMean", "a.mean ? a.mean : a.rstd"), stat("mRstd", "a.rstd"),
                     f"  {n}_Tensor_mPW_t mPW{{a.pw, {{a.partial_rows}}}};",
                     f"  {n}_Tensor_mPB_t mPB{{a.pb ? a.pb : a.pw, {{a.partial_rows}}}};",
                     f"  {n}_Tensor_mPC_t mPC{{a.pc, {{a.partial_rows}}}};"]
            body.append(rng)
            call = "&mS, &mDy, &mDres, &mDs, &mDx, &mW, &mMean, &mRstd, &mPW, &mPB, &mPC, " + rng_args
        else:
            body += [f"  {n}_Tensor_mPW_t mPW{{a.pw, {{a.partial_rows, (int32_t)N}}, {{N}}}};",
                     f"  {n}_Tensor_mPB_t mPB{{a.pb ? a.pb : a.pw, {{a.partial_rows, (int32_t)N}}, {{N}}}};",
                     f"  {n}_Tensor_mPC_t mPC{{a.pc, {{a.partial_rows, (int32_t)N}}, {{N}}}};",
                     f"  {n}_Tensor_mDW_t mDW{{a.dweight, {{(int32_t)N}}}};",
                     f"  {n}_Tensor_mDB_t mDB{{a.dbias ? a.dbias : a.dweight, {{(int32_t)N}}}};",
                     f"  {n}_Tensor_mDC_t mDC{{a.dcol, {{(int32_t)N}}}};"]
            call = "&mPW, &mPB, &mPC, &mDW, &mDB, &mDC"
        out.append(f"static int launch_{i}(const CuteNormArgs& a, void* stream) {{\n" + "\n".join(body) +
                   f"\n  return cute_dsl_{n}_wrapper(&mod_{i}, {call}, (cudaStream_t)stream);\n}}")
        stage = {"fwd": 0, "bwd": 1, "finish": 2}[s.stage]
        slots = row_tiling(s.n, (s.x_dtype, s.res_dtype, s.out_dtype))[3] if s.n else 0
        table.append(
            f'  {{"{n}", {stage}, {"true" if s.kind == "layer" else "false"}, {s.n}, {_DTYPE_CODE[s.x_dtype]}, '
            f'{_DTYPE_CODE[s.res_dtype]}, {_DTYPE_CODE[s.out_dtype]}, {"true" if s.has_dres else "false"}, {slots}, '
            f'{int(s.arch[3:5])}, load_{i}, launch_{i}}},')
    out.append("extern const CuteNormEntry kCuteNormKernels[] = {")
    out += table
    if not table:
        out.append('  {"", -1, false, 0, 0, 0, 0, false, 0, -1, nullptr, nullptr},')
    out.append("};")
    out.append(f"extern const int kNumCuteNormKernels = {len(table)};")
    out.append("}  // namespace cutegrad")
    return "\n".join(out) + "\n"
