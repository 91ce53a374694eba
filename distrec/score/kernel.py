"""Full-catalog top-N for a batch of users without holding the (users x catalog) matrix.

The catalog is scored in blocks; each block's top-N merges into a running top-N, so
memory is O(users x (block + N)) whatever the catalog size. Items in a user's history
get -inf (PROTOCOL.md: seen items are never recommended).

Two paths with one contract:
- CPU: a score block of a few MB (torch's GEMM writes it into one reused buffer), then a
  compiled scan (numba) keeps each user's running top-N as a heap. The scan tests 16
  scores at a time against the user's current N-th best and touches the heap only when one
  beats it, so after the first blocks it costs about one pass over memory that is still in
  cache. `torch.topk` over the block instead did a full selection per block and took ~85%
  of the time at 1M items (BENCHMARKS.md). Ties go to the lower item index.
- other devices: `torch.topk` per block merged into the running top-N (on a GPU the
  selection runs in parallel with the product and is cheap).
No maintained library offers a blocked exact top-N with per-user exclusions on CPU:
FAISS's `IndexFlatIP` cannot skip a user's seen items; here it ran 17x slower at 1M items x
64 dims and about as fast at 256 dims (BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import torch

NEG = float("-inf")
CPU_BLOCK = 4096  # items per score block on CPU (1,024 users: 16 MB); 2,048-8,192 measured within 10%


def mask_history(scores: torch.Tensor, history: torch.Tensor, start: int) -> None:
    """In place: -inf for history items (B, L; -1 = padding) that fall in [start, start + width)."""
    width = scores.shape[1]
    inside = (history >= start) & (history < start + width)
    rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(history)
    scores[rows[inside], history[inside] - start] = NEG


@torch.no_grad()
def top_candidates(users: torch.Tensor, table: torch.Tensor, n: int, history: torch.Tensor | None = None,
                   block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, items), each (B, n), best first: the n highest dot products of each user
    (B, d) with the catalog (N, d), history (B, L; -1 = padding) excluded. A user whose
    history leaves fewer than n items gets seen items with score -inf at the end."""
    n = min(n, table.shape[0])
    if n <= 0:
        return (torch.empty((len(users), 0), dtype=users.dtype, device=users.device),
                torch.empty((len(users), 0), dtype=torch.long, device=users.device))
    if not bool(torch.isfinite(users).all()):
        raise ValueError("user vectors contain NaN or infinity: the model produced them, check its checkpoint")
    if users.device.type == "cpu" and _scan is not None and users.dtype == torch.float32:
        return _top_candidates_cpu(users, table.float(), n, history, block or CPU_BLOCK)
    return _top_candidates_torch(users, table, n, history, block or 65536)


def _top_candidates_torch(users, table, n, history, block):
    best_scores = torch.full((users.shape[0], 0), NEG, dtype=users.dtype, device=users.device)
    best_items = torch.zeros((users.shape[0], 0), dtype=torch.long, device=users.device)
    for start in range(0, table.shape[0], block):
        scores = users @ table[start:start + block].T
        if history is not None:
            mask_history(scores, history, start)
        values, index = scores.topk(min(n, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, values], dim=1)
        best_items = torch.cat([best_items, index + start], dim=1)
        if best_scores.shape[1] > n:
            best_scores, keep = best_scores.topk(n, dim=1)
            best_items = best_items.gather(1, keep)
    return best_scores, best_items


def _top_candidates_cpu(users, table, n, history, block):
    count = len(users)
    seen = np.zeros((count, 0), dtype=np.int64) if history is None else np.sort(history.numpy().astype(np.int64), axis=1)
    heap_scores = np.empty((count, n), dtype=np.float32)
    heap_items = np.empty((count, n), dtype=np.int64)
    filled = np.zeros(count, dtype=np.int64)
    if table.shape[0] <= 2 * block:  # a small catalog in one block: no partial last block
        block = table.shape[0]
    buffer = torch.empty(count, block)  # reused: a fresh 16 MB block per step page-faults
    _use_torch_threads()
    users = users.contiguous()
    for start in range(0, table.shape[0], block):
        part = table[start:start + block]
        scores = buffer.view(-1)[:count * len(part)].view(count, len(part))  # contiguous, also the last block
        torch.mm(users, part.T, out=scores)
        _scan(scores.numpy(), len(part), start, seen, heap_scores, heap_items, filled)
    _best_first(heap_scores, heap_items, filled)
    return torch.from_numpy(heap_scores), torch.from_numpy(heap_items)


try:
    import numba
except ImportError:  # numba is a dependency; without it the torch path serves every device
    numba = None

