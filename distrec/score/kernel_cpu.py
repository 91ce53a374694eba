"""Full-catalog top-N on the CPU: a score block of a few MB (torch's GEMM writes it into one
reused buffer), then a compiled scan (numba) keeps each user's running top-N as a heap of
int64 keys (score and item in one integer). The scan tests 16 scores at a time against the
user's current N-th best and touches the heap only when one beats it, so after the first
blocks it costs about one pass over memory that is still in cache. `torch.topk` over the
block instead did a full selection per block and took ~85% of the time at 1M items
(BENCHMARKS.md). Ties go to the lower item index. On CPUs with bf16 matrix units (AMX) and
catalogs of 2^24 item-dims or more, the product runs in bf16 for a few more candidates than
N, which are then scored exactly in fp32 (distrec.score.bf16_bound).

Over ~350 lines: the numba kernels and the Python that drives them are one unit (the heap
key layout, the seen-items layout and the scan are written against each other).
Called through distrec.score.kernel.top_candidates; `available` is False without numba."""

from __future__ import annotations

import threading

import numpy as np
import torch

from distrec.score import bf16_bound
from distrec.score.bf16_bound import BF16_MIN_SIZE, BF16_SPARE, NEG, STATS, cannot_overflow

CPU_BLOCK = 4096  # items per score block on CPU (1,024 users: 16 MB); 2,048-8,192 measured within 10%


def top_candidates_cpu(users, table, n, history, block, precision, facts):
    count = len(users)
    if table.shape[0] >= 2**32:
        raise ValueError(f"a catalog of {table.shape[0]:,} items: the CPU kernel packs item indices in 32 bits")
    if table.shape[0] <= 2 * block:  # a small catalog in one block: no partial last block
        block = table.shape[0]
    use_torch_threads()  # before any parallel numba call: the setting is per calling thread
    seen = _seen_items(history, count, sort=_blocks(table, block) > 1)
    users = users.contiguous()
    if precision == "bf16" or (precision == "auto" and bf16_pays(table)):
        if cannot_overflow(users, facts):
            return top_candidates_bf16(users, table, n, seen, block, facts)
    return _top_fp32(users, table, n, seen, block)


SEEN_END = np.int64(2**62)  # after a user's seen items: above every item index


def _seen_items(history, count: int, sort: bool) -> np.ndarray:
    """(B, L') each user's seen items first, then SEEN_END (the -1 padding dropped), sorted
    when the catalog is scored in several blocks (each block finds its items by binary
    search). One block masks them straight from the list: sorting whole padded rows took a
    third of the time at ML-1M size (1,024 users padded to the longest history, ~2,300)."""
    if history is None or history.shape[1] == 0:
        return np.full((count, 1), SEEN_END, dtype=np.int64)
    seen = np.empty((count, history.shape[1] + 1), dtype=np.int64)
    counts = np.empty(count, dtype=np.int64)
    _compact_seen(np.ascontiguousarray(history.numpy(), dtype=np.int64), seen, counts, sort)
    return np.ascontiguousarray(seen[:, :int(counts.max(initial=0)) + 1])  # one SEEN_END at least


