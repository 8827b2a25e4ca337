"""Issue 18's "today": the code at commit ``bc513e6`` (when the issue was filed) in its own git
worktree, run beside this tree, and the CPU, peak memory and wall of one child process.

The worktree is made on demand under ``bench/out/baseline-bc513e6/`` (ignored; ``git worktree add
--detach``, reused while it is there; ``--force`` re-adds it when its folder was deleted but ``git
worktree prune`` has not yet run) and run with ``PYTHONPATH=<that folder>`` and its own ``run.py``.
Its settings are its own ``config/default.yaml`` with the paths changed (:func:`project_config`),
so keys added since (``worker.cpu_workers``, ``executor``) never reach the old code.

:func:`run_child` measures one child with ``os.wait4``: user + system CPU seconds and the peak RSS
(``ru_maxrss``) of the child and of the descendants it waited for, and the wall time from the
spawn to its exit (interpreter start and imports included, as for any tool a user would run).
The child is started by a small launcher (``python -I -S``, :data:`LAUNCHER`), not by the bench
itself: Linux carries the peak RSS of the process that spawned a child into the child's
``ru_maxrss`` (``exec`` keeps the spawning memory's high-water mark; subprocess spawns with
``vfork``, sharing the bench's memory until then), so a bench that holds a 1 GB volume would
report 1 GB for ``unzip``. Through the launcher that floor is its own ~10 MB.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
COMMIT = "bc513e6"  # issue 18's table was measured on this commit


def ensure(commit: str = COMMIT, repo: Path = REPO) -> Path:
    """The worktree of ``commit`` under ``bench/out/baseline-<commit>/`` (made if missing); checks that its
    ``processor`` is the one a child with ``PYTHONPATH=<tree>`` imports.

    Raises ``RuntimeError`` when git cannot make it (e.g. a shallow clone without the commit)."""
    tree = repo / "bench" / "out" / f"baseline-{commit}"
    if not (tree / ".git").is_file():
        done = subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--force", "--detach", str(tree), commit],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"baseline: git worktree add {commit} failed: {done.stderr.strip()}")
    head = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not head.startswith(commit):
        raise RuntimeError(f"baseline: {tree} is at {head[:12]}, not {commit}; remove it and run again")
    found = subprocess.run(
        [sys.executable, "-c", "import processor; print(processor.__file__)"],
        capture_output=True, text=True, env=child_env(tree), cwd=tree, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"baseline: PYTHONPATH={tree} imports processor from {found}")
    return tree


def child_env(tree: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``PYTHONPATH`` set to ``tree`` alone."""
    return {**os.environ, "PYTHONPATH": str(tree), **(extra or {})}


def project_config(tree: Path, root: Path, **overrides: Any) -> Path:
    """``tree``'s own ``config/default.yaml`` for a throw-away project in ``root``: the root, the
    state, inbox and outbox in it, ``tree``'s shipped ``pipelines/chest-ct.yaml`` and an empty
    ``weights/`` (so the model steps are recorded as skipped); ``overrides`` replace top-level keys.
    Written to ``root/config.yaml``; returns its path."""
    settings = yaml.safe_load((tree / "config" / "default.yaml").read_text(encoding="utf-8"))
    (root / "weights").mkdir(parents=True, exist_ok=True)
    settings.update(
        root=str(root), pipeline=str(tree / "pipelines" / "chest-ct.yaml"), weights="weights", **overrides
    )
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return config


@dataclass
class Child:
    """One child process: CPU seconds (user + system, waited-for descendants included), its peak
    RSS in MiB (``ru_maxrss``: the largest of the child and those descendants, not their sum) and
    the wall seconds from the spawn to its exit."""

    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    wall_s: float
    returncode: int

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


# Spawns argv[2:], waits for it and writes (exit code, user s, sys s, maxrss KiB, wall s) to argv[1].
LAUNCHER = """
import os, sys, time
began = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - began
with open(sys.argv[1], "w") as out:
    out.write(repr((os.waitstatus_to_exitcode(status), ru.ru_utime, ru.ru_stime, ru.ru_maxrss, wall)))
"""


def run_child(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log: Path | None = None,
) -> Child:
    """Run ``argv`` to its end (stdout and stderr to ``log``, else discarded); raises
    ``RuntimeError`` with the log's tail when it exits non-zero."""
    fd, figures = tempfile.mkstemp(prefix="bench-child-")
    os.close(fd)
    try:
        with open(log or os.devnull, "ab") as sink:
            subprocess.run(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, figures, *map(str, argv)],
                stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=True,
            )  # fmt: skip
        code, user, system, maxrss, wall = ast.literal_eval(Path(figures).read_text())
    finally:
        os.unlink(figures)
    if code != 0:
        tail = log.read_text(errors="replace")[-2000:] if log else ""
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {code}:\n{tail}")
    return Child(
        cpu_s=user + system,
        user_s=user,
        sys_s=system,
        peak_rss_mb=maxrss / 1024,
        wall_s=wall,
        returncode=code,
    )