if numba is not None:
    @numba.njit(cache=True, inline="always")
    def _worse(score_a, item_a, score_b, item_b):  # heap order: the root is the worst kept
        return score_a < score_b or (score_a == score_b and item_a > item_b)

    @numba.njit(cache=True, inline="always")
    def _swap(scores, items, a, b):
        scores[a], scores[b] = scores[b], scores[a]
        items[a], items[b] = items[b], items[a]

    @numba.njit(cache=True, inline="always")
    def _sift_down(scores, items, size, parent):
        while True:
            child = 2 * parent + 1
            if child >= size:
                return
            if child + 1 < size and _worse(scores[child + 1], items[child + 1], scores[child], items[child]):
                child += 1
            if not _worse(scores[child], items[child], scores[parent], items[parent]):
                return
            _swap(scores, items, child, parent)
            parent = child

    @numba.njit(cache=True, inline="always")
    def _max16(row, j):  # a reduction tree the compiler turns into vector max instructions
        a0 = max(row[j], row[j + 8]); a1 = max(row[j + 1], row[j + 9])  # noqa: E702
        a2 = max(row[j + 2], row[j + 10]); a3 = max(row[j + 3], row[j + 11])  # noqa: E702
        a4 = max(row[j + 4], row[j + 12]); a5 = max(row[j + 5], row[j + 13])  # noqa: E702
        a6 = max(row[j + 6], row[j + 14]); a7 = max(row[j + 7], row[j + 15])  # noqa: E702
        return max(max(max(a0, a4), max(a2, a6)), max(max(a1, a5), max(a3, a7)))

    @numba.njit(cache=True, inline="always")
    def _sift_up(scores, items, child):
        while child > 0:
            parent = (child - 1) // 2
            if not _worse(scores[child], items[child], scores[parent], items[parent]):
                return
            _swap(scores, items, child, parent)
            child = parent

    @numba.njit(cache=True, inline="always")
    def _fill(row, width, start, kept, items, size):
        """Grow a heap holding fewer than n; returns (next column, new size). On an empty heap
        a floor comes first: the n-th largest of the block's 16-wide maxima. At least n scores
        reach it, so nothing below it can make the top n, and the heap fills from the few
        that do instead of taking ~n log(width / n) replacements (a 3,416-item catalog: 4x)."""
        n = kept.shape[0]
        floor = NEG
        chunks = width // 16
        if size == 0 and chunks >= n:
            maxima = np.empty(chunks, dtype=np.float32)
            for c in range(chunks):
                maxima[c] = _max16(row, 16 * c)
            floor = np.partition(maxima, chunks - n)[chunks - n]
        j = 0
        while size < n and j < width:
            if row[j] >= floor:
                kept[size], items[size] = row[j], start + j
                _sift_up(kept, items, size)
                size += 1
            j += 1
        return j, size

    # no-NaN and reordering licences let the compiler vectorise _max16; user vectors are checked finite
    @numba.njit(parallel=True, cache=True, boundscheck=False, fastmath={"nnan", "reassoc", "nsz"})
    def _scan(scores, width, start, seen, heap_scores, heap_items, filled):
        """Merge score columns [0, width) (items start..start+width) into each user's heap."""
        n = heap_scores.shape[1]
        for u in numba.prange(scores.shape[0]):
            row, kept, items, history = scores[u], heap_scores[u], heap_items[u], seen[u]
            first = np.searchsorted(history, start)  # seen items of this block: -inf
            for h in range(first, np.searchsorted(history, start + width)):
                row[history[h] - start] = NEG
            j = 0
            if filled[u] < n:
                j, filled[u] = _fill(row, width, start, kept, items, filled[u])
            worst = kept[0]
            while j + 16 <= width:
                if _max16(row, j) > worst:
                    for col in range(j, j + 16):  # strictly better: an equal score has a higher item
                        if row[col] > worst:
                            kept[0], items[0] = row[col], start + col
                            _sift_down(kept, items, n, 0)
                            worst = kept[0]
                j += 16
            for col in range(j, width):
                if row[col] > worst:
                    kept[0], items[0] = row[col], start + col
                    _sift_down(kept, items, n, 0)
                    worst = kept[0]

    @numba.njit(parallel=True, cache=True)
    def _best_first(heap_scores, heap_items, filled):
        """Each user's heap into best-first order in place (heapsort: the worst goes last)."""
        for u in numba.prange(heap_scores.shape[0]):
            kept, items = heap_scores[u], heap_items[u]
            for size in range(filled[u] - 1, 0, -1):
                _swap(kept, items, 0, size)
                _sift_down(kept, items, size, 0)

    def _use_torch_threads() -> None:  # the same thread budget as torch (Ray actors set it)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
else:
    _scan = None


class FaissTopK:
    """The same contract with FAISS `IndexFlatIP` (exact inner product), for catalogs where
    an index beats the dense product. FAISS cannot skip per-user items, so it returns
    n + (longest history) and the seen items are dropped afterwards."""

    def __init__(self, table: torch.Tensor):
        import faiss

        self.index = faiss.IndexFlatIP(table.shape[1])
        self.index.add(table.float().contiguous().numpy())

    def __call__(self, users: torch.Tensor, n: int, history: torch.Tensor | None = None):
        extra = int((history >= 0).sum(dim=1).max()) if history is not None else 0
        width = min(n + extra, self.index.ntotal)
        scores, items = self.index.search(users.float().contiguous().numpy(), width)
        scores, items = torch.from_numpy(scores), torch.from_numpy(items).long()
        if history is not None:
            seen = (items.unsqueeze(2) == history.unsqueeze(1)).any(dim=2)
            scores = scores.masked_fill(seen, NEG)
            order = torch.sort(-scores, dim=1, stable=True).indices
            scores, items = scores.gather(1, order), items.gather(1, order)
        return scores[:, :n], items[:, :n]
