"""Run directories that protect work: what a training start may do with ``run_dir`` (docs/runs.md).

- ``resume=null`` on a directory that holds a run (checkpoints or ``final/``) is refused, unless ``overwrite=true``,
  which discards exactly what cdlm wrote there (``checkpoints/``, ``logs/``, ``final/``, ``config.yaml``,
  ``metrics.json``) and nothing else.
- ``resume=auto`` resumes ``checkpoints/last.ckpt`` if there is one and says which it did.
- A lock (``flock`` on ``run_dir/.lock``, released by the kernel when the process dies, even by ``kill -9``)
  refuses a second training in the same directory.
- Callers decide everything with ``plan`` (read-only) and build the whole run before ``RunLock`` creates anything,
  so a start that fails leaves the directory as it was.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from cdlm.sharded_checkpoint import is_sharded_checkpoint

OWNED = ("checkpoints", "logs", "final", "config.yaml", "metrics.json")
"""What a training writes into its run directory (and ``overwrite=true`` removes)."""


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message says how to go on."""


@dataclass(frozen=True)
class Plan:
    """What a start does: ``ckpt`` to resume from (None: fresh), whether to ``discard`` a previous run, and a line
    for the user."""

    ckpt: str | None
    discard: bool
    message: str


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a previous run's checkpoints or final model."""
    checkpoints = run_dir / "checkpoints"
    has_ckpt = checkpoints.is_dir() and any(checkpoints.iterdir())
    return has_ckpt or (run_dir / "final").exists()


def plan(run_dir: Path, resume: str | None, overwrite: bool) -> Plan:
    """Decide, without writing anything, what a training start does with ``run_dir``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir={str(run_dir)!r} is a file, not a directory; choose another run_dir")
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume == "auto":
        if last.is_file() or is_sharded_checkpoint(last):
            return Plan(str(last), False, f"resume=auto: resuming from {last}")
        if holds_run(run_dir):
            raise RunDirError(
                f"resume=auto: {run_dir} holds a run but no checkpoints/last.ckpt; pass resume=<file.ckpt> to resume "
                "from another checkpoint of it, or overwrite=true to discard it"
            )
        return Plan(None, False, f"resume=auto: no checkpoint in {run_dir / 'checkpoints'}, starting a fresh run")
    if resume is not None:
        path = Path(resume)
        if not (path.is_file() or is_sharded_checkpoint(path)):
            raise RunDirError(
                f"resume={resume!r}: no such checkpoint file or sharded checkpoint directory (use a .ckpt path, "
                "'auto' or null)"
            )
        return Plan(str(path), False, f"resuming from {path}")
    if holds_run(run_dir):
        if overwrite:
            return Plan(None, True, f"overwrite=true: discarding the previous run in {run_dir}")
        raise RunDirError(
            f"run_dir={str(run_dir)!r} already holds a run ({describe(run_dir)}); to continue it pass resume=auto, to "
            "start over in it pass overwrite=true (deletes its checkpoints, logs and final/), or choose a new run_dir"
        )
    return Plan(None, False, f"starting a fresh run in {run_dir}")


def describe(run_dir: Path) -> str:
    """A short account of a run directory's checkpoints."""
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    return f"checkpoints {names}" if names else "a final/ model"


def discard(run_dir: Path) -> None:
    """Remove what a previous training wrote into ``run_dir`` (``OWNED``), nothing else."""
    for name in OWNED:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def is_launcher_rank() -> bool:
    """Whether this process is the one a user started (rank 0 of node 0), before Lightning sets ranks up.

    Lightning's DDP launcher re-runs the command for the other local ranks with ``LOCAL_RANK`` set; ``torchrun`` and
    SLURM set ``RANK`` / ``SLURM_PROCID`` for every process.
    """
    env = os.environ
    rank = env.get("RANK", env.get("SLURM_PROCID", "0"))
    return rank == "0" and env.get("LOCAL_RANK", "0") == "0" and env.get("NODE_RANK", "0") == "0"


class RunLock:
    """An exclusive lock on a run directory for the life of one training (``with RunLock(run_dir): ...``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path, self.fd = run_dir, run_dir / ".lock", -1

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise RunDirError(
                f"run_dir={str(self.run_dir)!r} is in use by another training ({holder}); wait for it to finish "
                "or choose another run_dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
