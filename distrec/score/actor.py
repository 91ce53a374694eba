"""The scoring job's Ray actor: constructed once per actor (the model, the catalog, the
retriever), it scores blocks of users (distrec.retrieval: the whole catalog, seen items
out), re-ranks them (distrec.policies.rerank) and writes each block's part atomically."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distrec import policies
from distrec.catalog import primary_categories
from distrec.config import ConfigError
from distrec.formats import DataError
from distrec.retrieval import Retriever
from distrec.score.config import ScoreConfig
from distrec.score.output import CANDIDATE_SCHEMA, CANDIDATES, PART, PART_KEY, SCHEMA, exposure_counts

FAULT_ENV = "DISTREC_FAULT_SCORE_WRITE"



def user_frame(data_dir: Path, which: str) -> pd.DataFrame:
    """user, history (the history the lists are built from, an integer array) for the chosen users."""
    if which in ("test", "val"):
        return pd.read_parquet(data_dir / f"{which}.parquet", columns=["user", "history"])
    # every user: the test history and target; users without a test interaction keep their
    # training prefix (empty if none). Vectorised over the flat item column: a list per
    # user built in Python took 0.4 s per 100,000 users, on the driver and in every actor.
    test = pq.read_table(data_dir / "test.parquet", columns=["user", "history", "target"])
    column = test["history"].combine_chunks()
    lengths = np.diff(column.offsets.to_numpy()) + 1
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    is_target = np.zeros(len(flat), dtype=bool)
    is_target[ends - 1] = True
    flat[is_target] = test["target"].to_numpy()
    flat[~is_target] = column.flatten().to_numpy()
    full = dict(zip(test["user"].to_numpy().tolist(), np.split(flat, ends[:-1]) if len(ends) else []))
    users = pd.read_parquet(data_dir / "users.parquet", columns=["index"])["index"]
    none = np.empty(0, dtype=np.int64)
    return pd.DataFrame({"user": users, "history": [full.get(u, none) for u in users.tolist()]})


def user_count(data_dir: Path, which: str) -> int:
    """How many users user_frame returns, from the Parquet footer (2 s saved at 1M users)."""
    return pq.ParquetFile(data_dir / (f"{which}.parquet" if which in ("test", "val") else "users.parquet")).metadata.num_rows


class BlockScorer:
    """Scores blocks of users and writes their parts; constructed once per Ray actor."""

    def __init__(self, cfg_dict: dict, catalog: np.ndarray, popularity: np.ndarray, device: str = "cpu",
                 job: str | None = None, similar: np.ndarray | None = None, policy: policies.Policy | None = None):
        """`policy`: the driver's registry entry for cfg_dict's policy. A Ray actor imports the
        package's own registry; an entry registered at run time in the driver (a plugin, a test)
        reaches it this way (Ray pickles it with cloudpickle)."""
        from distrec.config import from_dict

        if policy is not None and policy.name not in policies.POLICIES:
            policies.register(policy)
        self.cfg = from_dict(ScoreConfig, cfg_dict)
        torch.set_num_threads(int(os.environ.get("DISTREC_SCORE_THREADS", max(1, torch.get_num_threads()))))
        data = Path(self.cfg.data)
        self.items = pd.read_parquet(data / "items.parquet")
        self.item_ids = pa.array(self.items["item_id"], pa.string())  # once: converting it cost ~4 ms a block
        self.user_ids = pq.read_table(data / "users.parquet", columns=["user_id"])["user_id"].combine_chunks().cast(pa.string())
        self.frame = user_frame(data, self.cfg.users)
        if not isinstance(catalog, np.ndarray):  # an ObjectRef: the one shared copy in the object store
            import ray

            catalog, popularity = ray.get(catalog), ray.get(popularity)
            similar = None if similar is None else ray.get(similar)
        self.table = torch.from_numpy(np.array(catalog))
        self.popularity = torch.from_numpy(np.array(popularity))
        self.categories, self.category_names = primary_categories(self.items, self.cfg.category_level)
        # what mmr and dpp call alike (policy.similarity): the item vectors, or the given ones
        self.similar = self.table if similar is None else torch.from_numpy(np.array(similar))
        # new items (no training interaction), for new_item_slots: their indices, and each item's place among them
        counts = self.items["train_count"].to_numpy() if "train_count" in self.items else np.ones(len(self.items))
        self.new_items = torch.from_numpy(np.flatnonzero(counts == 0))
        self.new_place = torch.full((len(self.items),), -1, dtype=torch.long)
        self.new_place[self.new_items] = torch.arange(len(self.new_items))
        self.retriever = Retriever(self.cfg.run, self.items, self.table, self.popularity, self.cfg.candidates,
                                   self.cfg.precision, device, self.cfg.faiss)
        # on a GPU actor (Ray sets CUDA_VISIBLE_DEVICES to its GPU) the user tower and the
        # product run there; re-ranking and the parts stay on the CPU with the lists
        self.model, self.device = self.retriever.model, self.retriever.device
        self.device_table = self.retriever.device_table
        self.out = Path(self.cfg.out)
        self.job = job
        # exposure policy state: the lists each item is in across the job, so far. Counted from
        # the parts already written: a resumed job (or this actor restarted by Ray) goes on
        # from what is on disk, not from zero.
        self.shown = torch.zeros(len(self.items), dtype=torch.long)
        self.ranker, self.ranker_dtype = self._load_ranker()
        if "job" in policies.POLICIES[self.cfg.policy.name].needs and job is not None:
            self.shown += exposure_counts(self.out, job, len(self.items), self.items["item_id"])

    def __call__(self, batch: dict) -> dict:
        done = {"block": [], "users": [], "empty": [], "seconds": [], "error": []}
        for block in batch["block"]:
            started = time.perf_counter()
            try:
                record = self.score_block(int(block))
                users, empty, error = record["users"], record["empty"], ""
            except (OSError, DataError, ConfigError) as e:
                # returned, not raised: Ray Data's wrappers drop the cause on the way to the
                # driver, which re-raises it as the CLI's one-line error (a full disk, say)
                users, empty, error = 0, 0, json.dumps({"type": type(e).__name__, "errno": getattr(e, "errno", None),
                                                        "strerror": getattr(e, "strerror", None),
                                                        "filename": getattr(e, "filename", None), "message": str(e)})
            done["block"].append(int(block))
            done["users"].append(users)
            done["empty"].append(empty)
            done["seconds"].append(time.perf_counter() - started)
            done["error"].append(error)
        return {k: np.asarray(v) for k, v in done.items()}

    def _load_ranker(self):
        """The second stage (ranker.run), on the actor's device, in eval mode; and its autocast dtype."""
        r = self.cfg.ranker
        if not r.run:
            return None, None
        from distrec.models.run import load_model

        ranker = load_model(Path(r.run) / "best", self.items, Path(r.run) / "tokenizer").to(self.device).eval()
        if r.precision == "bf16":
            dtype = torch.bfloat16
        elif r.precision == "fp32":
            dtype = None
        elif self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        else:
            from distrec.score.kernel_cpu import bf16_is_fast

            dtype = torch.bfloat16 if bf16_is_fast() else None
        return ranker, dtype

    def second_stage(self, relevance: torch.Tensor, candidates: torch.Tensor, histories: list,
                     user_vectors: torch.Tensor):
        """(relevance, candidates, retrieval relevance), each (B, N'): with a ranker, the top
        `ranker.candidates` retrieved, and the user's `ranker.new_items` best-scored new items
        beside them, re-scored by it (ordered by its score, padding last), the retrieval scores
        beside them; without one, the retrieval lists as they are."""
        if self.ranker is None:
            return relevance, candidates, relevance
        n = self.cfg.ranker.candidates
        retrieved, items = relevance[:, :n], candidates[:, :n]
        if self.cfg.ranker.new_items:
            # cold items the whole-catalog top-N rarely holds (their vector is their text alone):
            # the ranker reads their text and decides whether they rise
            best, ids = self.best_new_items(user_vectors, histories, items, retrieved, self.cfg.ranker.new_items)
            retrieved = torch.cat([retrieved, best.to(retrieved.dtype)], 1)
            items = torch.cat([items, ids], 1)
        padding = torch.isneginf(retrieved)
        with torch.autocast(self.device.type, dtype=self.ranker_dtype or torch.float32,
                            enabled=self.ranker_dtype is not None):
            scores = self.ranker.score(histories, torch.where(padding, -1, items), retrieved.masked_fill(padding, 0.0),
                                       self.cfg.ranker.batch_size)
        scores = scores.float().masked_fill(padding, float("-inf"))
        # stable: equal ranker scores keep the retriever's order
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return scores.gather(1, order), items.gather(1, order), retrieved.gather(1, order)

    def block_users(self, block: int) -> pd.DataFrame:
        size = self.cfg.batch_size
        return self.frame.iloc[block * size:(block + 1) * size]

    @torch.no_grad()
    def candidates(self, histories: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(relevance (B, N), candidates (B, N), users with an empty history): each user's top-N
        of the whole catalog, seen items excluded; the most popular items for empty histories."""
        relevance, candidates, empty, _ = self._candidates(histories)
        return relevance, candidates, empty

    def _candidates(self, histories: list):
        return self.retriever(histories)

    @torch.no_grad()
    def best_new_items(self, user_vectors: torch.Tensor, histories: list, listed: torch.Tensor,
                       relevance: torch.Tensor, count: int, hide: torch.Tensor | None = None):
        """(retrieval scores, item indices), each (B, count): each user's best-scored new items
        that are unseen and not in `listed` (B, L) where its `relevance` is not -inf, nor in
        `hide` (B, H); -inf score and index 0 where fewer exist."""
        rows = len(histories)
        if not len(self.new_items) or not count:
            return torch.full((rows, count), float("-inf")), torch.zeros((rows, count), dtype=torch.long)
        scores = (user_vectors.float() @ self.device_table[self.new_items.to(self.device)].float().T).cpu()
        place = self.new_place[listed]
        shown = (place >= 0) & ~torch.isneginf(relevance)
        hidden_places = self.new_place[hide] if hide is not None else None
        for row, history in enumerate(histories):
            seen = self.new_place[torch.as_tensor(np.asarray(history, dtype=np.int64))] if len(history) else place[row, :0]
            for hidden in (seen, place[row][shown[row]], *(() if hidden_places is None else (hidden_places[row],))):
                scores[row, hidden[hidden >= 0]] = -torch.inf
        if scores.shape[1] < count:  # fewer new items in the catalog than asked for
            scores = torch.cat([scores, torch.full((rows, count - scores.shape[1]), float("-inf"))], 1)
        best, picks = scores.topk(count, dim=1)
        ids = self.new_items[picks.clamp(max=len(self.new_items) - 1)].masked_fill(torch.isneginf(best), 0)
        return best, ids

    @torch.no_grad()
    def reserve_new_items(self, items: torch.Tensor, columns: list[torch.Tensor], user_vectors: torch.Tensor,
                          histories: list, pool: tuple | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`new_item_slots`: each list (B, k) gets at least that many new items within its first
        `new_item_rank` positions (the window); (items, columns) with the score columns (B, k
        each; the first decides what is listed: -inf is padding) moved alike. The items put in go
        at the end of the window; the items they displace move down (the last drop off), and one
        already listed below the window moves up from there. They are, first, the new items of
        `pool` (candidates (B, P) and their columns, best first: the ranker's) outside the
        window, with their columns' values; then the user's best-scored unseen new items outside
        the window, carrying their retrieval score in every column."""
        slots, window, k = self.cfg.new_item_slots, min(self.cfg.new_item_rank, self.cfg.k), items.shape[1]
        if not slots or not len(self.new_items):
            return items, columns
        relevance = columns[0]
        shown = (self.new_place[items[:, :window]] >= 0) & ~torch.isneginf(relevance[:, :window])
        need = (slots - shown.sum(1)).clamp(min=0)
        best, ids = self.best_new_items(user_vectors, histories, items[:, :window], relevance[:, :window], slots,
                                        hide=None if pool is None else pool[0])
        items, columns = items.clone(), [c.clone() for c in columns]
        pool_new = None if pool is None else (self.new_place[pool[0]] >= 0) & ~torch.isneginf(pool[1][0])
        for row in torch.nonzero(need).flatten().tolist():
            new_ids, values = [], [[] for _ in columns]
            if pool is not None:
                in_window = set(items[row, :window][~torch.isneginf(relevance[row, :window])].tolist())
                for j, item in enumerate(pool[0][row].tolist()):
                    if len(new_ids) == need[row]:
                        break
                    if pool_new[row, j] and item not in in_window:
                        new_ids.append(item)
                        for v, column in zip(values, pool[1]):
                            v.append(float(column[row, j]))
            for j in range(int(need[row]) - len(new_ids)):
                if not torch.isneginf(best[row, j]):
                    new_ids.append(int(ids[row, j]))
                    for v in values:
                        v.append(float(best[row, j]))
            if not new_ids:
                continue
            cut = window - len(new_ids)
            rest = ~torch.isin(items[row, cut:], torch.tensor(new_ids, dtype=items.dtype))  # a moved item leaves its place
            items[row] = torch.cat([items[row, :cut], torch.tensor(new_ids, dtype=items.dtype), items[row, cut:][rest]])[:k]
            for column, v in zip(columns, values):
                column[row] = torch.cat([column[row, :cut], torch.tensor(v, dtype=column.dtype),
                                         column[row, cut:][rest]])[:k]
        return items, columns

    @torch.no_grad()
    def recommend(self, histories: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(items (B, k), relevance (B, k), users with an empty history) for a list of histories.
        A user with fewer than k unseen candidates has -inf relevance at the end of its row:
        padding (a seen item), never to be shown (score_block drops it)."""
        relevance, candidates, empty, users = self._candidates(histories)
        relevance, candidates, retrieved = self.second_stage(relevance, candidates, histories, users)
        picks = self.rerank(relevance, candidates, histories)
        pool = None if self.ranker is None else (candidates, [relevance, retrieved])
        items, (relevance,) = self.reserve_new_items(candidates.gather(1, picks), [relevance.gather(1, picks)], users,
                                                     histories, pool)
        return items, relevance, empty

    def rerank(self, relevance, candidates, histories, filled: torch.Tensor | None = None) -> torch.Tensor:
        """The policy's picks (B, k) among the candidates (distrec.policies.rerank)."""
        return policies.rerank(self.cfg.policy, policies.Candidates(
            relevance, candidates, self.cfg.k, similar=self.similar, categories=self.categories,
            num_categories=len(self.category_names), histories=histories, shown=self.shown, users=len(self.frame),
            filled=filled))

    def _write_candidates(self, block: int, users: pd.DataFrame, relevance: torch.Tensor, candidates: torch.Tensor) -> None:
        """The retrieval candidates the ranker reads (CANDIDATES part, before the block's part):
        what `distrec evaluate` reads for the retrieval recall@K the ranker works under."""
        n = self.cfg.ranker.candidates
        kept = ~torch.isneginf(relevance[:, :n])
        lengths = kept.sum(1).numpy()
        table = pa.Table.from_arrays([
            self.user_ids.take(np.repeat(users["user"].to_numpy(), lengths)),
            self.item_ids.take(candidates[:, :n].numpy()[kept.numpy()]),
            pa.array((np.cumsum(kept.numpy(), axis=1, dtype=np.int32))[kept.numpy()]),
        ], schema=CANDIDATE_SCHEMA.with_metadata({PART_KEY: json.dumps({"job": self.job, "block": block}).encode()}))
        temp = self.out / f".{CANDIDATES.format(block)}.tmp-{os.getpid()}"
        pq.write_table(table, temp)
        os.replace(temp, self.out / CANDIDATES.format(block))

    def score_block(self, block: int) -> dict:
        """Score one block and write its part; returns the part's record (PART_KEY)."""
        users = self.block_users(block)
        histories = list(users["history"])
        relevance, candidates, empty, user_vectors = self._candidates(histories)
        if self.ranker is not None:
            self._write_candidates(block, users, relevance, candidates)
        relevance, candidates, retrieved = self.second_stage(relevance, candidates, histories, user_vectors)
        filled = torch.zeros(len(users), dtype=torch.bool)
        picks = self.rerank(relevance, candidates, histories, filled)
        # with a ranker, new_item_slots takes the new items it scored first (ranker.new_items), by
        # its score; a new item from outside its candidates carries its retrieval score in both columns
        pool = None if self.ranker is None else (candidates, [relevance, retrieved])
        items, (relevance, retrieved) = self.reserve_new_items(
            candidates.gather(1, picks), [relevance.gather(1, picks), retrieved.gather(1, picks)], user_vectors,
            histories, pool)
        n, k = items.shape
        # -inf relevance is padding (a seen item: the user has fewer unseen candidates than
        # k); every policy puts it last, so dropping it leaves each list shorter, in order
        keep = ~torch.isneginf(relevance)
        lengths = keep.sum(dim=1).numpy()
        kept = keep.numpy()
        ranks = np.cumsum(kept, axis=1, dtype=np.int32)[kept]
        rows = int(lengths.sum())
        # Arrow columns built by take() from the id arrays, not through a pandas frame of
        # Python strings: a block's part went from ~10 to ~5 ms per 1,024 users x 20
        record = {"job": self.job, "block": block, "users": int(n), "rows": rows,
                  "short_lists": int((lengths < self.cfg.k).sum()), "empty": int(empty),
                  "filled_over_cap": int(filled.sum())}
        table = pa.Table.from_arrays([
            self.user_ids.take(np.repeat(users["user"].to_numpy(), lengths)),
            self.item_ids.take(items.numpy()[kept]),
            pa.array(ranks),
            pa.array(((self.cfg.k - ranks + 1) / self.cfg.k).astype(np.float32)),
            pa.array(relevance.numpy()[kept].astype(np.float32)),
            pa.array([self.cfg.policy.name]).take(np.zeros(rows, dtype=np.int32)),
            pa.array(retrieved.numpy()[kept].astype(np.float32)),
        ], schema=SCHEMA.with_metadata({PART_KEY: json.dumps(record).encode()}))
        temp = self.out / f".{PART.format(block)}.tmp-{os.getpid()}"
        fault = os.environ.get(FAULT_ENV)  # fault injection for the tests (an errno name, e.g. ENOSPC)
        if fault:
            code = getattr(errno, fault)
            raise OSError(code, os.strerror(code), str(temp))
        pq.write_table(table, temp)
        os.replace(temp, self.out / PART.format(block))
        return record

