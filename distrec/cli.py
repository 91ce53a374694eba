"""The one front door: `distrec prepare | train | ranker-data | score | evaluate | demo`.

Each verb takes an optional `--config FILE.yaml` and trailing `key=value` overrides; the
flags are shorthands for the most common keys. Bad input exits with code 2 and a message
naming the file, the line and what was expected, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from distrec.config import ConfigError, help_text, load_config
from distrec.console import quiet
from distrec.formats import DataError
from distrec.policies import POLICIES

DEMO_TRAIN = {  # configs/train/demo.yaml, inlined so an installed package needs no repo checkout
    "model": {"backbone": "all-MiniLM-L6-v2", "item_repr": "text", "dim": 64, "max_len": 30, "max_text_tokens": 16},
    "peft": {"method": "lora", "r": 8, "alpha": 16},
    "train": {"loss": "softmax", "batch_size": 64, "lr": 0.002, "backbone_lr": 0.0005, "epochs": 3,
              "live_items": 32, "patience": 2},
}


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="turn interaction logs into a split, sharded dataset")
    p.add_argument("--source", help="recbole | movielens | p5 | table | synthetic")
    p.add_argument("--input", help="interaction file or data-set directory")
    p.add_argument("--items", help="item catalog file (default: recbole NAME.item beside NAME.inter, movielens "
                   "movies.dat or u.item, p5 the one *.item file in the folder; table: none, pass it)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--config", help="a YAML file of prepare settings (configs/prepare/*.yaml)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an earlier output of distrec prepare (never an input or a folder distrec did not write)")
    p.add_argument("--verify", metavar="DIR", help="check a prepared dataset (checksums, samples, tables) and exit")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. split.mode=time")


def _summary(manifest: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"distrec prepare -> {out}", show_header=False)
    splits = manifest["splits"]
    rows = [
        ("rows read", manifest["rows_read"]),
        ("rows rejected", manifest["rows_rejected"]),
        ("interactions kept", manifest["num_interactions"]),
        ("users", manifest["num_users"]),
        ("items", manifest["num_items"]),
        ("catalog rows read / rejected", f"{manifest['catalog']['rows_read']} / {manifest['catalog']['rows_rejected']}"),
        ("train samples", splits["train"]["samples"]),
        ("val / test users", f"{splits['val']['users']} / {splits['test']['users']}"),
        ("cold test targets", splits["test"]["cold_targets"]),
        ("shards", len(manifest["shards"])),
        ("time", f"{manifest['seconds']:.1f} s"),
    ]
    for reason, count in manifest["rejections"].items():
        rows.insert(2, (f"  rejected: {reason}", count))
    for name, value in rows:
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value))
    console = Console(stderr=True)
    console.print(table)
    for warning in manifest["notes"].get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")


def run_prepare(args) -> int:
    from distrec.data.config import PrepareConfig
    from distrec.data.prepare import prepare

    if args.help_config:
        print("\n".join(help_text(PrepareConfig)))
        return 0
    if args.verify:
        from distrec.data.shards import verify_dataset

        counts = verify_dataset(args.verify)
        print(f"{args.verify}: ok, {counts['shards']} shards with {counts['samples']:,} samples match the manifest; "
              f"{counts['items_rows']:,} items, {counts['val_rows']:,} validation and {counts['test_rows']:,} test users")
        return 0
    flags = {k: v for k, v in vars(args).items()
             if k in ("source", "input", "items", "out", "overwrite", "progress") and v is not None}
    cfg = load_config(PrepareConfig, args.config, args.overrides, base=flags)
    manifest = prepare(cfg)
    _summary(manifest, cfg.out)
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune the recommender on a prepared dataset")
    p.add_argument("--config", help="a YAML file of training settings (configs/train/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the run in run.dir from its last checkpoint")
    p.add_argument("--init-from", metavar="RUN", help="start from an earlier run's best model (new items included)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.dir=data/ml-1m run.dir=runs/x")


def run_train(args) -> int:
    from distrec.train.config import TrainConfig

    if args.help_config:
        print("\n".join(help_text(TrainConfig)))
        return 0
    cfg = load_config(TrainConfig, args.config, args.overrides,
                      base={} if args.progress is None else {"progress": args.progress})
    from distrec.train.loop import train  # heavy imports only when training

    results = train(cfg, resume=args.resume, init_from=args.init_from)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # torn down before the interpreter exits: a fresh-clone CI run saw a rank of a 2-process
        # ZeRO-3 launch abort at exit ("terminate called without an active exception") after
        # writing its results, from communication threads still alive at shutdown
        dist.destroy_process_group()
    test = results["test"]
    if int(os.environ.get("RANK", "0")) != 0:  # one line per job, not per process
        return 0
    print(f"test NDCG@10 {test['ndcg@10']:.4f}  HR@10 {test['hr@10']:.4f}  "
          f"(cold items: NDCG@10 {_cold(results)})  "
          f"-> {cfg.run.dir}/results.json", file=sys.stderr)
    return 0


def _cold(results: dict) -> str:
    """The cold-item slice as users should read it: undefined without users, not 0.0000."""
    cold = results["test_cold"]
    value = cold.get("ndcg@10")
    if not cold.get("users") or value is None:
        return "n/a (0 users)"
    return f"{value:.4f}, {cold['users']} users"


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="score the whole catalog for every user (Ray), re-rank for diversity")
    p.add_argument("--run", help="a run directory written by distrec train")
    p.add_argument("--data", help="the prepared dataset")
    p.add_argument("--out", help="output directory (Parquet parts; a re-run resumes)")
    p.add_argument("--policy", help=" | ".join(POLICIES))
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: a local Ray")
    p.add_argument("--config", help="a YAML file of score settings")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the results of a different scoring job in --out (a re-run of the same job resumes)")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. policy.strength=0.3 k=10")


def run_score(args) -> int:
    from distrec.score.config import ScoreConfig

    if args.help_config:
        print("\n".join(help_text(ScoreConfig)))
        return 0
    base = {k: v for k, v in vars(args).items() if k in ("run", "data", "out", "address", "overwrite") and v is not None}
    if args.policy:
        base["policy"] = {"name": args.policy}
    cfg = load_config(ScoreConfig, args.config, args.overrides, base=base)
    from distrec.score.job import score

    summary = score(cfg)
    print(f"scored {summary['users_scored']:,} users ({summary['blocks_skipped']} of {summary['blocks']} blocks "
          f"already done) x {summary['items']:,} items, policy {cfg.policy.name}, "
          f"{summary['users_per_s']:,.0f} users/s, {summary['empty_history_users']} with an empty history "
          f"(popularity) -> {summary['out']}", file=sys.stderr)
    return 0


def _ranker_data_parser(sub) -> None:
    p = sub.add_parser("ranker-data", help="the ranker's training candidates, from a retrieval run (once)")
    p.add_argument("--run", help="the retrieval run (a two-tower run)")
    p.add_argument("--data", help="the prepared dataset it was trained on")
    p.add_argument("--out", help="output directory (shards, val.parquet, test.parquet, manifest.json)")
    p.add_argument("--config", help="a YAML file of ranker-data settings")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier ranker-data output")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. candidates=20 random=4")


def run_ranker_data(args) -> int:
    from distrec.ranker_data import RankerDataConfig, ranker_data

    if args.help_config:
        print("\n".join(help_text(RankerDataConfig)))
        return 0
    base = {k: v for k, v in vars(args).items() if k in ("run", "data", "out", "overwrite") and v is not None}
    cfg = load_config(RankerDataConfig, args.config, args.overrides, base=base)
    m = ranker_data(cfg)
    print(f"{m['train']['samples']:,} training samples of {m['train']['prefixes']:,} prefixes x {cfg.candidates} + "
          f"{cfg.random} candidates (the retriever had the positive in {m['train']['retrieval_recall']:.1%}; "
          f"missed={cfg.missed}); validation recall@{cfg.candidates} "
          f"{m['val']['retrieval_recall']:.4f}; {m['seconds']:.0f} s -> {cfg.out}", file=sys.stderr)
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy and beyond-accuracy metrics of lists, with a report")
    p.add_argument("--recs", type=Path, help="output of distrec score")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--run", type=Path, help="the run (item vectors for ILD; required with --sweep)")
    p.add_argument("--sweep", action="store_true", help="policies over a range of strengths: the trade-off curve")
    p.add_argument("--max-loss", type=float, default=0.02, help="--sweep: accuracy loss allowed (relative)")
    p.add_argument("--category-level", type=int, default=-1, help="which entry of an item's categories counts")
    p.add_argument("--overwrite", action="store_true", help="replace a report that distrec evaluate wrote there")
    p.add_argument("--compare", type=Path, help="another recommendations folder on the same users: the difference "
                   "in NDCG@10 / HR@10 with its paired bootstrap 95%% interval")
    p.add_argument("--similarity", choices=("model", "text", "category"), default="model",
                   help="with --run: ILD's notion of alike (and, with --sweep, mmr's and dpp's) - the run's item "
                        "vectors (model), its item tower's text embeddings (text: a text run), or the category")


def run_evaluate(args) -> int:
    from distrec import evaluate as ev

    if args.sweep:
        if args.run is None:
            raise ConfigError("--sweep needs --run")
        result = ev.sweep(args.run, args.data, args.out, max_loss=args.max_loss, category_level=args.category_level,
                          overwrite=args.overwrite, similarity=args.similarity)
        for name, best in result["best_within_loss"].items():
            print(f"{name:13s} most diverse within {args.max_loss:.0%} NDCG loss: strength {best['ild']['strength']} "
                  f"ILD@10 {best['ild']['ild@10']:.3f}; category coverage {best['category_coverage']['category_coverage@10']:.3f}",
                  file=sys.stderr)
        print(f"-> {args.out}/tradeoff.png, sweep.json", file=sys.stderr)
        return 0
    if args.recs is None:
        raise ConfigError("--recs is required (or --sweep with --run)")
    result = ev.evaluate(args.recs, args.data, args.out, args.run, args.category_level, overwrite=args.overwrite,
                         similarity=args.similarity, compare=args.compare)
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    from distrec.report import main_k, number

    acc, k = result["accuracy"], main_k(result["accuracy"])
    print(f"NDCG@{k} {number(acc.get(f'ndcg@{k}'), result['users'])}  HR@{k} {number(acc.get(f'hr@{k}'), result['users'])}  "
          f"({result['users']:,} users) -> {args.out}/report.html", file=sys.stderr)
    if "retrieval" in result:
        r, depth = result["retrieval"], result["retrieval"]["candidates"]
        print(f"retrieval recall@{depth} {r[f'recall@{depth}']:.4f} (the ranker's ceiling)", file=sys.stderr)
    for key, c in (result.get("compare") or {}).items():
        if isinstance(c, dict):
            print(f"{key}: {c['this']:.4f} vs {c['other']:.4f}, difference {c['difference']:+.4f} "
                  f"[{c['interval95'][0]:+.4f}, {c['interval95'][1]:+.4f}] (paired bootstrap 95%)", file=sys.stderr)
    return 0


def run_demo(args) -> int:
    from distrec.data.config import PrepareConfig
    from distrec.data.prepare import prepare
    from distrec.train.config import TrainConfig
    from distrec.train.loop import train

    out = Path(args.out)
    started = time.perf_counter()
    print(f"[1/4] prepare: synthetic logs -> {out / 'data'}", file=sys.stderr)
    prepare_overrides = [o for o in args.overrides if o.startswith("synthetic.")]
    cfg = load_config(PrepareConfig, None, prepare_overrides,
                      base={"source": "synthetic", "out": str(out / "data"), "overwrite": True})
    _summary(prepare(cfg), cfg.out)
    print(f"[2/4] train: MiniLM + LoRA item tower -> {out / 'run'}", file=sys.stderr)
    train_cfg = load_config(TrainConfig, None, [o for o in args.overrides if o not in prepare_overrides],
                            base={**DEMO_TRAIN, "data": {"dir": str(out / "data")},
                                  "run": {"dir": str(out / "run"), "overwrite": True}})
    results = train(train_cfg)
    print(f"      test NDCG@10 {results['test']['ndcg@10']:.4f}  HR@10 {results['test']['hr@10']:.4f}; "
          f"new (cold) items NDCG@10 {_cold(results)}", file=sys.stderr)
    print(f"[3/4] score: every user x the whole catalog (Ray), MMR re-ranking -> {out / 'recs'}", file=sys.stderr)
    from distrec.score.config import ScoreConfig
    from distrec.score.job import score

    summary = score(load_config(ScoreConfig, None, [], base={
        "run": str(out / "run"), "data": str(out / "data"), "out": str(out / "recs"), "users": "test",
        "overwrite": True, "policy": {"name": "mmr", "strength": 0.3}}))
    print(f"      {summary['users_scored']:,} users, {summary['users_per_s']:,.0f} users/s", file=sys.stderr)
    print(f"[4/4] evaluate: accuracy, diversity, coverage, and the policies' trade-off -> {out / 'eval'}",
          file=sys.stderr)
    from distrec.evaluate import evaluate, sweep

    sweep(out / "run", out / "data", out / "eval", candidates=100, overwrite=True)
    result = evaluate(out / "recs", out / "data", out / "eval", out / "run", keep_sweep=True)
    for warning in result.get("warnings", []):
        print(f"      warning: {warning}", file=sys.stderr)
    beyond = result["beyond@10"]
    print(f"      NDCG@10 {result['accuracy']['ndcg@10']:.4f}, ILD@10 {beyond['ild']:.3f}, "
          f"category coverage {beyond['category_coverage']:.3f}, Gini {beyond['gini']:.3f}", file=sys.stderr)
    for name in ("data", "run", "recs", "eval"):
        print(f"      {name:5s} {out / name}", file=sys.stderr)
    print(f"      report: {out / 'eval' / 'report.html'} (metrics.json, sweep.json, report.md, *.png)", file=sys.stderr)
    print(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distrec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    _prepare_parser(sub)
    _train_parser(sub)
    _score_parser(sub)
    _evaluate_parser(sub)
    _ranker_data_parser(sub)
    demo = sub.add_parser("demo", help="run every stage on the built-in synthetic default")
    demo.add_argument("--out", default="out/demo", help="where the demo writes (default out/demo)")
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="synthetic.* go to prepare, the rest to train (e.g. train.epochs=1)")
    for action in sub.choices.values():
        action.add_argument("--verbose", action="store_true", help="show library warnings and logs (Ray, DeepSpeed, transformers)")
    args = parser.parse_args(argv)
    quiet(args.verbose)
    verbs = {"prepare": run_prepare, "train": run_train, "score": run_score, "evaluate": run_evaluate,
             "ranker-data": run_ranker_data, "demo": run_demo}
    try:
        return verbs[args.verb](args)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # an input named on the command line or in a config that is not there
        print(f"error: {e.filename or e}: not found while {args.verb} was reading its input; check the path "
              "(relative paths are from the current directory)", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or unwritable output: the machine, not the input
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e} while {args.verb} was writing; every stage publishes its "
              "output atomically (temp, then rename), so the last complete output is unchanged. Free space "
              "or choose a writable location and run the same command again.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output was published", file=sys.stderr)
        return 130
