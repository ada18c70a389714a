"""Intra-node all-reduce over peer memory, written in CuTeDSL (plain SIMT), for sm_90a and sm_103a.

Memory: the symmetric workspace
-------------------------------
Every rank owns one workspace allocation that every other rank has mapped
(cuMem allocations exported as POSIX file descriptors, passed over a Unix
socket: frontend/distributed/symmetric.py).  The kernel takes the base of each
rank's workspace twice, typed: `flags[p]` (Int32) and `data[p]` (the element
type), for p < MAX_RANKS (unused slots repeat this rank's own pointer):

    flags[p]: [BARRIERS][GRID][MAX_RANKS] Int32 arrival epochs, then [GRID]
              Int32 epoch counters (used only by rank p itself)
    data[p]:  two areas ("parities") of `cap` elements each

Schedule (the exact one kernels/reference/allreduce_schedule.py models)
------------------------------------------------------------------------
The message is n elements, n a multiple of V = 16 bytes / element size, seen as
n / V vectors of 16 bytes.  Vectors are grouped in rows of THREADS vectors; row
j belongs to block j mod GRID; thread t of a block handles vector t of each of
its rows.  Every launch runs all GRID blocks (blocks without rows still take
part in the barriers), so every block sees every call.
* one-shot (small messages): (1) copy this rank's input rows into data[rank],
  parity area e mod 2; (2) block barrier 0; (3) for each row, sum vector t of
  every rank in rank order 0..W-1 in fp32, round once, write the output.
  Two steps of latency, W reads per element.
* two-shot (large messages): (1) copy as above; (2) barrier 0; (3)
  reduce-scatter: row j is reduced by rank (j div GRID) mod W, which writes
  the rounded sum back into its own data area in place; (4) barrier 1; (5)
  all-gather: every rank copies row j from rank (j div GRID) mod W into its
  output.  Each rank reads 2 - 1/W times the message from peers.
Summation in rank order and one rounding make the result bit-identical on
every rank and equal to the float32 sum of the inputs in rank order.

Synchronisation (no host sync; capturable)
-----------------------------------------
Block b keeps an epoch counter in its own rank's flags; each launch reads it
(e = old + 1) and thread 0 stores e at the end.  A barrier of block b: all
threads sync; thread p < W stores e into flags[p][barrier][b][rank] with
`st.release.sys` (the arrival at peer p), then spins with relaxed system-scope
loads until flags[rank][barrier][b][p] >= e (a peer may already have moved on
to epoch e + 1), then one `fence.acq_rel.sys`;
all threads sync.  Epochs live in device memory, so a captured graph replays
with fresh epochs.
Why two parity areas and no exit barrier: a rank writes parity area e mod 2
again at epoch e + 2, after passing barrier 0 of epoch e + 1, which every peer
reaches only after its launch of epoch e has finished (stream order); so no
peer still reads that area.  All ranks launch the same sequence of calls with
the same GRID, so per-block epochs agree across ranks.

Constraints (checked by the caller, else NCCL runs): 2 <= W <= MAX_RANKS; n a
multiple of V and at most `cap`; input and output 16-byte aligned; the input
may be the output (in place).  No NVLink multicast (multimem) anywhere.

Specializations
---------------
For each arch in (sm_90a, sm_103a) present in the build's arch list, and
always both in the CI compile test: algorithm one_shot / two_shot x element
type bf16 / fp16 / fp32 (fp32 accumulation); GRID x THREADS = 128 x 512, one
block per SM (the launch bound keeps ~72 registers per thread and no spills):
1 MiB of 16-byte loads in flight per peer and step, about what NVLink's
latency-bandwidth product asks for (an estimate the two-GPU run is to tune).
"""

from dataclasses import dataclass

MAX_RANKS = 8
GRID = 128
THREADS = 512
BARRIERS = 2
ARCHS = ("sm_90a", "sm_103a")
DTYPES = ("bf16", "fp16", "fp32")
ALGOS = ("one_shot", "two_shot")
FLAG_WORDS = BARRIERS * GRID * MAX_RANKS + GRID  # Int32 words of the flags region


@dataclass(frozen=True)
class AllReduceSpec:
    algo: str  # "one_shot" | "two_shot"
    dtype: str  # "bf16" | "fp16" | "fp32"
    arch: str = "sm_90a"

    @property
    def name(self) -> str:
        return f"allreduce_{self.arch}_{self.algo}_{self.dtype}"

    @property
    def vector(self) -> int:
        return 16 // (4 if self.dtype == "fp32" else 2)


def specializations(archs=("sm_90a",)):
    return [AllReduceSpec(algo, dt, arch) for arch in archs if arch in ARCHS for algo in ALGOS for dt in DTYPES]


SPECS = specializations()


