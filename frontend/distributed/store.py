"""A small key-value store over TCP: the rendezvous and control plane of a process group.

Rank 0 runs the server (a daemon thread); every rank, rank 0 included, talks to
it through a `StoreClient` on its own connection.  Messages are length-prefixed
pickles of `(command, *args)`; the server answers each with `("ok", value)` or
`("error", message)`.

Commands:
- `hello rank`: first message of a connection; the server records which rank
  the connection belongs to, so a connection that closes without `bye` marks
  that rank as dead (its process exited or crashed).
- `set key value`, `get key`, `delete key`, `add key amount` (an integer
  counter, returns the new value).
- `wait keys counters timeout`: block until every key in `keys` exists and
  every `(key, target)` counter reaches its target.  It fails at once with
  the dead or departed ranks named when some rank has left the group while the
  condition is unmet (the waiting could never end), and with a timeout error
  listing the keys still missing after `timeout` seconds.
- `exchange key value old_key keys timeout`: one round trip of a collective:
  set `key`, delete `old_key` (this rank's entry of an earlier collective,
  which every peer has read by now), wait for `keys` and return their values.
- `bye`: a clean departure (destroy_process_group).

Waits are answered by the server's thread for that connection, blocking on one
condition variable: no polling on either side.  The server listens on the
address it is given (loopback in tests); it trusts its clients, as torch's
TCPStore does, so it must not face an untrusted network.
"""
import pickle
import socket
import struct
import threading
import time

_HEADER = struct.Struct("!Q")


class StoreError(RuntimeError):
    """A store request failed: timeout, a rank that died or left, or a lost connection."""


class StoreTimeout(StoreError):
    pass


def _send(sock, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock, n):
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock):
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, n))


class StoreServer:
    """The server side; `StoreServer(host, port).start()` returns once it listens."""

    def __init__(self, host, port, world_size):
        self.world_size = world_size
        self._data = {}
        self._cond = threading.Condition()
        self._dead = {}  # rank -> "died" | "left"
        self._connected = set()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise StoreError(f"cannot listen on {host}:{port} for the rendezvous: {exc} "
                             f"(is another job using MASTER_PORT {port}?)") from None
        self._sock.listen(max(world_size, 8) * 2)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._threads = []

    def start(self):
        t = threading.Thread(target=self._accept_loop, name="cutegrad-store", daemon=True)
        t.start()
        return self

    def _accept_loop(self):
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn,), name="cutegrad-store-conn", daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn):
        rank = None
        clean = False
        try:
            while True:
                try:
                    msg = _recv(conn)
                except (ConnectionError, OSError):
                    return
                cmd, args = msg[0], msg[1:]
                if cmd == "hello":
                    rank = args[0]
                    with self._cond:
                        self._connected.add(rank)
                        self._dead.pop(rank, None)
                        self._cond.notify_all()
                    _send(conn, ("ok", None))
                elif cmd == "bye":
                    clean = True
                    _send(conn, ("ok", None))
                    return
                else:
                    _send(conn, self._handle(cmd, args))
        finally:
            conn.close()
            if rank is not None:
                with self._cond:
                    self._connected.discard(rank)
                    self._dead[rank] = "left" if clean else "died"
                    self._cond.notify_all()

    def _handle(self, cmd, args):
        with self._cond:
            if cmd == "set":
                self._data[args[0]] = args[1]
                self._cond.notify_all()
                return ("ok", None)
            if cmd == "get":
                return ("ok", self._data.get(args[0]))
            if cmd == "delete":
                self._data.pop(args[0], None)
                return ("ok", None)
            if cmd == "add":
                value = self._data.get(args[0], 0) + args[1]
                self._data[args[0]] = value
                self._cond.notify_all()
                return ("ok", value)
            if cmd == "wait":
                return self._wait(*args)
            if cmd == "exchange":
                key, value, old_key, keys, timeout = args
                self._data[key] = value
                if old_key is not None:
                    self._data.pop(old_key, None)
                self._cond.notify_all()
                return self._wait(keys, (), timeout)
            if cmd == "connected":
                return ("ok", sorted(self._connected))
        return ("error", f"unknown store command {cmd!r}")

    def _missing(self, keys, counters):
        missing = [k for k in keys if k not in self._data]
        missing += [k for k, target in counters if self._data.get(k, 0) < target]
        return missing

    def _wait(self, keys, counters, timeout):
        deadline = time.monotonic() + timeout
        while True:
            missing = self._missing(keys, counters)
            if not missing:
                return ("ok", [self._data[k] for k in keys])
            if self._dead:
                gone = ", ".join(f"rank {r} {how}" for r, how in sorted(self._dead.items()))
                return ("error", f"peer gone: {gone}; still waiting for {missing}")
            left = deadline - time.monotonic()
            if left <= 0:
                return ("timeout", missing)
            self._cond.wait(left)

    def wait_all_departed(self, timeout):
        """Rank 0's destroy: wait until every other rank has said bye or died, so no
        client loses the server in the middle of a request."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._connected - {0}:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self):
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass


class StoreClient:
    """One rank's connection to the store."""

    def __init__(self, host, port, rank, timeout):
        self.rank = rank
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                self._sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
                break
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreTimeout(f"rank {rank} could not reach the rendezvous store at {host}:{port} within "
                                       f"{timeout:g} s ({exc}); is rank 0 running with the same MASTER_ADDR/"
                                       f"MASTER_PORT?") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self._request("hello", rank)

    def _request(self, *msg):
        with self._lock:
            try:
                _send(self._sock, msg)
                status, value = _recv(self._sock)
            except (ConnectionError, OSError) as exc:
                raise StoreError(f"rank {self.rank} lost its connection to the rendezvous store on rank 0 "
                                 f"({exc}): rank 0 exited or crashed") from None
        if status == "error":
            raise StoreError(value)
        if status == "timeout":
            raise StoreTimeout(value)
        return value

    def set(self, key, value):
        self._request("set", key, value)

    def get(self, key):
        return self._request("get", key)

    def delete(self, key):
        self._request("delete", key)

    def add(self, key, amount=1):
        return self._request("add", key, amount)

    def wait(self, keys=(), counters=(), timeout=None):
        """Block until `keys` exist and counters `(key, target)` reach their targets; returns
        the values of `keys`.

        Raises StoreTimeout with the list of what is still missing, or StoreError when
        a rank has died or left while the condition was unmet."""
        return self._request("wait", list(keys), list(counters), self.timeout if timeout is None else timeout)

    def exchange(self, key, value, old_key, keys, timeout=None):
        """Set key, delete old_key, wait for keys and return their values (one round trip)."""
        return self._request("exchange", key, value, old_key, list(keys), self.timeout if timeout is None else timeout)

    def connected_ranks(self):
        return self._request("connected")

    def close(self, clean=True):
        try:
            if clean:
                self._request("bye")
        except StoreError:
            pass
        finally:
            self._sock.close()