def _blocks(table, block: int) -> int:
    return -(-table.shape[0] // block)


def _top_fp32(users, table, n, seen, block):
    """(scores, items) best first from fp32 products and heaps."""
    heap_keys, filled = _heaps(users, table, n, seen, block)
    score_bits, items = np.empty((len(users), n), dtype=np.int32), np.empty((len(users), n), dtype=np.int64)
    _best_first(heap_keys, filled, score_bits, items)
    return torch.from_numpy(score_bits.view(np.float32)), torch.from_numpy(items)


def _heaps(users, table, size, seen, block):
    """Each user's running top-`size` over the catalog, as unordered heaps of int64 keys.
    The product runs in the dtype of `users` and `table` (fp32, or bf16 for candidates)."""
    count = len(users)
    heap_keys = np.empty((count, size), dtype=np.int64)
    filled = np.zeros(count, dtype=np.int64)
    buffer = _score_buffer(count * block, users.dtype)
    scratch = np.empty((_chunks(count) if users.dtype == torch.bfloat16 else 0, block), dtype=np.int32)  # rows widened
    ordered = _blocks(table, block) > 1  # seen items sorted (_seen_items)
    for start in range(0, table.shape[0], block):
        part = table[start:start + block]
        scores = buffer[:count * len(part)].view(count, len(part))  # contiguous, also the last block
        torch.mm(users, part.T, out=scores)
        if scores.dtype == torch.float32:
            _scan(scores.numpy(), len(part), start, seen, ordered, heap_keys, filled)
        else:
            _scan_bf16(scores.view(torch.int16).numpy(), len(part), start, seen, ordered, heap_keys, filled, scratch)
    return heap_keys, filled


def bf16_pays(table: torch.Tensor) -> bool:
    return table.shape[0] * table.shape[1] >= BF16_MIN_SIZE and bf16_is_fast()


def top_candidates_bf16(users, table, n, seen, block, facts):
    """Candidates from a bf16 product (AMX runs it 2.5-5x faster than fp32), then fp32 scores
    for them: the fp32 top n, proven per user. For an item j left out, its bf16 score a_j is
    at most a_w, the worst kept; its product before the bf16 output rounding is then at most
    a_w + 2^-8 |a_w| (x 1.01). The input rounding (2^-8 relative for each vector), the fp32
    accumulation of the bf16 product and the fp32 rescoring (d x 2^-24 each) move a score by
    at most c |u| |v_j| <= c |u| max|v|, c = 1.05 (2^-7 + 2^-16 + 2 d 2^-24), plus an absolute
    2^-126 (d (|u| + max|v| + 1) + 1) for subnormals flushed to zero. If that sum is below the
    n-th best fp32 score among the candidates, no left-out item can enter the top n, ties
    included. A user where it is not (candidates too few for the rounding) is scored again
    with the fp32 product. The rescoring sums in another order than the fp32 product: two
    items whose scores agree to fp32 rounding may come out in the other order."""
    if facts["bf16"] is None:
        facts["bf16"] = table.bfloat16().contiguous()
    table_bf16, max_norm = facts["bf16"], facts["max_norm"]
    size = min(table.shape[0], 2 * n + BF16_SPARE)
    heap_keys, filled = _heaps(users.bfloat16(), table_bf16, size, seen, block)
    bound = bf16_bound.bound(users, table.shape[1], max_norm).numpy()
    score_bits, items = np.empty((len(users), n), dtype=np.int32), np.empty((len(users), n), dtype=np.int64)
    complete = np.zeros(len(users), dtype=np.bool_)
    _rescore(users.numpy(), table.numpy(), heap_keys, filled, bound, score_bits, items, complete)
    scores, items = torch.from_numpy(score_bits.view(np.float32)), torch.from_numpy(items)
    redo = np.flatnonzero(~complete)
    STATS["bf16_users"] += len(users)
    STATS["fp32_again"] += len(redo)
    if len(redo):
        again = torch.from_numpy(redo)
        scores[again], items[again] = _top_fp32(users[again].contiguous(), table, n, seen[redo], block)
    return scores, items


def bf16_is_fast() -> bool:
    """bf16 products pay on CPUs with bf16 matrix units (AMX, AVX512-BF16); elsewhere torch
    emulates them, slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def _chunks(count: int) -> int:
    return max(1, min(count, 4 * torch.get_num_threads()))


_buffers = threading.local()


def _score_buffer(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One score buffer per thread, reused across blocks and calls: a fresh block per step
    or per batch of users page-faults on its first write, which made the product 3-4x
    slower at ML-1M size (a 14 MB block per 1,024 users). Kept for the thread's lifetime."""
    name = f"scores_{dtype}"
    buffer = getattr(_buffers, name, None)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(size, dtype=dtype)
        setattr(_buffers, name, buffer)
    return buffer


from distrec.compiled import numba, use_torch_threads  # noqa: E402

if numba is not None:
    # Each kept (score, item) is one int64 key: the score's bits made order-preserving as a
    # signed int32 in the high half, (2**32 - 1 - item) in the low half. A larger key is a
    # higher score, then a lower item, so the heap compares and moves one integer. With
    # (score, item) pairs and a two-part comparison the heap took 3x longer (ML-1M size).
    LOW = np.int64(0xFFFFFFFF)

    @numba.njit(cache=True, inline="always")
    def _ordered(bits):  # float32 bits (int32) -> an int32 with the same order as the floats
        bits = np.int32(0) if bits == np.int32(-2147483648) else bits  # -0.0 ties with 0.0
        return bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))

    @numba.njit(cache=True, inline="always")
    def _key(bits, item):
        return (np.int64(_ordered(bits)) << np.int64(32)) | (LOW - np.int64(item))

    @numba.njit(cache=True, inline="always")
    def _sift_down(keys, size, hole, key):  # place key at hole or below (min-heap: root = worst)
        while True:
            child = 2 * hole + 1
            if child >= size:
                break
            if child + 1 < size and keys[child + 1] < keys[child]:
                child += 1
            if keys[child] >= key:
                break
            keys[hole] = keys[child]
            hole = child
        keys[hole] = key

    @numba.njit(cache=True, inline="always")
    def _sift_up(keys, hole, key):
        while hole > 0:
            parent = (hole - 1) // 2
            if keys[parent] <= key:
                break
            keys[hole] = keys[parent]
            hole = parent
        keys[hole] = key

    @numba.njit(cache=True, inline="always")
    def _max16(row, j):  # a reduction tree the compiler turns into vector max instructions
        a0 = max(row[j], row[j + 8]); a1 = max(row[j + 1], row[j + 9])  # noqa: E702
        a2 = max(row[j + 2], row[j + 10]); a3 = max(row[j + 3], row[j + 11])  # noqa: E702
        a4 = max(row[j + 4], row[j + 12]); a5 = max(row[j + 5], row[j + 13])  # noqa: E702
        a6 = max(row[j + 6], row[j + 14]); a7 = max(row[j + 7], row[j + 15])  # noqa: E702
        return max(max(max(a0, a4), max(a2, a6)), max(max(a1, a5), max(a3, a7)))

    @numba.njit(cache=True)
    def _floor(values, n):
        """A value that at least n of `values` reach, close to their n-th largest: the lowest
        value in the top bins of a 64-bin histogram that together hold n or more. Exact
        selection (np.partition) of 213 block maxima took half of the scan at ML-1M size."""
        lo, hi, finite = np.inf, -np.inf, 0
        for v in values:
            if v > NEG:
                lo, hi, finite = min(lo, v), max(hi, v), finite + 1
        if finite < n:
            return NEG
        counts = np.zeros(64, dtype=np.int64)
        lowest = np.full(64, np.inf, dtype=np.float32)
        scale = 63.999 / (hi - lo) if hi > lo else 0.0
        for v in values:
            if v > NEG:
                b = min(63, int((v - lo) * scale))
                counts[b] += 1
                lowest[b] = min(lowest[b], v)
        total, floor = 0, np.float32(np.inf)
        for b in range(63, -1, -1):  # running minimum: exact whatever the rounding of the bin index
            total += counts[b]
            floor = min(floor, lowest[b])
            if total >= n:
                break
        return floor

    @numba.njit(cache=True, inline="always")
    def _fill(row, bits, width, start, keys, size):
        """Grow a heap holding fewer than n; returns (next column, new size). On an empty heap
        a floor comes first (_floor of the block's 16-wide maxima). At least n scores reach
        it, so nothing below it can make the top n, and the heap fills from the few that do
        instead of taking ~n log(width / n) replacements (a 3,416-item catalog: 4x)."""
        n = keys.shape[0]
        floor = NEG
        chunks = width // 16
        j = 0
        if size == 0 and chunks >= n:
            maxima = np.empty(chunks, dtype=np.float32)
            for c in range(chunks):
                maxima[c] = _max16(row, 16 * c)
            floor = _floor(maxima, n)
            # a second, closer floor from the scores that reach the first (~2.5 n of them on
            # random scores), so the heap fills with ~n and hardly replaces any afterwards
            reach = np.empty(16 * chunks, dtype=np.float32)
            where = np.empty(16 * chunks, dtype=np.int64)
            found = 0
            for c in range(chunks):
                if maxima[c] >= floor:
                    for col in range(16 * c, 16 * c + 16):
                        reach[found], where[found] = row[col], col
                        found += row[col] >= floor
            floor = max(floor, _floor(reach[:found], n))
            # every score in [0, 16 chunks) that reaches the floor is among them, in column
            # order: fill from them, not from a scalar pass over the whole row (2x at ML-1M)
            # branch-free: every key is written, the slot kept only if it reaches the floor;
            # then one bottom-up heapify (a branch and a sift-up per key: 6% slower at ML-1M)
            last = -1
            for r in range(found):
                col = where[r]
                keys[size] = _key(bits[col], start + col)
                take = reach[r] >= floor
                size += take
                last = col if take else last
                if size == n:
                    break
            for hole in range(size // 2 - 1, -1, -1):
                _sift_down(keys, size, hole, keys[hole])
            if size == n:
                return last + 1, size
            j = 16 * chunks
        while size < n and j < width:
            if row[j] >= floor:
                _sift_up(keys, size, _key(bits[j], start + j))
                size += 1
            j += 1
        return j, size

    @numba.njit(cache=True, inline="always")
    def _bits_of(key):  # the float32 bits of a key's score (the order transform undone: it is its own inverse)
        ordered = np.int32(key >> np.int64(32))
        return ordered ^ ((ordered >> np.int32(31)) & np.int32(0x7FFFFFFF))

    @numba.njit(cache=True, inline="always")
    def _score_of(key, cell, as_float):  # the float32 score in a key (cell: 1 int32, as_float: its float view)
        cell[0] = _bits_of(key)
        return as_float[0]

    @numba.njit(cache=True, inline="always")
    def _merge(row, bits, width, start, history, ordered, keys, size):
        """Merge score columns [0, width) (items start..start+width) of one user into its
        heap of `size` keys; returns the new size."""
        n = keys.shape[0]
        end = start + width  # seen items of this block: -inf
        if ordered:
            for h in range(np.searchsorted(history, start), np.searchsorted(history, end)):
                row[history[h] - start] = NEG
        else:
            for item in history:
                if item == SEEN_END:
                    break
                if start <= item < end:
                    row[item - start] = NEG
        j = 0
        if size < n:
            j, size = _fill(row, bits, width, start, keys, size)
        cell = np.empty(1, dtype=np.int32)
        as_float = cell.view(np.float32)
        worst = _score_of(keys[0], cell, as_float)
        while j + 16 <= width:
            if _max16(row, j) > worst:
                for col in range(j, j + 16):  # strictly better: an equal score has a higher item
                    if row[col] > worst:
                        _sift_down(keys, n, 0, _key(bits[col], start + col))
                        worst = _score_of(keys[0], cell, as_float)
            j += 16
        for col in range(j, width):
            if row[col] > worst:
                _sift_down(keys, n, 0, _key(bits[col], start + col))
                worst = _score_of(keys[0], cell, as_float)
        return size

    @numba.njit(cache=True, inline="always")
    def _unpack_best_first(keys, size, score_bits, items):
        """A heap of `size` keys in best-first order (heapsort: the worst goes last), unpacked
        into score bits (int32, to be viewed as float32) and items."""
        for last in range(size - 1, 0, -1):
            moved = keys[last]
            keys[last] = keys[0]
            _sift_down(keys, last, 0, moved)
        for i in range(size):
            score_bits[i], items[i] = _bits_of(keys[i]), LOW - (keys[i] & LOW)

    # no-NaN and reordering licences let the compiler vectorise _max16; user vectors are checked finite
    @numba.njit(parallel=True, cache=True, boundscheck=False, fastmath={"nnan", "reassoc", "nsz"})
    def _scan(scores, width, start, seen, ordered, heap_keys, filled):
        """Merge a block of fp32 scores (users x width) into each user's heap."""
        for u in numba.prange(scores.shape[0]):
            row = scores[u]
            filled[u] = _merge(row, row.view(np.int32), width, start, seen[u], ordered, heap_keys[u], filled[u])

    @numba.njit(parallel=True, cache=True, boundscheck=False, fastmath={"nnan", "reassoc", "nsz"})
    def _scan_bf16(scores, width, start, seen, ordered, heap_keys, filled, scratch):
        """The same for a block of bf16 scores (their int16 bits): each row is widened to fp32
        (the bits shifted up 16) in a small per-chunk buffer that stays in cache."""
        count, chunks = scores.shape[0], scratch.shape[0]
        for c in numba.prange(chunks):
            bits = scratch[c, :width]
            row = bits.view(np.float32)
            for u in range(c * count // chunks, (c + 1) * count // chunks):
                source = scores[u]
                for j in range(width):
                    bits[j] = np.int32(source[j]) << np.int32(16)
                filled[u] = _merge(row, bits, width, start, seen[u], ordered, heap_keys[u], filled[u])

    @numba.njit(parallel=True, cache=True, boundscheck=False, fastmath={"reassoc", "nsz"})
    def _rescore(users, table, heap_keys, filled, bound, score_bits, items, complete):  # noqa: C901
        """From each user's bf16 candidates to its exact fp32 top n (see _top_candidates_bf16)."""
        n, size = score_bits.shape[1], heap_keys.shape[1]  # size < catalog: some items are not candidates
        for u in numba.prange(heap_keys.shape[0]):
            keys = heap_keys[u]
            cell = np.empty(1, dtype=np.int32)
            as_float = cell.view(np.float32)
            worst = _score_of(keys[0], cell, as_float)
            exact = np.empty(filled[u], dtype=np.int64)
            for c in range(filled[u]):
                item = LOW - (keys[c] & LOW)
                if _score_of(keys[c], cell, as_float) == NEG:
                    as_float[0] = NEG  # a seen item stays -inf
                else:
                    total = np.float32(0.0)
                    for i in range(users.shape[1]):
                        total += users[u, i] * table[item, i]
                    as_float[0] = total
                exact[c] = _key(cell[0], item)
            best = exact[:n].copy()  # a min-heap of the n best exact keys
            for c in range(1, n):
                _sift_up(best, c, best[c])
            for c in range(n, filled[u]):
                if exact[c] > best[0]:
                    _sift_down(best, n, 0, exact[c])
            nth = _score_of(best[0], cell, as_float)  # the root: the n-th best
            if size < table.shape[0] and worst != NEG and not worst + 2.0**-8 * 1.01 * abs(worst) + bound[u] < nth:
                continue  # an item outside the candidates might still reach the n-th best (-inf: all are in)
            complete[u] = True
            _unpack_best_first(best, n, score_bits[u], items[u])

    @numba.njit(parallel=True, cache=True)
    def _compact_seen(history, seen, counts, sort):
        """Each row's items (>= 0) to the front of `seen`, then SEEN_END; sorted if `sort`."""
        for u in numba.prange(history.shape[0]):
            k = 0
            for item in history[u]:
                if item >= 0:
                    seen[u, k] = item
                    k += 1
            if sort and k > 1:
                seen[u, :k] = np.sort(seen[u, :k])
            seen[u, k:] = SEEN_END
            counts[u] = k

    @numba.njit(parallel=True, cache=True)
    def _best_first(heap_keys, filled, score_bits, items):
        for u in numba.prange(heap_keys.shape[0]):
            _unpack_best_first(heap_keys[u], filled[u], score_bits[u], items[u])

else:
    _scan = None

available = _scan is not None
