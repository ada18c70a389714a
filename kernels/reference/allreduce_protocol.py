"""NumPy-free model of the all-reduce's synchronisation protocol across consecutive launches.

kernels/reference/allreduce_schedule.py models *what* each block reads and
writes within one launch; this models *when*, across a stream of launches, under
every interleaving a random scheduler produces, at block granularity:
- each rank runs its launches in stream order (a launch's blocks start only
  after the previous launch finished on that rank); blocks run independently;
- a block: reads its epoch counter (e = old + 1), writes its rows into its
  own workspace's parity area e mod 2, arrives at barrier 0 (one store per
  peer, each a separate step, in any order), stores its counter, waits
  until every peer's arrival flag satisfies the wait condition, reads the
  peers' areas; two-shot: writes its reduced rows, barrier 1, reads the
  owners' reduced rows;
- every read checks that the area still holds this epoch's data (not yet
  overwritten by epoch e + 2, and already written).
`simulate` returns "ok", or "deadlock" / "race: ..." with the state; the
kernel's wait condition (`seen - e < 0` keeps spinning) with two parity areas
must give "ok" for every seed, while the naive `seen != e` must be caught
deadlocking and a single area must be caught racing.
"""
import random


def simulate(world, grid, algos, seed, wait_while=lambda seen, e: seen - e < 0, parities=2):
    """Run the launches `algos` (a list of "one_shot"/"two_shot") on `world` ranks of `grid` blocks.

    wait_while(seen, e): the barrier's spin condition; parities: workspace areas used in turn
    (the kernel's 2; 1 shows why one is not enough)."""
    rng = random.Random(seed)
    flags = {}  # (owner, which, block, src) -> epoch
    counter = {(r, b): 0 for r in range(world) for b in range(grid)}
    area = {}  # (rank, parity, block) -> (epoch, stage) last written: stage "in" or "reduced"
    launch_of = [0] * world  # launch each rank is running
    running = {}  # (rank, block) -> generator

    def block(r, b, algo):
        e = counter[(r, b)] + 1
        parity = e % parities
        area[(r, parity, b)] = (e, "in")
        yield True
        for which in ((0, 1) if algo == "two_shot" else (0,)):
            if which == 1:
                area[(r, parity, b)] = (e, "reduced")  # the owner's rows, reduced in place
                yield True
            for p in rng.sample(range(world), world):
                flags[(p, which, b, r)] = e  # st.release.sys to peer p
                yield True
            if which == 0:
                counter[(r, b)] = e
            for p in range(world):
                while wait_while(flags.get((r, which, b, p), 0), e):
                    yield False  # spinning: not runnable until a peer moves
            for p in range(world):  # the reads after this barrier: epoch e's data (after barrier 1: reduced)
                got = area.get((p, parity, b))
                if got is None or got[0] != e or (which == 1 and got[1] != "reduced"):
                    raise AssertionError(f"race: rank {r} block {b} epoch {e} read rank {p}'s area {parity}: "
                                         f"holds {got}")
                yield True

    def start_launch(r):
        k = launch_of[r]
        for b in range(grid):
            running[(r, b)] = block(r, b, algos[k])

    for r in range(world):
        start_launch(r)
    stalled = set()
    while running:
        ready = [key for key in running if key not in stalled]
        if not ready:
            return f"deadlock: ranks at launches {launch_of}, flags {flags}"
        key = rng.choice(ready)
        try:
            progressed = next(running[key])
        except StopIteration:
            del running[key]
            stalled.clear()
            r = key[0]
            if not any(k[0] == r for k in running):
                launch_of[r] += 1
                if launch_of[r] < len(algos):
                    start_launch(r)
            continue
        except AssertionError as exc:
            return str(exc)
        if progressed:
            stalled.clear()
        else:
            stalled.add(key)
    return "ok"
