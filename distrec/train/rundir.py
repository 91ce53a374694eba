"""What a run directory may become (every refusal comes before anything is written):
- a new run is marked (`.distrec-output.json`) and records what it trains on (`run.json`:
  the dataset's manifest sha256, its content, its item ids; `--init-from`); `config.yaml`
  is written once the model is built;
- `run.overwrite=true` replaces only a run distrec wrote, and removes only distrec's own
  files of it (`RUN_NAMES`): a folder that is or holds the dataset, or holds anything
  else, is never replaced (`distrec.outputs.check_output`);
- `--resume` continues only on the run's own dataset and model settings (`model.*`,
  `peft.*`, what a step is); a changed `train.*` setting is honoured and said
  ("resuming ... with train.epochs 3 -> 5");
- `--init-from` keeps the earlier run's model settings (a change is refused), needs a
  catalog sharing item ids with it, and says when it shares few;
- a text model needs item text.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import yaml

from distrec.atomic import recover_dir, write_atomic
from distrec.config import ConfigError, save_config, to_dict
from distrec.formats import DATA_FORMAT
from distrec.models.run import (RUN_FORMAT, RUN_JSON, dataset_identity, model_settings, read_model_json,
                                read_run_record, same_dataset, settings_differ)
from distrec.outputs import MARKER, check_output, mark_output, read_marker, written_by
from distrec.train.checkpoint import trim_metrics
from distrec.train.config import TrainConfig

# what distrec train writes into a run directory: all that run.overwrite=true removes
RUN_NAMES = ("config.yaml", RUN_JSON, "best", "last", "final", "tokenizer", "tb", "metrics.jsonl", "results.json")
CHECKPOINTS = ("best", "last", "final")  # directories published through a staging copy
# refused on --resume: what a step is (a checkpoint's position in the epoch counts them), and
# what the checkpoint's optimizer and schedule state carry (restored over the config's values)
NOT_ON_RESUME = ("train.batch_size", "train.grad_accum", "train.lr", "train.backbone_lr", "train.weight_decay")
HONOURED_ON_RESUME = ("seed", "data.num_workers", "data.verify")  # besides train.*
FEW_SHARED_ITEMS = 0.5  # --init-from warns below this share of the catalog known to the earlier model
MOSTLY_WITHOUT_TEXT = 0.9  # a text model warns from this share of items without text


def is_run_file(name: str) -> bool:
    """A name distrec train writes into a run directory (its files, a checkpoint's staging or
    previous copy, an atomic write's temporary file)."""
    if name in RUN_NAMES or name == MARKER:
        return True
    if any(name in (f".{base}.tmp", f".{base}.old") for base in CHECKPOINTS):
        return True
    return any(name.startswith(f".{base}.tmp-") for base in (*RUN_NAMES, MARKER))


def clear_run(run_dir: Path) -> None:
    """run.overwrite=true: remove distrec's own files of the earlier run (the marker stays until
    it is rewritten: a kill in between leaves a directory still known as a run); the user's
    files stay."""
    for entry in run_dir.iterdir():
        if entry.name == MARKER or not is_run_file(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def say(line: str) -> None:
    """One line on stderr, from the first process of a launch only."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_config(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def check_data(data_dir: Path) -> dict:
    """The prepared dataset's manifest, or a refusal saying what to run."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"data.dir={data_dir}: not a prepared dataset (no manifest.json); run distrec prepare")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != DATA_FORMAT:
        raise ConfigError(f"data.dir={data_dir}: dataset format {manifest.get('format')!r}, this distrec reads "
                          f"{DATA_FORMAT!r}; prepare the data again with this version")
    if not manifest["shards"]:
        raise ConfigError(f"data.dir={data_dir}: the dataset has no training samples")
    return manifest


class RunDirectory:
    """The run directory of one `distrec train`: checked on construction (nothing written),
    then created (`create`) or continued (`continued`) by the main process."""

    def __init__(self, cfg: TrainConfig, resume: bool, init_from: str | None):
        if cfg.data.dir is None or cfg.run.dir is None:
            raise ConfigError("data.dir and run.dir are required (e.g. data.dir=data/ml-1m run.dir=runs/x)")
        self.cfg, self.resume, self.init_from = cfg, resume, init_from
        self.data_dir, self.path = Path(cfg.data.dir), Path(cfg.run.dir)
        self.manifest = check_data(self.data_dir)
        self.items = pd.read_parquet(self.data_dir / "items.parquet")
        self.identity = dataset_identity(self.data_dir, self.items)
        self.warnings: list[str] = []  # said on stderr and kept in results.json
        self.init_record, self.resume_changes = None, []
        self._check_run_dir()
        self._check_init_from()
        self._check_item_text()

    def warn(self, line: str) -> None:
        self.warnings.append(line)
        say(f"warning: {line}")

    # -- checks (nothing written here but a checkpoint's recovery) ----------------------
    def _has_checkpoint(self) -> bool:
        """last/ whole, or its previous copy left by a kill between publish_dir's two renames."""
        return any((self.path / name / "trainer_state.json").is_file() for name in ("last", ".last.old"))

    def _unmarked_checkpoint(self) -> bool:
        """A directory holding only a checkpoint distrec wrote but no marker: what a Ray worker
        on a node without the shared run directory restores its checkpoint into."""
        run = self.path
        if not run.is_dir() or read_marker(run) is not None or written_by(run) is not None:
            return False
        names = [entry.name for entry in run.iterdir()]
        return (bool(names) and all(map(is_run_file, names))
                and any(n in names for n in ("last", ".last.tmp", ".last.old")))

    def _check_run_dir(self) -> None:
        cfg, run = self.cfg, self.path
        inputs = [self.data_dir, self.init_from]
        if self._unmarked_checkpoint():
            target = run.resolve()
            for given in filter(None, inputs):
                if target == Path(given).resolve() or target in Path(given).resolve().parents:
                    raise ConfigError(f"run.dir={run}: is or holds the input {given} of this train; distrec never "
                                      "writes over its inputs: choose another run.dir")
            existed = True
        else:
            # refuses an input, a folder holding one, the cwd, and a folder distrec train did not write
            existed = check_output(run, "train", inputs=inputs, flag="run.overwrite=true", overwrite=None)
        self.replace = False
        if self.resume:
            if not existed:
                raise ConfigError(f"--resume: run.dir={run} holds no run, so no checkpoint to resume from; "
                                  "drop --resume to start it")
            if not self._has_checkpoint():
                raise ConfigError(f"--resume: run.dir={run} has no checkpoint yet (the first run stopped before one "
                                  "was saved); start afresh with run.overwrite=true (without --resume)")
            self._check_same_run()
            for name in ("last", "best"):  # a kill between a checkpoint's two renames
                recover_dir(run / name)
        elif existed and not cfg.run.overwrite:
            if self._has_checkpoint():
                raise ConfigError(f"run.dir={run} already holds a run; pass --resume to continue it, or "
                                  "run.overwrite=true to start afresh (or choose another run.dir)")
            raise ConfigError(f"run.dir={run} already holds a run that stopped before its first checkpoint (nothing "
                              "to resume); pass run.overwrite=true to start afresh (or choose another run.dir)")
        else:
            self.replace = existed

    def _check_same_run(self) -> None:
        """--resume: the run's own dataset and model settings, or a one-line refusal naming both."""
        run, cfg, now = self.path, self.cfg, self.identity
        record = read_run_record(run) or {}
        old_cfg = _read_config(run / "config.yaml")
        try:
            best = read_model_json(run / "best")
        except ConfigError:
            best = None
        old_ids = [str(i) for i in best["item_ids"]] if best else None
        new_ids = self.items["item_id"].astype(str).tolist()
        old_dir = (record.get("data") or {}).get("dir") or ((old_cfg or {}).get("data") or {}).get("dir")
        if record.get("data"):
            same = same_dataset(record["data"], now)
            recorded = record["data"].get("manifest_sha256", "?")
            detail = f"manifest sha256 {recorded[:12]} vs {now['manifest_sha256'][:12]}"
        else:  # a run written before run.json: its checkpoint's catalog
            same = old_ids is None or old_ids == new_ids
            detail = "another catalog"
        if not same:
            if old_ids is not None and old_ids != new_ids:
                shared = len(set(old_ids) & set(new_ids))
                detail += (f"; the same {len(new_ids)} items in another order" if sorted(old_ids) == sorted(new_ids)
                           else f"; {len(old_ids)} items there, {len(new_ids)} here, {shared} in both")
            if old_dir and Path(old_dir).resolve() == self.data_dir.resolve():
                raise ConfigError(f"--resume: data.dir={self.data_dir} has changed since run.dir={run} was trained "
                                  f"on it ({detail}; prepared again?): a checkpoint continues only on its own dataset: "
                                  "start a new run (another run.dir, or run.overwrite=true)")
            raise ConfigError(f"--resume: data.dir={self.data_dir} is not the dataset run.dir={run} was trained on "
                              f"({old_dir or 'another dataset'}; {detail}): resume with "
                              f"data.dir={old_dir or 'that one'}, "
                              "or start a new run (another run.dir, or run.overwrite=true)")
        new = _flat(to_dict(cfg))
        if old_cfg is not None:
            old = _flat(old_cfg)
            old_model = model_settings(old_cfg.get("model"), old_cfg.get("peft"))
        elif best is not None:
            old, old_model = {}, model_settings(best["model"], best["peft"])
        else:
            return
        changed = settings_differ(old_model, model_settings(to_dict(cfg.model), to_dict(cfg.peft)))
        changed += settings_differ({k: old[k] for k in NOT_ON_RESUME if k in old}, new)
        if changed:
            raise ConfigError(f"--resume: run.dir={run} was trained with other settings than this config "
                              f"({', '.join(changed)}): its checkpoint continues only with its own model, step and "
                              "optimizer settings: resume with them, or start a new run (another run.dir, or "
                              "run.overwrite=true)")
        honoured = {k: v for k, v in old.items() if (k.startswith("train.") or k in HONOURED_ON_RESUME)
                    and k not in NOT_ON_RESUME}
        self.resume_changes = settings_differ(honoured, new)

    def _check_init_from(self) -> None:
        """--init-from: the earlier run's model settings (a changed one is refused: the model
        would not be what config.yaml says), and a catalog sharing item ids with it."""
        init_from = self.init_from
        if init_from is None:
            return
        meta = read_model_json(Path(init_from) / "best")  # fails clearly before any work
        cfg = self.cfg
        changed = settings_differ(model_settings(meta["model"], meta["peft"]),
                                  model_settings(to_dict(cfg.model), to_dict(cfg.peft)))
        if changed:
            raise ConfigError(f"--init-from {init_from}: this config changes the settings its model was trained with "
                              f"({', '.join(changed)}); a continued model keeps them: set them as in "
                              f"{Path(init_from) / 'config.yaml'}, or train afresh without --init-from")
        known = {str(i) for i in meta["item_ids"]}
        new_ids = self.items["item_id"].astype(str)
        shared = int(new_ids.isin(known).sum())
        if shared == 0:
            raise ConfigError(f"--init-from {init_from}: its model ({len(known)} items) shares no item id with "
                              f"data.dir={self.data_dir} ({len(new_ids)} items): is this the dataset it was trained "
                              "for? train afresh without --init-from")
        share = shared / len(new_ids)
        self.init_record = {"run": str(Path(init_from).resolve()), "shared_items": shared,
                            "catalog_items": len(new_ids), "model_items": len(known), "share": round(share, 4)}
        if share < FEW_SHARED_ITEMS:
            start = ("from their text alone" if cfg.model.item_repr in ("text", "text+id")
                     else "untrained (ID vectors at zero)")
            self.warn(f"--init-from {init_from}: only {shared} of the {len(new_ids)} items of "
                      f"data.dir={self.data_dir} ({share:.0%}) are known to its model; the other {len(new_ids) - shared} start {start}")

    def _check_item_text(self) -> None:
        """A text model on items without text ranks them by nothing: tied scores as results."""
        repr_ = self.cfg.model.item_repr
        if repr_ not in ("text", "text+id", "content"):
            return
        texts = self.items["text"].fillna("").astype(str).str.strip() if "text" in self.items else None
        empty = 1.0 if texts is None or len(texts) == 0 else float((texts == "").mean())
        if empty == 1.0:
            raise ConfigError(f"data.dir={self.data_dir} has no item text (prepared without --items): train "
                              "item_repr=id, or prepare with --items CATALOG")
        if empty >= MOSTLY_WITHOUT_TEXT:
            self.warn(f"data.dir={self.data_dir}: {empty:.0%} of the {len(texts)} items have no text (prepared "
                      f"without a full catalog?): model.item_repr={repr_} has nothing to tell those apart; train "
                      "item_repr=id, or prepare with --items CATALOG")

    # -- writing (main process, once every check passed and the model is built) ----------
    def _record(self) -> None:
        write_atomic(self.path / RUN_JSON, json.dumps({"format": RUN_FORMAT, "data": self.identity,
                                                       "init_from": self.init_record}, indent=2) + "\n")

    def _mark(self) -> None:
        mark_output(self.path, "train", {"data_dir": self.identity["dir"],
                                         "manifest_sha256": self.identity["manifest_sha256"],
                                         "init_from": None if self.init_from is None
                                         else str(Path(self.init_from).resolve())})

    def create(self, tokenizer) -> None:
        """A new run: replace distrec's own files of an earlier one (run.overwrite=true), mark
        the directory, record what the run trains on, its config and tokenizer."""
        run = self.path
        if self.replace:
            clear_run(run)
        run.mkdir(parents=True, exist_ok=True)
        self._mark()
        self._record()
        save_config(self.cfg, run / "config.yaml")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(run / "tokenizer"))

    def continued(self, step: int, tokenizer) -> None:
        """A resumed run from its checkpoint at `step`: metrics trimmed back to it, the marker and
        record of a run written before them added, config.yaml describing the run as it
        continues, the honoured train.* changes said."""
        run = self.path
        trim_metrics(run, step)
        if read_marker(run) is None:  # a run written before the marker
            self._mark()
        if read_run_record(run) is None:
            self._record()
        save_config(self.cfg, run / "config.yaml")
        if tokenizer is not None and not (run / "tokenizer").exists():
            tokenizer.save_pretrained(str(run / "tokenizer"))
        if self.resume_changes:
            say(f"resuming {run} at step {step} with {', '.join(self.resume_changes)}")
