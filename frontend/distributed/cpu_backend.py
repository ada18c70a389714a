"""The "cpu" backend: collectives of CPU tensors between processes of one host, through shared memory.

Memory.  Each rank owns two shared files under one job directory in /dev/shm
(falling back to the temp dir), `r<rank>.p<parity>.g<generation>`, mapped
with mmap; peers map them read-only on first use.  A file only grows: a
collective larger than it makes a new generation (at least twice the size),
announced in that collective's metadata; peers remap when they see it.

One collective, number `seq`, on each rank (on the group's worker thread):
1. write this rank's payload (its input, or the concatenated inputs of
   reduce_scatter) into its file of parity `seq % 2`;
2. one store round trip (`exchange`): post `(signature, generation, nbytes)`
   and receive every rank's;
3. compare the signatures (a mismatch raises the same ValueError everywhere);
4. read the peers' payloads and compute this rank's result, reducing in rank
   order 0, 1, ..., so every rank gets bit-identical results; float16 and
   bfloat16 accumulate in float32 and round once.
Why two files: a rank writes parity `p` again at collective `seq + 2`, which it
reaches only after every peer posted `seq + 1`, i.e. after every peer finished
reading `seq`.  So no second barrier is needed.

The job directory's name comes from rank 0 through the store; every rank
removes its own files when the group is destroyed (or at exit), rank 0 the
directory.  All ranks must be on one host (checked at init).
"""
import mmap
import os
import shutil
import tempfile
import uuid

import numpy as np

from .process_group import DistributedError, ReduceOp

_MIN_FILE = 1 << 16


def shm_root():
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class _OwnFile:
    """This rank's shared file of one parity."""

    def __init__(self, directory, rank, parity):
        self.prefix = os.path.join(directory, f"r{rank}.p{parity}")
        self.gen = -1
        self.map = None
        self.size = 0

    def ensure(self, nbytes):
        if self.map is not None and nbytes <= self.size:
            return
        size = max(nbytes, 2 * self.size, _MIN_FILE)
        self.close()
        self.gen += 1
        path = f"{self.prefix}.g{self.gen}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size

    def close(self):
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a NumPy view still alive: the mapping goes with it
                pass
            self.map = None
            try:
                os.unlink(f"{self.prefix}.g{self.gen}")
            except FileNotFoundError:
                pass


