"""One rank of a multi-process test: `python tests/distributed_workers.py <scenario> [args]`.

Run by tests/test_distributed_cpu.py through `cutegrad launch` or directly with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set.  Each scenario checks its results
itself (against NumPy computed from every rank's seeded inputs) and exits 0, or
raises; it prints `RESULT <json>` lines the test reads.
"""
import json
import os
import sys
import time

import numpy as np

import cutegrad as cg
import cutegrad.distributed as dist

NP_DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64}


def result(**kw):
    sys.stdout.flush()
    os.write(1, ("RESULT " + json.dumps(kw) + "\n").encode())  # one write: ranks share the launcher's stdout


def rank_data(rank, n, dtype, seed):
    rng = np.random.default_rng([seed, rank, n])
    if dtype.startswith("int"):
        return rng.integers(-1000, 1000, n).astype(NP_DTYPES[dtype])
    return rng.standard_normal(n)  # float64; cast per dtype by the caller


def as_tensor(values, dtype):
    return cg.tensor(values, dtype=getattr(cg, dtype))


def exact(values, dtype):
    """The values a rank's tensor of `dtype` actually holds, in float64."""
    return as_tensor(values, dtype).float().numpy().astype(np.float64) if dtype in ("float16", "bfloat16") \
        else as_tensor(values, dtype).numpy().astype(np.float64)


def check_close(what, got, want, dtype):
    got = np.asarray(got, dtype=np.float64)
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-6}.get(dtype, 0.0)
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    if got.shape != want.shape or not np.all(err <= tol):
        raise AssertionError(f"{what} {dtype}: max relative error {err.max() if err.size else 'shape'} > {tol}; "
                             f"got {got.ravel()[:6]}, want {want.ravel()[:6]}")


def read(t):
    return t.float().numpy().astype(np.float64) if t.dtype.name in ("float16", "bfloat16") else \
        t.numpy().astype(np.float64)


