"""`python -m distrec.train --config ... [key=value...]`: the entry point `accelerate launch -m` runs."""

import os
import sys

from distrec.cli import main

if __name__ == "__main__":
    code = main(["train", *sys.argv[1:]])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a launched rank leaves without the interpreter's teardown: fresh-clone CI runs saw a rank
        # of a finished 2-process ZeRO-3 launch abort at exit ("terminate called without an active
        # exception", a C++ communication thread destroyed while joinable) after its results were
        # written and the process group destroyed, which fails the whole launch. Everything is
        # written and closed by now (results, checkpoints, trackers).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
