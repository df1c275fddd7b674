"""Code snapshots and resolved job configs: what a submitted job runs is frozen at submission time.

A cluster job may start hours after submission and be requeued days later; by then the checkout has moved
on. ``snapshot_code`` copies the project's code (pipeline/, jobs/, data_prep/, pyproject.toml, slurm/, k8s/)
into the submission folder, and the job runs from there. ``resolve_job_config`` asks the job itself for its
resolved config (its ``--print-config``), so what is written is exactly what the job would have read.
"""

from __future__ import annotations

import contextlib
import importlib
import io as _io
import os
import shutil
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SNAPSHOT_ITEMS = ("pipeline", "jobs", "data_prep", "pyproject.toml", "slurm", "k8s")
"""Paths (relative to the project root) copied into every snapshot (slurm/ and k8s/: the templates and the
kustomize bases the submission was rendered from, which the run's own overlay refers to)."""

_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def project_root() -> Path:
    """The checkout this code runs from (the folder holding pipeline/)."""
    return Path(__file__).resolve().parents[2]


def _tracked_files(root: Path) -> list[str] | None:
    """Files git knows or would add (tracked + untracked-not-ignored), or None without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *SNAPSHOT_ITEMS],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [p for p in out.decode().split("\0") if p]


def _walk_files(root: Path) -> list[str]:
    files = []
    for item in SNAPSHOT_ITEMS:
        path = root / item
        if path.is_file():
            files.append(item)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            for name in filenames:
                if not name.endswith((".pyc", ".pyo")):
                    files.append(str(Path(dirpath, name).relative_to(root)))
    return files


def snapshot_files(root: Path | None = None) -> list[str]:
    """Relative paths that go into a snapshot (git's view when available, else a directory walk)."""
    root = root or project_root()
    files = _tracked_files(root)
    if not files:
        files = _walk_files(root)
    return sorted(f for f in files if (root / f).is_file())


def snapshot_code(dest: Path, root: Path | None = None) -> list[str]:
    """Copy the project's code into ``dest`` (created; must not exist yet). Returns the copied paths."""
    root = root or project_root()
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"snapshot folder {dest} already exists and is not empty")
    files = snapshot_files(root)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in files:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)
    return files


class JobConfigError(ValueError):
    """The job rejected its config (unknown key, bad value, missing file); the message is the job's own."""


def resolve_job_config(module: str, config: str | None, overrides: Sequence[str]) -> str:
    """The job's resolved config as TOML: ``python -m <module> --config FILE <overrides> --print-config``.

    Runs the job's own ``main`` in this process (its argument parsing only; ``--print-config`` exits before
    any work), so presets, defaults and validation are the job's. Raises JobConfigError with its message.
    """
    mod = importlib.import_module(module)
    argv = [*(["--config", config] if config else []), *overrides, "--print-config"]
    out, err = _io.StringIO(), _io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            mod.main(argv)
            code = "returned without printing (does the job use pipeline.cli.parse_config?)"
        except SystemExit as e:
            code = e.code
    if code not in (0, None):
        message = err.getvalue().strip() or str(code)
        raise JobConfigError(f"{module} rejected its config: {message}")
    text = out.getvalue()
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobConfigError(f"{module} --print-config did not print TOML: {e}") from None
    return text


def lookup(config_text: str, dotted: str) -> Any:
    """The value at a dotted key of a TOML text, or None when absent."""
    node: Any = tomllib.loads(config_text)
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