def scenario_collectives(sizes, dtypes):
    """Every collective, every reduce op, each dtype and size, against NumPy."""
    dist.init_process_group("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    checked = 0
    for dtype in dtypes:
        for n in sizes:
            inputs = [exact(rank_data(r, n, dtype, 1), dtype) for r in range(world)]
            stacked = np.stack(inputs)
            ops = [dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN]
            if not dtype.startswith("int"):
                ops.append(dist.ReduceOp.AVG)
            for op in ops:
                t = as_tensor(inputs[rank], dtype)
                work = dist.all_reduce(t, op=op, async_op=(op == dist.ReduceOp.MAX))
                if work is not None:
                    work.wait()
                    assert work.is_completed()
                want = {"sum": stacked.sum(0), "avg": stacked.mean(0), "max": stacked.max(0),
                        "min": stacked.min(0)}[op]
                check_close(f"all_reduce {op} n={n}", read(t), want, dtype)
                checked += 1
            for src in sorted({0, world - 1}):
                t = as_tensor(inputs[rank], dtype)
                dist.broadcast(t, src=src)
                check_close(f"broadcast src={src} n={n}", read(t), inputs[src], dtype)
            outs = [as_tensor(np.full(n, 77), dtype) for _ in range(world)]
            dist.all_gather(outs, as_tensor(inputs[rank], dtype))
            for r in range(world):
                check_close(f"all_gather n={n} from {r}", read(outs[r]), inputs[r], dtype)
            flat = as_tensor(np.full(world * n, 77), dtype)
            dist.all_gather_into_tensor(flat, as_tensor(inputs[rank], dtype))
            check_close(f"all_gather_into_tensor n={n}", read(flat), stacked.reshape(-1), dtype)
            # reduce_scatter: rank r contributes chunks data(r, c) for every c; output c is their sum over r
            chunks = [[exact(rank_data(100 * r + c, n, dtype, 2), dtype) for c in range(world)] for r in range(world)]
            out = as_tensor(np.full(n, 77), dtype)
            dist.reduce_scatter(out, [as_tensor(v, dtype) for v in chunks[rank]])
            check_close(f"reduce_scatter n={n}", read(out), sum(chunks[r][rank] for r in range(world)), dtype)
            out = as_tensor(np.full(n, 77), dtype)
            work = dist.reduce_scatter_tensor(out, as_tensor(np.concatenate(chunks[rank]), dtype),
                                              op=dist.ReduceOp.MAX, async_op=True)
            work.wait()
            check_close(f"reduce_scatter_tensor n={n}", read(out),
                        np.max([chunks[r][rank] for r in range(world)], axis=0), dtype)
            checked += 5
    # a strided (non-contiguous) tensor is reduced in place through its view
    base = cg.tensor(np.arange(12, dtype=np.float64).reshape(3, 4) + rank)
    col = base[:, 1]
    dist.all_reduce(col)
    want = np.arange(12, dtype=np.float64).reshape(3, 4)[:, 1] * world + sum(range(world))
    assert np.array_equal(base.numpy()[:, 1], want), base.numpy()
    dist.barrier()
    dist.destroy_process_group()
    result(rank=rank, checked=checked)


def scenario_mismatch():
    """Shapes, then dtypes, that differ on one rank: the same ValueError on every rank; the group still works."""
    dist.init_process_group("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    errors = []
    for t in (cg.zeros(5 if rank == world - 1 else 4), cg.zeros(4, dtype=cg.float64 if rank == 0 else cg.float32)):
        try:
            dist.all_reduce(t)
        except ValueError as exc:
            errors.append(str(exc))
    t = cg.ones(3)
    dist.all_reduce(t)
    assert np.array_equal(t.numpy(), np.full(3, world, np.float32))
    dist.destroy_process_group()
    result(rank=rank, errors=errors)


def scenario_lifecycle():
    """Collectives before init, after destroy, a second init, bad arguments: clear errors."""
    errors = {}
    try:
        dist.all_reduce(cg.ones(2))
    except dist.DistributedError as exc:
        errors["before_init"] = str(exc)
    dist.init_process_group("cpu", timeout=30)
    try:
        dist.init_process_group("cpu")
    except RuntimeError as exc:
        errors["second_init"] = str(exc)
    world = dist.get_world_size()
    for name, call in [("bad_op", lambda: dist.all_reduce(cg.ones(2), op="mean")),
                       ("bad_src", lambda: dist.broadcast(cg.ones(2), src=world)),
                       ("bad_list", lambda: dist.all_gather([cg.ones(2)], cg.ones(2))),
                       ("int_avg", lambda: dist.all_reduce(cg.ones(2, dtype=cg.int64), op=dist.ReduceOp.AVG)),
                       ("not_tensor", lambda: dist.all_reduce(np.ones(2)))]:
        try:
            call()
        except (ValueError, TypeError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    dist.destroy_process_group()
    try:
        dist.all_reduce(cg.ones(2))
    except dist.DistributedError as exc:
        errors["after_destroy"] = str(exc)
    result(rank=int(os.environ["RANK"]), errors=errors, initialized=dist.is_initialized())


def scenario_die(victim):
    """Rank `victim` exits abruptly before a collective; the others must raise, not hang."""
    dist.init_process_group("cpu", timeout=float(os.environ.get("TEST_TIMEOUT", "60")))
    rank = dist.get_rank()
    dist.all_reduce(cg.ones(4))
    if rank == victim:
        os._exit(17)
    t0 = time.monotonic()
    try:
        dist.all_reduce(cg.ones(4))
    except dist.DistributedError as exc:
        result(rank=rank, error=str(exc), seconds=time.monotonic() - t0)
        sys.exit(3)
    raise AssertionError("the all_reduce with a dead peer returned")


def scenario_hang(sleeper, seconds):
    """Rank `sleeper` never reaches the collective (it sleeps): the others time out with a clear error."""
    dist.init_process_group("cpu", timeout=float(os.environ["TEST_TIMEOUT"]))
    rank = dist.get_rank()
    if rank == sleeper:
        time.sleep(seconds)
        try:
            dist.all_reduce(cg.ones(4))
        except dist.DistributedError as exc:
            result(rank=rank, error=str(exc))
        sys.exit(3)
    t0 = time.monotonic()
    try:
        dist.all_reduce(cg.ones(4))
    except dist.DistributedError as exc:
        result(rank=rank, error=str(exc), seconds=time.monotonic() - t0)
        sys.exit(3)


def scenario_absent():
    """Init with a world size nobody else fills: a timeout error naming the missing ranks."""
    t0 = time.monotonic()
    try:
        dist.init_process_group("cpu", timeout=float(os.environ["TEST_TIMEOUT"]))
    except dist.DistributedError as exc:
        result(rank=int(os.environ["RANK"]), error=str(exc), seconds=time.monotonic() - t0)
        sys.exit(3)


def ddp_run(steps, global_batch, seed, use_ddp, accumulate=1, device="cpu", dtype=None):
    """Train a small reverse GPT in float64; returns (losses, final flat parameters). Each of the
    `world` ranks takes its contiguous share of the same global batch."""
    from cutegrad.data import ReversalTask
    from cutegrad.models import GPTConfig, build_model
    cg.manual_seed(seed)
    model = build_model(GPTConfig(vocab_size=12, block_size=12, n_layer=1, n_head=2, n_embd=16))
    model = model.double() if dtype is None else model.to(dtype)
    model = model.to(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_ddp else (0, 1)
    net = cg.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.002) if use_ddp else model
    opt = cg.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    batches = ReversalTask(vocab_size=12, seq_len=12).batches(global_batch, "train", seed)
    losses = []
    share = global_batch // world
    micro = share // accumulate
    for _ in range(steps):
        inputs, targets = next(batches)
        inputs, targets = inputs[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(accumulate):
            x = cg.from_numpy(np.ascontiguousarray(inputs[k * micro:(k + 1) * micro])).to(device)
            y = cg.from_numpy(np.ascontiguousarray(targets[k * micro:(k + 1) * micro])).to(device)
            last = k == accumulate - 1
            sync = net.no_sync() if use_ddp and not last else _nothing()
            with sync:
                logits = net(x)
                loss = cg.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                (loss / accumulate).backward()
            total += loss.item() / accumulate
        if use_ddp:
            t = cg.tensor([total], dtype=cg.float32 if device != "cpu" else cg.float64).to(device)
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
            total = float(t.cpu().numpy()[0])
        losses.append(total)
        opt.step()
    flat = np.concatenate([p.detach().cpu().numpy().ravel() for p in model.parameters()])
    buckets = net.bucket_sizes if use_ddp else []
    return losses, flat, buckets


def scenario_fds():
    """Every rank shares a memfd through the symmetric workspace's descriptor exchange; each reads every peer's."""
    from cutegrad.distributed import process_group as group_module
    from cutegrad.distributed.symmetric import exchange_fds
    dist.init_process_group("cpu")
    g = group_module.default_group("test")
    fd = os.memfd_create(f"rank{g.rank}")
    os.write(fd, f"payload of rank {g.rank}".encode())
    fds = exchange_fds(g.store, g.rank, g.world_size, fd, "test", g.timeout)
    seen = [os.pread(f, 64, 0).decode() for f in fds]
    dist.destroy_process_group()
    result(rank=g.rank, seen=seen, distinct=len({os.fstat(f).st_ino for f in fds}))


def scenario_gpu(backend, max_bytes):
    """GPU run (not in CI): every collective of `backend` against NCCL (and NumPy), 1 element .. max_bytes,
    bf16/fp16/fp32, eager and inside a captured CUDA graph. all_reduce on "cute" must be bit-identical on
    every rank and equal to the rank-order fp32 sum rounded once."""
    from cutegrad.distributed import process_group
    from cutegrad.distributed.nccl_backend import NcclBackend
    dist.init_process_group(backend)
    g = process_group.default_group("test")
    rank, world, dev = g.rank, g.world_size, f"cuda:{g.backend.device_index}"
    checked = []
    sizes = [1, 7, 8, 1000, 4096, 65536 + 8, 1 << 20, 16 << 20]
    for dtype in ("bfloat16", "float16", "float32"):
        itemsize = 4 if dtype == "float32" else 2
        for n in [s for s in sizes if s * itemsize <= max_bytes] + ([max_bytes // itemsize] if dtype != "float16"
                                                                      else []):
            inputs = [rank_data(r, min(n, 1 << 22), "float32", 7) for r in range(world)]
            host = [np.resize(x, n) for x in inputs]
            mine = as_tensor(host[rank], dtype).to(dev)
            stacked = np.stack([exact(h, dtype) for h in host])
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG, dist.ReduceOp.MAX):
                t = mine.clone()
                dist.all_reduce(t, op=op)
                ref = mine.clone()
                NcclBackend.all_reduce(g.backend, ref, op, False)
                got, want = read(t.cpu()), read(ref.cpu())
                check_close(f"all_reduce {op} {dtype} n={n} vs NCCL", got, want, dtype)
                expect = {"sum": stacked.sum(0), "avg": stacked.mean(0), "max": stacked.max(0)}[op]
                check_close(f"all_reduce {op} {dtype} n={n} vs NumPy", got, expect, dtype)
                gathered = [cg.zeros(n, dtype=getattr(cg, dtype), device=dev) for _ in range(world)]
                dist.all_gather(gathered, t)
                for r in range(world):
                    assert np.array_equal(read(gathered[r].cpu()), got), f"ranks disagree: {op} {dtype} n={n}"
                checked.append((op, dtype, n))
            # captured: the same all-reduce inside a CUDA graph, replayed with fresh inputs
            from cutegrad.graphs import graphed

            def step(x):
                y = x.clone()
                dist.all_reduce(y)
                return y
            replay = graphed(step, (mine,), warmup=1)
            for k in range(3):
                fresh = [exact(np.resize(rank_data(r, min(n, 1 << 22), "float32", 100 + k), n), dtype)
                         for r in range(world)]
                out = replay(as_tensor(fresh[rank], dtype).to(dev))
                check_close(f"graphed all_reduce {dtype} n={n} replay {k}", read(out.cpu()), np.sum(fresh, 0), dtype)
            replay.reset()
    # a misaligned slice and a strided view take the same path as their peers' (through copies)
    total = float(sum(range(1, world + 1)))
    base = cg.full((4001,), float(rank + 1), device=dev)
    view = base[1:] if rank == 0 else base[:4000]
    dist.all_reduce(view)
    assert np.all(view.cpu().numpy() == total), "misaligned all_reduce"
    grid = cg.full((64, 2), float(rank + 1), device=dev)
    column = grid[:, 0] if rank == 0 else cg.full((64,), float(rank + 1), device=dev)
    dist.all_reduce(column)
    assert np.all(column.cpu().numpy() == total) and np.all(grid[:, 1].cpu().numpy() == rank + 1), "strided"
    for src in range(world):
        t = cg.full((1001,), float(rank), device=dev)
        dist.broadcast(t, src=src)
        assert np.all(t.cpu().numpy() == src)
    out = cg.zeros(3, device=dev)
    dist.reduce_scatter_tensor(out, cg.arange(3 * world, dtype=cg.float32, device=dev))
    assert np.array_equal(out.cpu().numpy(), world * np.arange(3 * rank, 3 * rank + 3, dtype=np.float32))
    dist.barrier()
    kernel = getattr(g.backend, "last_kernel", None)
    dist.destroy_process_group()
    result(rank=rank, checked=len(checked), last_kernel=kernel)


def scenario_gpu_ddp(backend, steps, out):
    """GPU run (not in CI): DDP on 2 GPUs equals one GPU at the same global batch (float32, tolerance)."""
    dist.init_process_group(backend)
    rank = dist.get_rank()
    losses, flat, _ = ddp_run(steps, 8, 0, True, 1, device=f"cuda:{rank}", dtype=cg.float32)
    if rank == 0:
        np.savez(out, losses=np.array(losses), params=flat)
    dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def scenario_ddp(steps, global_batch, out, accumulate):
    dist.init_process_group("cpu")
    rank = dist.get_rank()
    losses, flat, buckets = ddp_run(steps, global_batch, 0, True, accumulate)
    if rank == 0:
        np.savez(out, losses=np.array(losses), params=flat)
    dist.destroy_process_group()
    result(rank=rank, buckets=buckets)


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    os.write(1, f"PID {os.getpid()}\n".encode())
    if name == "collectives":
        scenario_collectives([int(s) for s in args[0].split(",")], args[1].split(","))
    elif name == "mismatch":
        scenario_mismatch()
    elif name == "lifecycle":
        scenario_lifecycle()
    elif name == "die":
        scenario_die(int(args[0]))
    elif name == "hang":
        scenario_hang(int(args[0]), float(args[1]))
    elif name == "absent":
        scenario_absent()
    elif name == "fds":
        scenario_fds()
    elif name == "gpu":
        scenario_gpu(args[0], int(args[1]))
    elif name == "gpu_ddp":
        scenario_gpu_ddp(args[0], int(args[1]), args[2])
    elif name == "ddp":
        scenario_ddp(int(args[0]), int(args[1]), args[2], int(args[3]))
    else:
        raise SystemExit(f"unknown scenario {name}")