def build_kernel(spec: AllReduceSpec):
    """(jit_function, fake_args) for cute.compile; imports the DSL lazily (CUTE_DSL_ARCH must be set first)."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_stream, make_ptr

    elem = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16, "fp32": cutlass.Float32}[spec.dtype]
    V = spec.vector
    two_shot = spec.algo == "two_shot"

    def vectors(ptr, count):
        """A (V, count) view of `count` 16-byte vectors starting at ptr."""
        return cute.make_tensor(ptr, cute.make_layout((V, count), stride=(1, V)))

    @cute.jit
    def area_of(ptr, first_vector):
        """Pointer to vector `first_vector` of a workspace, its 16-byte alignment restated (a pointer
        picked at run time among the peers, or offset by a run-time amount, loses it)."""
        offset = cute.assume(first_vector * V, divby=V)
        return cute.make_ptr(elem, (ptr + offset).toint(), cute.AddressSpace.gmem, assumed_align=16)

    @cute.jit
    def store_rounded(dst, acc):
        """Round an fp32 vector to the element type in registers, then one 16-byte store."""
        frag = cute.make_rmem_tensor_like(dst)
        frag.store(acc.to(elem))
        cute.autovec_copy(frag, dst)

    @cute.jit
    def copy16(src, dst):
        """One 16-byte vector from src to dst through registers."""
        frag = cute.make_rmem_tensor_like(src)
        cute.autovec_copy(src, frag)
        cute.autovec_copy(frag, dst)

    @cute.jit
    def pick(pointers, index):
        """pointers[index] for a run-time index (the list is unrolled: no local-memory array)."""
        chosen = pointers[0]
        for p in cutlass.range_constexpr(1, MAX_RANKS):
            if index == p:
                chosen = pointers[p]
        return chosen

    @cute.jit
    def epoch_counter(flags, rank, block):
        return pick(flags, rank) + (BARRIERS * GRID * MAX_RANKS + block)

    @cute.jit
    def barrier(flags, rank, world, block, e, which):
        cute.arch.sync_threads()
        tid = cute.arch.thread_idx()[0]
        slot = (which * GRID + block) * MAX_RANKS
        for p in cutlass.range_constexpr(MAX_RANKS):
            if tid == p and p < world:
                cute.arch.store(flags[p] + (slot + rank), e, sem="release", scope="sys")
        if tid < world:
            mine = pick(flags, rank)
            # `seen - e < 0`, not `seen != e`: a fast peer may already have passed this barrier and
            # stored the next launch's epoch before this thread looked (wrap-around safe)
            seen = cute.arch.load(mine + (slot + tid), cutlass.Int32, sem="relaxed", scope="sys")
            while seen - e < 0:
                seen = cute.arch.load(mine + (slot + tid), cutlass.Int32, sem="relaxed", scope="sys")
            cute.arch.fence_acq_rel_sys()
        cute.arch.sync_threads()

    @cute.kernel
    def kernel(inp: cute.Pointer, out: cute.Pointer,
               f0: cute.Pointer, f1: cute.Pointer, f2: cute.Pointer, f3: cute.Pointer,
               f4: cute.Pointer, f5: cute.Pointer, f6: cute.Pointer, f7: cute.Pointer,
               d0: cute.Pointer, d1: cute.Pointer, d2: cute.Pointer, d3: cute.Pointer,
               d4: cute.Pointer, d5: cute.Pointer, d6: cute.Pointer, d7: cute.Pointer,
               rank: cutlass.Int32, world: cutlass.Int32, n_vec: cutlass.Int32, cap_vec: cutlass.Int32):
        flags = [f0, f1, f2, f3, f4, f5, f6, f7]
        data = [d0, d1, d2, d3, d4, d5, d6, d7]
        tid = cute.arch.thread_idx()[0]
        block = cute.arch.block_idx()[0]
        mine_d = pick(data, rank)
        e = cute.arch.load(epoch_counter(flags, rank, block), cutlass.Int32) + 1
        area = (e % 2) * cap_vec  # first vector of this epoch's parity area
        rows = (n_vec + THREADS - 1) // THREADS
        gin = vectors(inp, n_vec)
        gout = vectors(out, n_vec)

        # (1) this rank's input -> its own workspace
        own = vectors(area_of(mine_d, area), n_vec)
        for j in cutlass.range(block, rows, GRID):
            v = j * THREADS + tid
            if v < n_vec:
                copy16(gin[None, v], own[None, v])
        barrier(flags, rank, world, block, e, 0)
        if tid == 0:
            # every thread of the block read the old value before the barrier's first sync; storing now
            # (not at the end) keeps the counter's address from living across the kernel (it spilled)
            cute.arch.store(epoch_counter(flags, rank, block), e)

        if cutlass.const_expr(not two_shot):
            # (3) one-shot: every rank's vector, summed in rank order
            for j in cutlass.range(block, rows, GRID):
                v = j * THREADS + tid
                if v < n_vec:
                    acc = vectors(area_of(data[0], area), n_vec)[None, v].load().to(cutlass.Float32)
                    for p in cutlass.range_constexpr(1, MAX_RANKS):
                        if p < world:
                            acc = acc + vectors(area_of(data[p], area), n_vec)[None, v].load().to(cutlass.Float32)
                    store_rounded(gout[None, v], acc)
        else:
            # (3) reduce-scatter: this rank's rows, reduced in place in its own workspace
            for j in cutlass.range(block, rows, GRID):
                v = j * THREADS + tid
                if (j // GRID) % world == rank and v < n_vec:
                    acc = vectors(area_of(data[0], area), n_vec)[None, v].load().to(cutlass.Float32)
                    for p in cutlass.range_constexpr(1, MAX_RANKS):
                        if p < world:
                            acc = acc + vectors(area_of(data[p], area), n_vec)[None, v].load().to(cutlass.Float32)
                    store_rounded(own[None, v], acc)
            barrier(flags, rank, world, block, e, 1)
            # (5) all-gather: row j from its owner
            for j in cutlass.range(block, rows, GRID):
                v = j * THREADS + tid
                if v < n_vec:
                    src = pick(data, (j // GRID) % world)
                    copy16(vectors(area_of(src, area), n_vec)[None, v], gout[None, v])

    @cute.jit
    def launch(inp: cute.Pointer, out: cute.Pointer,
               f0: cute.Pointer, f1: cute.Pointer, f2: cute.Pointer, f3: cute.Pointer,
               f4: cute.Pointer, f5: cute.Pointer, f6: cute.Pointer, f7: cute.Pointer,
               d0: cute.Pointer, d1: cute.Pointer, d2: cute.Pointer, d3: cute.Pointer,
               d4: cute.Pointer, d5: cute.Pointer, d6: cute.Pointer, d7: cute.Pointer,
               rank: cutlass.Int32, world: cutlass.Int32, n_vec: cutlass.Int32, cap_vec: cutlass.Int32,
               stream: cuda.CUstream):
        kernel(inp, out, f0, f1, f2, f3, f4, f5, f6, f7, d0, d1, d2, d3, d4, d5, d6, d7,
               rank, world, n_vec, cap_vec).launch(
            grid=[GRID, 1, 1], block=[THREADS, 1, 1], min_blocks_per_mp=1, stream=stream)

    def data_ptr():
        return make_ptr(elem, 0, cute.AddressSpace.gmem, assumed_align=16)

    def flag_ptr():
        return make_ptr(cutlass.Int32, 0, cute.AddressSpace.gmem, assumed_align=16)

    fake = ([data_ptr(), data_ptr()] + [flag_ptr() for _ in range(MAX_RANKS)] + [data_ptr() for _ in range(MAX_RANKS)]
            + [cutlass.Int32(0), cutlass.Int32(2), cutlass.Int32(0), cutlass.Int32(0), make_fake_stream()])
    return launch, tuple(fake)


def emit_registry(entries):
    """C++ table of the exported all-reduce kernels (kernels/cuda/allreduce_args.h)."""
    dt = {"bf16": "ArDType::bf16", "fp16": "ArDType::fp16", "fp32": "ArDType::fp32"}
    out = [
        "// Generated by kernels/cute/aot.py from kernels/cute/allreduce.py; do not edit.",
        "#include <cuda_runtime.h>",
        "#include \"allreduce_args.h\"",
        "static int* g_ar_load_error;",
        "#define CUTE_DSL_CUDA_ERROR_CHECK(err) do { cudaError_t e_ = (err); "
        "if (e_ != cudaSuccess && *g_ar_load_error == 0) *g_ar_load_error = (int)e_; } while (0)",
    ]
    out += [f'#include "{header}"' for _, header in entries]
    out.append("namespace cutegrad {")
    table = []
    for i, (s, _) in enumerate(entries):
        n = s.name
        out.append(f"static {n}_Kernel_Module_t ar_mod_{i};")
        out.append(f"static void ar_load_{i}(int* err) {{ g_ar_load_error = err; {n}_Kernel_Module_Load(&ar_mod_{i}); }}")
        flags = ", ".join(f"a.flags[{p}]" for p in range(MAX_RANKS))
        data = ", ".join(f"a.data[{p}]" for p in range(MAX_RANKS))
        out.append(
            f"static int ar_launch_{i}(const AllReduceArgs& a, void* stream) {{\n"
            f"  return cute_dsl_{n}_wrapper(&ar_mod_{i}, a.in, a.out, {flags}, {data}, a.rank, a.world, a.n_vec,"
            f" a.cap_vec, (cudaStream_t)stream);\n"
            f"}}"
        )
        sm = int(s.arch[3:-1])
        table.append(f'  {{"{n}", {"true" if s.algo == "two_shot" else "false"}, {dt[s.dtype]}, {sm}, '
                     f"ar_load_{i}, ar_launch_{i}}},")
    out.append("extern const AllReduceKernelEntry kAllReduceKernels[] = {")
    out += table
    if not table:
        out.append('  {"", false, ArDType::fp32, -1, nullptr, nullptr},')
    out.append("};")
    out.append(f"extern const int kNumAllReduceKernels = {len(table)};")
    out.append("}  // namespace cutegrad")
    return "\n".join(out) + "\n"
