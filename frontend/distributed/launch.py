"""`cutegrad launch`: start one process per GPU (or CPU worker) on this node, with torchrun's flags and env.

    cutegrad launch --nproc-per-node 2 train.py --lr 1e-3
    cutegrad launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 \\
        --nproc-per-node 8 -m mypkg.train

Each worker gets RANK (node_rank * nproc_per_node + local_rank), LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK (the node rank), NODE_RANK,
MASTER_ADDR, MASTER_PORT, and OMP_NUM_THREADS=1 when more than one worker shares
the node and it is unset (as torchrun does).  `--standalone` is one node on a
free loopback port.

Supervision: the launcher waits for its workers.  When one exits with an
error the others are sent SIGTERM, then SIGKILL after `--grace-period`
seconds, and the launcher exits with the failed worker's code; SIGINT and
SIGTERM to the launcher are passed on the same way.  No worker outlives it, and
the shared-memory folders of the job's "cpu" backend (named with the
CUTEGRAD_JOB_TAG it gives its workers) are removed even when a killed worker
could not remove them.
"""
import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def add_arguments(p):
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1,
                   help="workers on this node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument("--node-rank", "--node_rank", type=int, default=0, help="this node's rank in [0, nnodes)")
    p.add_argument("--master-addr", "--master_addr", default="127.0.0.1",
                   help="address of node 0, where rank 0 serves the rendezvous store")
    p.add_argument("--master-port", "--master_port", type=int, default=29500, help="port of the rendezvous store")
    p.add_argument("--standalone", action="store_true", help="one node, a free port on 127.0.0.1")
    p.add_argument("--grace-period", type=float, default=5.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the workers after a failure")
    p.add_argument("-m", "--module", action="store_true", help="run the target as a module (python -m)")
    p.add_argument("--no-python", "--no_python", action="store_true",
                   help="run the target as an executable, not through python")
    p.add_argument("target", help="the script (or, with -m, the module) each worker runs")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(base, nproc, nnodes, node_rank, local_rank, addr, port, job_tag):
    env = dict(base)
    env.update(RANK=str(node_rank * nproc + local_rank), LOCAL_RANK=str(local_rank),
               WORLD_SIZE=str(nnodes * nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank),
               NODE_RANK=str(node_rank), MASTER_ADDR=addr, MASTER_PORT=str(port), CUTEGRAD_JOB_TAG=job_tag)
    if nproc > 1 and "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = "1"
    return env


def command(args):
    if args.no_python:
        return [args.target, *args.args]
    if args.module:
        return [sys.executable, "-u", "-m", args.target, *args.args]
    return [sys.executable, "-u", args.target, *args.args]


def _remove_job_files(job_tag):
    """Shared-memory folders of this job's "cpu" backend that killed workers could not remove."""
    from .cpu_backend import shm_root
    for path in glob.glob(os.path.join(shm_root(), f"cutegrad-{job_tag}-*")):
        shutil.rmtree(path, ignore_errors=True)


def _stop(procs, grace):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(args):
    """Start the workers and supervise them; returns the exit code."""
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise ValueError(f"--nproc-per-node and --nnodes must be >= 1, got {args.nproc_per_node}, {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank {args.node_rank} is outside [0, {args.nnodes})")
    addr, port = args.master_addr, args.master_port
    if args.standalone:
        if args.nnodes != 1:
            raise ValueError("--standalone is one node; drop --nnodes or --standalone")
        addr, port = "127.0.0.1", free_port()
    cmd = command(args)
    job_tag = f"{os.getpid()}x{os.urandom(3).hex()}"
    procs = []
    stopping = []

    def forward(signum, frame):
        stopping.append(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for local in range(args.nproc_per_node):
            env = worker_env(os.environ, args.nproc_per_node, args.nnodes, args.node_rank, local, addr, port,
                             job_tag)
            procs.append(subprocess.Popen(cmd, env=env))
        while True:
            if stopping:
                print(f"cutegrad launch: got signal {stopping[0]}; stopping the workers", file=sys.stderr)
                _stop(procs, args.grace_period)
                return 128 + stopping[0]
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                local, code = failed[0]
                rank = args.node_rank * args.nproc_per_node + local
                print(f"cutegrad launch: rank {rank} (local rank {local}, pid {procs[local].pid}) exited with code "
                      f"{code}; stopping the other workers", file=sys.stderr)
                _stop(procs, args.grace_period)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    finally:
        _stop(procs, args.grace_period)
        _remove_job_files(job_tag)
        for s, handler in old.items():
            signal.signal(s, handler)


def relaunch_train(argv, nproc):
    """`cutegrad train ... --nproc-per-node N`: the same command, minus that flag, in N workers on a free port."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "cutegrad.cli", *rest]))


def main(argv=None):
    p = argparse.ArgumentParser(prog="cutegrad launch", description="start one worker process per GPU")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
