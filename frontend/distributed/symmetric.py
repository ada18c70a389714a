"""The symmetric workspace of the "cute" backend: one cuMem allocation per rank, mapped by every rank.

Each rank (one process per GPU, all on one node):
1. creates `nbytes` of device memory with cuMemCreate, shareable as a POSIX
   file descriptor (CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR), maps it into its
   own address space (cuMemAddressReserve + cuMemMap + cuMemSetAccess) and
   zeroes it (the flags must start at 0);
2. exports the descriptor (cuMemExportToShareableHandle) and exchanges
   descriptors with every peer over Unix-domain sockets (`exchange_fds`: file
   descriptors can only travel between processes as SCM_RIGHTS messages);
3. imports each peer's descriptor (cuMemImportFromShareableHandle), maps it
   and grants its own device access.
The result is `bases[p]`: rank p's workspace as mapped in this process.  The
addresses differ per process; the kernel takes the list.  Nothing here uses
NVLink multicast (cuMulticastCreate is never called).

`exchange_fds` is plain socket code, tested on the CPU with memfd descriptors
(tests/test_distributed_symmetric.py).  The sockets live in the abstract
namespace (no file to clean up), named from a job token the store hands out.
"""
import os
import socket
import threading

_MAX_FDS_MSG = 1


def _address(token, rank):
    return "\0" + f"cutegrad-{token}-r{rank}"


def exchange_fds(store, rank, world, fd, tag, timeout):
    """Give `fd` to every peer and return every rank's descriptor (this rank's own `fd` at its index).

    Each rank listens on its abstract socket and serves its descriptor to the
    world - 1 peers that connect; it connects to every peer to receive theirs.
    The store orders it: nobody connects before every listener is up."""
    if rank == 0:
        store.set(f"symm/{tag}/token", f"{os.getpid()}-{os.urandom(6).hex()}")
    token = store.wait([f"symm/{tag}/token"], timeout=timeout)[0]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(_address(f"{token}-{tag}", rank))
    listener.listen(world)
    listener.settimeout(timeout)
    errors = []

    def serve():
        try:
            for _ in range(world - 1):
                conn, _ = listener.accept()
                with conn:
                    socket.send_fds(conn, [rank.to_bytes(4, "little")], [fd])
        except OSError as exc:
            errors.append(exc)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        store.add(f"symm/{tag}/listening", 1)
        store.wait(counters=[(f"symm/{tag}/listening", world)], timeout=timeout)
        fds = [None] * world
        fds[rank] = fd
        for peer in range(world):
            if peer == rank:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(_address(f"{token}-{tag}", peer))
                msg, got, _, _ = socket.recv_fds(s, 4, _MAX_FDS_MSG)
                if len(got) != 1 or int.from_bytes(msg, "little") != peer:
                    raise RuntimeError(f"symmetric workspace: rank {peer} sent no descriptor")
                fds[peer] = got[0]
        server.join(timeout)
        if errors or server.is_alive():
            raise RuntimeError(f"symmetric workspace: serving the descriptor to the peers failed: "
                               f"{errors[0] if errors else 'timed out'}")
        return fds
    finally:
        listener.close()


class SymmetricWorkspace:
    """`nbytes` of device memory per rank, every rank's mapped here: `bases[p]` (ints)."""

    def __init__(self, group, device_index, nbytes):
        from ..cuda import driver as drv
        d = drv.driver()
        drv.activate(device_index)
        self._drv = drv
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        prop.requestedHandleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        gran = drv.call("cuMemGetAllocationGranularity", prop,
                        d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        self.nbytes = -(-nbytes // gran) * gran
        self._access = d.CUmemAccessDesc()
        self._access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = device_index
        self._access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._handles, self._ranges = [], []
        own = drv.call("cuMemCreate", self.nbytes, prop, 0)
        self._handles.append(own)
        fd = drv.call("cuMemExportToShareableHandle", own,
                      d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)
        fds = exchange_fds(group.store, group.rank, group.world_size, int(fd), "cute", group.timeout)
        self.bases = []
        for p, peer_fd in enumerate(fds):
            if p == group.rank:
                handle = own
            else:
                handle = drv.call("cuMemImportFromShareableHandle", peer_fd,
                                  d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
                self._handles.append(handle)
                os.close(peer_fd)
            self.bases.append(self._map(handle))
        os.close(int(fd))
        drv.call("cuMemsetD8", self.bases[group.rank], 0, self.nbytes)
        drv.call("cuCtxSynchronize")
        # every rank's flags are zero before anyone launches a kernel that writes a peer's
        group.exchange("symmetric workspace (zeroed)", group.next_seq(), None, keys_prefix="symm")

    def _map(self, handle):
        drv = self._drv
        ptr = drv.call("cuMemAddressReserve", self.nbytes, 0, 0, 0)
        drv.call("cuMemMap", ptr, self.nbytes, 0, handle, 0)
        drv.call("cuMemSetAccess", ptr, self.nbytes, [self._access], 1)
        self._ranges.append(ptr)
        return int(ptr)

    def close(self):
        drv = self._drv
        for ptr in self._ranges:
            drv.call_status("cuMemUnmap", ptr, self.nbytes)
            drv.call_status("cuMemAddressFree", ptr, self.nbytes)
        for h in self._handles:
            drv.call_status("cuMemRelease", h)
        self._ranges, self._handles = [], []