class CpuBackend:
    device_type = "cpu"
    device_index = None

    def __init__(self, group):
        self.group = group
        if len(set(group.hosts)) != 1:
            raise ValueError(f"init_process_group: the 'cpu' backend needs every rank on one host, got hosts "
                             f"{group.hosts}; use 'nccl' across nodes")
        if group.rank == 0:
            # named after the launcher's job tag, so `cutegrad launch` can remove it after killing workers
            job = os.environ.get("CUTEGRAD_JOB_TAG", str(os.getpid()))
            directory = os.path.join(shm_root(), f"cutegrad-{job}-{uuid.uuid4().hex[:12]}")
            os.makedirs(directory, mode=0o700)
            group.store.set("cpu/dir", directory)
        directory = group.store.wait(["cpu/dir"], timeout=group.timeout)[0]
        self.directory = directory
        self._own = [_OwnFile(directory, group.rank, p) for p in (0, 1)]
        self._peers = {}  # (rank, parity) -> (gen, mmap)

    # --- plumbing ---------------------------------------------------------------
    def _peer_bytes(self, rank, parity, gen, nbytes):
        if rank == self.group.rank:
            return self._own[parity].map
        entry = self._peers.get((rank, parity))
        if entry is None or entry[0] != gen:
            if entry is not None:
                self._close_map(entry[1])
            path = os.path.join(self.directory, f"r{rank}.p{parity}.g{gen}")
            fd = os.open(path, os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            entry = self._peers[(rank, parity)] = (gen, m)
        return entry[1]

    @staticmethod
    def _close_map(m):
        try:
            m.close()
        except BufferError:
            pass

    def _run(self, what, signature, payload, consume, async_op):
        """Exchange payload (list of NumPy arrays written back to back) and call
        consume(read) on this rank's worker, read(rank, start_byte, dtype, count) giving peers' data."""
        g = self.group

        def collective():
            g.check_usable(what)
            seq = g.next_seq()
            parity = seq % 2
            nbytes = sum(a.nbytes for a in payload)
            own = self._own[parity]
            try:
                own.ensure(nbytes)
            except FileNotFoundError:
                g.broken = (f"{what} on rank {g.rank}: the job's shared-memory directory {self.directory} is gone; "
                            f"rank 0 has exited")
                raise DistributedError(g.broken) from None
            offset = 0
            for a in payload:
                np.frombuffer(own.map, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)[...] = a
                offset += a.nbytes
            metas = g.exchange(f"{what} (collective #{seq})", seq, (signature, own.gen, nbytes))
            g.check_signatures(what, [m[0] for m in metas])

            def read(rank, start, dtype, count):
                gen, size = metas[rank][1], metas[rank][2]
                if start + count * dtype.itemsize > size:
                    raise ValueError(f"{what}: rank {rank} posted {size} bytes, {start + count * dtype.itemsize} "
                                     f"needed")
                return np.frombuffer(self._peer_bytes(rank, parity, gen, size), dtype=dtype, count=count,
                                     offset=start)
            consume(read)
        return g.run(collective, async_op)

    @staticmethod
    def _store(tensor, values):
        tensor._np[...] = values.reshape(tensor._np.shape)
        tensor._storage.version += 1

    def _reduce(self, read, op, dtype, start, count):
        acc_dtype = np.float32 if dtype.name in ("float16", "bfloat16") else dtype.np
        world = self.group.world_size
        acc = read(0, start, dtype.np, count).astype(acc_dtype)
        for r in range(1, world):
            part = read(r, start, dtype.np, count)
            if op in (ReduceOp.SUM, ReduceOp.AVG):
                acc += part
            elif op == ReduceOp.MAX:
                np.maximum(acc, part, out=acc)
            else:
                np.minimum(acc, part, out=acc)
        if op == ReduceOp.AVG:
            acc /= world
        return acc.astype(dtype.np)

    # --- collectives ------------------------------------------------------------
    def all_reduce(self, tensor, op, async_op):
        n = tensor.numel()

        def consume(read):
            self._store(tensor, self._reduce(read, op, tensor.dtype, 0, n))
        return self._run("all_reduce", ("all_reduce", op, tensor.dtype.name, tuple(tensor.shape)),
                         [tensor._np], consume, async_op)

    def broadcast(self, tensor, src, async_op):
        rank = self.group.rank

        def consume(read):
            if rank != src:
                self._store(tensor, read(src, 0, tensor.dtype.np, tensor.numel()))
        return self._run("broadcast", ("broadcast", src, tensor.dtype.name, tuple(tensor.shape)),
                         [tensor._np] if rank == src else [], consume, async_op)

    def all_gather(self, tensor_list, tensor, async_op):
        n = tensor.numel()

        def consume(read):
            for r, out in enumerate(tensor_list):
                self._store(out, read(r, 0, tensor.dtype.np, n))
        return self._run("all_gather", ("all_gather", tensor.dtype.name, tuple(tensor.shape)),
                         [tensor._np], consume, async_op)

    def all_gather_into_tensor(self, output, tensor, async_op):
        n, world = tensor.numel(), self.group.world_size

        def consume(read):
            self._store(output, np.concatenate([read(r, 0, tensor.dtype.np, n) for r in range(world)]))
        return self._run("all_gather_into_tensor", ("all_gather_into_tensor", tensor.dtype.name,
                                                    tuple(tensor.shape)), [tensor._np], consume, async_op)

    def reduce_scatter(self, output, input_list, op, async_op):
        n, rank = output.numel(), self.group.rank

        def consume(read):
            self._store(output, self._reduce(read, op, output.dtype, rank * n * output.dtype.itemsize, n))
        return self._run("reduce_scatter", ("reduce_scatter", op, output.dtype.name, tuple(output.shape)),
                         [t._np for t in input_list], consume, async_op)

    def reduce_scatter_tensor(self, output, input, op, async_op):
        n, rank = output.numel(), self.group.rank

        def consume(read):
            self._store(output, self._reduce(read, op, output.dtype, rank * n * output.dtype.itemsize, n))
        return self._run("reduce_scatter_tensor", ("reduce_scatter_tensor", op, output.dtype.name, n),
                         [input._np], consume, async_op)

    def barrier(self, async_op):
        return self._run("barrier", ("barrier",), [], lambda read: None, async_op)

    def close(self):
        for own in self._own:
            own.close()
        for _, m in self._peers.values():
            self._close_map(m)
        self._peers.clear()
        if self.group.rank == 0:
            shutil.rmtree(self.directory, ignore_errors=True)

