"""The process group: rendezvous, the collectives' common checks, work handles.

`init_process_group` builds one `ProcessGroup` per process (the default group,
as in torch.distributed).  It owns:
- the TCP store (rank 0 serves it) used for the rendezvous and, by the
  backends, as a control plane;
- a backend object ("cpu", "nccl" or "cute") that moves the bytes;
- a single worker thread that runs the CPU backend's collectives in the order
  they were issued (async_op returns at once; a synchronous call waits for its
  own work, which also orders it after earlier async ones).

Every collective is checked twice.  Locally, before anything is sent: tensor
types, devices matching the backend, list lengths, a known reduce op, output
shapes.  Across ranks: each collective posts a signature (name, dtype, shapes,
op, root) and every rank compares all of them, so a shape or dtype that differs
on one rank raises the same `ValueError` on every rank.  The CPU backend gets
this for free (its data exchange goes through the store anyway); the GPU
backends do it through the store unless `CUTEGRAD_DISTRIBUTED_CHECKS=0` or a
CUDA graph is being captured (docs/distributed.md).

Faults: a store wait that is not satisfied within the group's timeout, or
that can never be satisfied because a rank died or left, raises
`DistributedError` naming the collective and the missing ranks; the group is
then marked broken and every later collective raises at once.
"""
import atexit
import contextlib
import itertools
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from .store import StoreClient, StoreError, StoreServer, StoreTimeout

DEFAULT_TIMEOUT = timedelta(minutes=5)
BACKENDS = ("cpu", "nccl", "cute")


class DistributedError(RuntimeError):
    """A collective could not complete: a timeout, a rank that died or left, a broken group."""


class ReduceOp:
    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"
    ALL = (SUM, AVG, MAX, MIN)


class Work:
    """Handle of a collective issued with async_op=True (and returned, completed, otherwise).

    wait() blocks until the collective is done (CPU backend) or, for GPU
    backends, makes the current stream wait for it, as torch's NCCL work does;
    it re-raises the collective's error.  is_completed() never blocks."""

    def __init__(self, future=None, event=None, result=None):
        self._future = future
        self._event = event
        self._result = result

    def wait(self, timeout=None):
        if self._future is not None:
            self._future.result(timeout)
        if self._event is not None:
            from .. import cuda
            cuda.current_stream().wait_event(self._event)
        return True

    def is_completed(self):
        if self._future is not None and not self._future.done():
            return False
        if self._event is not None:
            return self._event.query()
        return True

    def exception(self):
        return self._future.exception() if self._future is not None and self._future.done() else None

    def result(self):
        self.wait()
        return self._result


def _seconds(timeout):
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if seconds <= 0:
        raise ValueError(f"init_process_group: timeout must be positive, got {timeout!r}")
    return seconds


def _env_int(name, given):
    if given is not None and given >= 0:
        return int(given)
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"init_process_group: {name} is not set (env:// reads MASTER_ADDR, MASTER_PORT, RANK, "
                         f"WORLD_SIZE from the environment; `cutegrad launch` sets them) and was not given")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"init_process_group: {name}={value!r} is not an integer") from None


def _rendezvous_address(init_method):
    if init_method is None or init_method == "env://":
        addr = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        if addr is None or port is None:
            raise ValueError("init_process_group: env:// needs MASTER_ADDR and MASTER_PORT in the environment "
                             "(`cutegrad launch` sets them)")
        return addr, int(port)
    if init_method.startswith("tcp://"):
        host, _, port = init_method[len("tcp://"):].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"init_process_group: init_method {init_method!r} is not tcp://HOST:PORT")
        return host.strip("[]"), int(port)
    raise ValueError(f"init_process_group: init_method {init_method!r} is not supported (env:// or tcp://HOST:PORT)")


def _listen_address(host):
    """Where rank 0's store listens: the loopback address itself when MASTER_ADDR is one (single-node
    jobs and tests stay off the network), else every interface, as torch's TCPStore does (a host
    name may resolve to another local address than the one remote nodes reach)."""
    try:
        resolved = socket.gethostbyname(host)
    except OSError:
        return host
    return resolved if resolved.startswith("127.") else ""


