"""A polite stop for long work: SIGTERM (what Slurm sends before it preempts or times out a job) sets a
flag, and the long loops check it after each finished part (an extraction chunk, a training epoch, a
perturbation level, a chunk of scored images) and raise `Preempted` there. The stage then exits non-zero
with every finished part saved, and the next run resumes from them. A SIGKILL cannot be caught: then at most the
part in progress is lost (every part is written through a temporary name and renamed).
"""

from __future__ import annotations

import signal

_requested = False


class Preempted(RuntimeError):
    """Raised at a part boundary after a SIGTERM."""


def _handle(signum, frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    """From now on, SIGTERM asks the long loops to stop after their current part."""
    signal.signal(signal.SIGTERM, _handle)


def finished() -> None:
    """The work is over: from now on SIGTERM is ignored. Python restores the default action (death) while
    it shuts down, and a SIGTERM then would turn a finished run into a killed one (exit 143, which a
    Slurm task takes for a stop and reruns)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def requested() -> bool:
    return _requested


def check(where: str) -> None:
    """Raise Preempted if a stop was asked for; `where` names the part just finished."""
    if _requested:
        raise Preempted(f"stopped on SIGTERM after {where}; the finished parts are kept: run the same command "
                        "again to resume")
