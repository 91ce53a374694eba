"""Fault injection for the kill-and-resume tests: the one testing hook of the training loop.

The loop calls `hook.reached(phase, step)` at fixed points of its progress; nothing happens
unless a test set one of these variables in the training process's environment:
- DISTREC_STOP_AT=STEP:PHASE: the process SIGSTOPs itself, once, for the test to SIGKILL it,
  at the first PHASE at or after optimizer step STEP: `step` (the step done), `validated`
  (validation done and best/ saved, last/ not yet), `checkpoint` (last/ written to its staging
  directory, not yet published). By training progress, never by the clock.
- DISTREC_CRASH_AFTER_STEP=STEP: the process SIGKILLs itself after the first checkpoint at or
  after step STEP (`checkpointed`), in a run that is not a resume (every rank of a launch does).
"""

from __future__ import annotations

import os
import signal

STOP_AT = "DISTREC_STOP_AT"
CRASH_AFTER_STEP = "DISTREC_CRASH_AFTER_STEP"
PHASES = ("step", "validated", "checkpoint", "checkpointed")


class FaultHook:
    def __init__(self, stop_at: str | None, crash_after: str | None, resumed: bool):
        step, _, phase = (stop_at or "").partition(":")
        self.stop = (int(step), phase) if stop_at else None
        self.crash = int(crash_after) if crash_after and not resumed else None
        self.stopped = False

    def reached(self, phase: str, step: int) -> None:
        assert phase in PHASES, phase
        if self.stop and not self.stopped and phase == self.stop[1] and step >= self.stop[0]:
            self.stopped = True
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.crash is not None and phase == "checkpointed" and step >= self.crash:
            os.kill(os.getpid(), signal.SIGKILL)


def from_environment(resumed: bool) -> FaultHook:
    return FaultHook(os.environ.get(STOP_AT), os.environ.get(CRASH_AFTER_STEP), resumed)