class ProcessGroup:
    def __init__(self, backend, rank, world_size, store, server, timeout):
        self.backend_name = backend
        self.rank = rank
        self.world_size = world_size
        self.store = store
        self._server = server
        self.timeout = timeout
        self._seq = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cutegrad-dist-r{rank}")
        self.broken = None
        self.destroyed = False
        self.backend = None

    # --- bookkeeping shared by the backends -------------------------------------
    def next_seq(self):
        return next(self._seq)

    def check_usable(self, what):
        if self.destroyed:
            raise DistributedError(f"{what}: the process group was destroyed (destroy_process_group); "
                                   f"call init_process_group again first")
        if self.broken is not None:
            raise DistributedError(f"{what}: the process group is broken by an earlier error on rank {self.rank} "
                                   f"({self.broken}); destroy it and start a new job")

    def exchange(self, what, seq, value, keys_prefix="c"):
        """Post this rank's value for collective `seq` and return every rank's, in rank order.

        Timeouts and dead peers become DistributedError (and break the group)."""
        key = f"{keys_prefix}{seq}/{self.rank}"
        old = f"{keys_prefix}{seq - 2}/{self.rank}" if seq >= 2 else None
        keys = [f"{keys_prefix}{seq}/{r}" for r in range(self.world_size)]
        try:
            return self.store.exchange(key, value, old, keys, self.timeout)
        except StoreTimeout as exc:
            missing = sorted({int(k.rsplit("/", 1)[1]) for k in exc.args[0] if "/" in k})
            self.broken = (f"{what} timed out after {self.timeout:g} s on rank {self.rank} waiting for "
                           f"rank(s) {missing}, which never reached it (dead, hung, or running other collectives)")
            raise DistributedError(self.broken) from None
        except StoreError as exc:
            self.broken = f"{what} failed on rank {self.rank}: {exc}"
            raise DistributedError(self.broken) from None

    def check_signatures(self, what, signatures):
        """Raise the same ValueError on every rank when the ranks' collectives differ."""
        first = signatures[0]
        if all(s == first for s in signatures):
            return
        lines = "; ".join(f"rank {r}: {s}" for r, s in enumerate(signatures))
        raise ValueError(f"{what}: the ranks' arguments differ (every rank must pass the same op, dtype and "
                         f"shapes): {lines}")

    def run(self, fn, async_op):
        """Run fn() on the group's worker thread, in issue order; a Work when async_op."""
        future = self._executor.submit(fn)
        if async_op:
            return Work(future)
        future.result()
        return None

    def shutdown(self):
        self._executor.shutdown(wait=True)


_GROUP = None
_checks = threading.local()


@contextlib.contextmanager
def skip_cross_rank_checks():
    """Collectives issued by this thread inside skip the GPU backends' store round trip that compares
    the ranks' arguments.  For callers whose arguments agree by construction (DDP's buckets, made
    from parameters whose shapes were checked when rank 0's were broadcast)."""
    _checks.off = getattr(_checks, "off", 0) + 1
    try:
        yield
    finally:
        _checks.off -= 1


def cross_rank_checks_wanted():
    return not getattr(_checks, "off", 0)


def _group(what, usable=True):
    if _GROUP is None:
        raise DistributedError(f"{what}: the default process group is not initialized; call "
                               f"cutegrad.distributed.init_process_group first")
    if usable:
        _GROUP.check_usable(what)
    return _GROUP


def _current(group, what, usable=True):
    if group is not None and group is not _GROUP and group is not WORLD:
        raise ValueError(f"{what}: only the default group (group=None) is supported")
    return _group(what, usable)


class _World:
    """Sentinel for torch's `dist.group.WORLD`."""

    def __repr__(self):
        return "cutegrad.distributed.group.WORLD"


WORLD = _World()


