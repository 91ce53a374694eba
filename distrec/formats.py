"""What every stage may import: the error of bad input data and the prepared dataset's format.

Stages import each other's public entry points only; the types and formats they share
live here (and in `distrec.config` for ConfigError, `distrec.outputs` for output
ownership, `distrec.recs` for reading a recommendations folder)."""

DATA_FORMAT = "distrec-prepared/1"  # manifest.json "format" of a dataset distrec prepare wrote
DATA_FAMILY = DATA_FORMAT.split("/")[0]  # any version of it (an older dataset is recognised, then refused)


class DataError(Exception):
    """Input the user must fix. The message names the file, the line and what was expected."""
