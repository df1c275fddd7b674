"""The run directory is the record of a run (see docs/run-directory.md).

<run>/config.toml        resolved config, written before the first step
<run>/metrics.jsonl      one JSON object per logged step: {"step": N, "time": t, ...}
<run>/summary.json       final metrics, written atomically at the end
<run>/checkpoints/<step>/ and checkpoints/latest (a text file naming the newest complete step)
<run>/logs/              per-rank text logs; tensorboard/ when enabled
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import io
from pipeline.config import to_toml


class RunDir:
    def __init__(self, path: str | os.PathLike[str], rank: int = 0) -> None:
        self.path = Path(path)
        self.rank = rank
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "logs").mkdir(exist_ok=True)
        self._tb = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, cfg: Any) -> None:
        if self.rank == 0:
            io.write_text(str(self.config_path), to_toml(cfg))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append one line to metrics.jsonl (rank 0) and mirror scalars to TensorBoard when enabled."""
        if self.rank != 0:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def truncate_metrics_after(self, step: int) -> None:
        """Drop metric rows past ``step`` (a resumed run rewrites them), atomically."""
        if self.rank != 0 or not self.metrics_path.exists():
            return
        rows = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
        io.write_text(str(self.metrics_path), "".join(r + "\n" for r in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.rank == 0:
            io.write_json(str(self.summary_path), summary)

    def read_summary(self) -> dict[str, Any] | None:
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else None

    def enable_tensorboard(self) -> None:
        if self.rank == 0 and self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tensorboard"))

    def logger(self, name: str = "pipeline") -> logging.Logger:
        """A logger writing to logs/rank<N>.log (and stderr on rank 0)."""
        log = logging.getLogger(f"{name}.rank{self.rank}")
        if not log.handlers:
            log.setLevel(logging.INFO)
            fmt = logging.Formatter("%(asctime)s %(levelname)s " + f"[rank {self.rank}] " + "%(message)s")
            fh = logging.FileHandler(self.path / "logs" / f"rank{self.rank}.log")
            fh.setFormatter(fmt)
            log.addHandler(fh)
            if self.rank == 0:
                sh = logging.StreamHandler(sys.stderr)
                sh.setFormatter(fmt)
                log.addHandler(sh)
            log.propagate = False
        return log

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