def init_process_group(backend="cpu", init_method="env://", timeout=None, world_size=-1, rank=-1, store=None,
                       device_id=None):
    """Join the default process group: rendezvous through the TCP store, then the backend's setup.

    backend: "cpu" (shared memory between local processes; "gloo" is accepted as its name), "nccl", or "cute"
    (our all-reduce inside one node, NCCL for the rest).  init_method: "env://"
    (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) or "tcp://HOST:PORT".  rank and
    world_size override the environment.  timeout: a timedelta or seconds
    (default 5 minutes) for every wait of the rendezvous and the collectives."""
    global _GROUP
    if _GROUP is not None and not _GROUP.destroyed:
        raise RuntimeError("init_process_group: the default process group is already initialized "
                           "(call destroy_process_group first)")
    if store is not None:
        raise ValueError("init_process_group: passing a store is not supported; use init_method")
    if backend == "gloo":
        backend = "cpu"  # torch's CPU backend name, so CPU scripts written for torch run unchanged
    if backend not in BACKENDS:
        raise ValueError(f"init_process_group: unknown backend {backend!r}; choose one of {BACKENDS} (or 'gloo', "
                         f"the same as 'cpu')")
    seconds = _seconds(timeout)
    world = _env_int("WORLD_SIZE", world_size)
    me = _env_int("RANK", rank)
    if world < 1:
        raise ValueError(f"init_process_group: world_size must be >= 1, got {world}")
    if not 0 <= me < world:
        raise ValueError(f"init_process_group: rank {me} is outside [0, {world})")
    host, port = _rendezvous_address(init_method)

    try:
        server = StoreServer(_listen_address(host), port, world).start() if me == 0 else None
    except StoreError as exc:
        raise DistributedError(f"init_process_group: {exc}") from None
    try:
        client = StoreClient(host, server.port if server is not None else port, me, seconds)
    except BaseException as exc:
        if server is not None:
            server.close()
        if isinstance(exc, StoreError):
            raise DistributedError(f"init_process_group: {exc}") from None
        raise
    group = ProcessGroup(backend, me, world, client, server, seconds)
    try:
        # Rendezvous: everyone posts its host name; a rank that never arrives times out here.
        hosts = group.exchange("init_process_group (rendezvous)", group.next_seq(), socket.gethostname(),
                               keys_prefix="init")
        group.hosts = hosts
        group.backend = _make_backend(backend, group, device_id)
    except BaseException:
        _teardown(group, clean=False)
        raise
    _GROUP = group
    atexit.register(_destroy_at_exit, group)


def _make_backend(name, group, device_id):
    if name == "cpu":
        from .cpu_backend import CpuBackend
        return CpuBackend(group)
    if name == "nccl":
        from .nccl_backend import NcclBackend
        return NcclBackend(group, device_id)
    from .cute_backend import CuteBackend
    return CuteBackend(group, device_id)


def _teardown(group, clean):
    group.destroyed = True
    group.shutdown()
    if group._server is not None:
        # Rank 0 serves the store: let the peers finish with it first (after a clean destroy they are
        # saying bye; after a failure they learn from it which rank failed, instead of only that rank 0
        # went away), and only then remove what they might still read.
        group._server.wait_all_departed(group.timeout if clean else min(group.timeout, 10.0))
    if group.backend is not None:
        group.backend.close()
    group.store.close(clean=clean)
    if group._server is not None:
        group._server.close()


def _destroy_at_exit(group):
    if not group.destroyed:
        _teardown(group, clean=group.broken is None)


def destroy_process_group(group=None):
    """Leave the default group: a final barrier (so no peer still reads this rank's memory),
    then the backend's resources, the store connection and, on rank 0, the store."""
    global _GROUP
    if _GROUP is None or _GROUP.destroyed:
        raise DistributedError("destroy_process_group: no process group is initialized")
    g = _current(group, "destroy_process_group", usable=False)
    clean = g.broken is None
    if clean:
        try:
            g.run(lambda: g.exchange("destroy_process_group", g.next_seq(), None), async_op=False)
        except DistributedError:
            clean = False
    _teardown(g, clean)
    _GROUP = None


def is_initialized():
    return _GROUP is not None and not _GROUP.destroyed


def is_available():
    return True


def get_rank(group=None):
    return _current(group, "get_rank", usable=False).rank


def get_world_size(group=None):
    return _current(group, "get_world_size", usable=False).world_size


def get_backend(group=None):
    return _current(group, "get_backend", usable=False).backend_name


def default_group(what):
    """The default group, checked usable for `what` (a collective's name)."""
    return _group(what)
