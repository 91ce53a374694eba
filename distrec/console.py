"""What reaches the user's terminal: distrec's progress bars, results and its own warnings.

Libraries warn about things users cannot act on (transformers' deprecations, DeepSpeed
choosing the CPU accelerator, Ray's start-up lines, a weight-loading bar per model load).
`quiet()` silences them at the source before the libraries are imported; `--verbose` (or
DISTREC_VERBOSE=1, which Ray workers and launched processes inherit) brings them all back.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "DISTREC_VERBOSE"
LIBRARIES = r"(transformers|torch|deepspeed|ray|accelerate|peft|webdataset|numba|pyarrow|pandas|huggingface_hub)(\..*)?$"


QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet(verbose_asked: bool = False) -> None:
    """Keep library chatter off the terminal (unless verbose). Call before heavy imports."""
    if verbose_asked:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        # a verbose process started by a quiet one (a test, a wrapper) must not inherit its silence
        for key, value in QUIET_ENV.items():
            if os.environ.get(key) == value:
                del os.environ[key]
        warnings.simplefilter("default")
        return
    # environment first: read at import by these libraries, and inherited by the processes
    # that `accelerate launch` and Ray start
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=LIBRARIES)
    # DeepSpeed's logger sets its own level when it is created; a filter on it survives
    logging.getLogger("DeepSpeed").addFilter(_errors_only)
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "accelerate", "peft", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


_said: set[str] = set()


def say_once(key: str, line: str) -> None:
    """One line on stderr per key per process, from the first rank only."""
    if key in _said or os.environ.get("RANK", "0") != "0":
        return
    _said.add(key)
    print(line, file=sys.stderr)
