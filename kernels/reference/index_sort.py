"""NumPy model of the embedding backward's large sort (kernels/cuda/index.cu,
`index_add_rows_launch` when n > 8192 or (row, position) needs more than 31 bits).

Keys are (row << 32 | position), row = the index value or `rows` for an
out-of-range one; blocks sort chunks of CHUNK keys, then each merge pass puts
every key of a run at its index in the run plus the count of keys below it in
the partner run (keys are unique, so there are no ties), doubling the run width
until one run is left; the last pass's buffer is unpacked into (perm, sorted).
The model follows the same chunking, passes and buffer swaps, so an indexing
mistake in the kernel's arithmetic shows up here as a wrong permutation.
"""
import numpy as np

CHUNK = 4096


def keys_of(index, rows):
    index = np.asarray(index, dtype=np.int64)
    row = np.where((index < 0) | (index >= rows), rows, index).astype(np.uint64)
    return (row << np.uint64(32)) | np.arange(len(index), dtype=np.uint64)


def merge_pass(keys, width):
    """One merge_runs_kernel launch: runs of `width` merged pairwise into a new buffer."""
    n = len(keys)
    out = np.empty_like(keys)
    for p in range(0, n, width):  # one run at a time; the kernel runs a thread per key
        run, start = p // width, p
        partner = (run ^ 1) * width
        merged = (run & ~1) * width
        mine = keys[start:start + width]
        below = (np.searchsorted(keys[partner:min(partner + width, n)], mine, side="left")
                 if partner < n else np.zeros(len(mine), dtype=np.int64))
        out[merged + np.arange(len(mine)) + below] = mine
    return out


def large_sort(index, rows):
    """(perm, sorted, launches): the permutation and sorted index values the kernels write,
    and how many sort launches they take (the run sums not counted)."""
    keys = keys_of(index, rows)
    n = len(keys)
    chunks = [np.sort(keys[b:b + CHUNK]) for b in range(0, n, CHUNK)]
    keys = np.concatenate(chunks) if chunks else keys
    launches, width = 1, CHUNK
    while width < n:
        keys = merge_pass(keys, width)
        launches += 1
        width <<= 1
    perm = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return perm, np.asarray(index, dtype=np.int64)[perm], launches + 1


def sort_launches(n, rows):
    """Launches of index_add_rows's sort for n indices into `rows` rows (run sums not counted)."""
    shift = max(int(n - 1).bit_length(), 0)
    if n <= 8192 and rows.bit_length() + shift <= 31:
        return 1
    chunks = -(-n // CHUNK)
    return 2 + max(0, (chunks - 1).bit_length())
