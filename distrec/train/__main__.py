"""`python -m distrec.train --config ... [key=value...]`: the entry point `accelerate launch -m` runs."""

import sys

from distrec.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
