"""End to end: ``python -m jobs.scaling_report`` on a tiny synthetic-world grid with the real trainer and a real
fine-tuning stage, then again to show that nothing finished is re-run.

    .venv/bin/pytest tests/test_report_e2e.py -q       # ~35 s on an idle 2-core CPU (4 pretraining launches)

Grid: 2 caption sources (web, web+syn) x 2 nested subsets (32, 64 samples), 2 pretraining steps each, then
the depth stage (2 steps) from every export and from random initialisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.data import synthworld as sw
from pipeline.report.toy import ToyDataConfig, write_toy_data

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_scaling_report_runs_the_grid_then_reuses_every_finished_point(tmp_path, monkeypatch, capsys):
    from jobs.scaling_report import main

    monkeypatch.setenv(
        "TORCH_EXTENSIONS_DIR",
        os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions")),
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world = sw.shape_necessary_config()
    data = write_toy_data(
        ToyDataConfig(
            world=world,
            pool_size=64,
            subset_sizes=(32, 64),
            samples_per_shard=32,
            num_syn_captions=2,
            num_eval=8,
        ),
        tmp_path / "data",
    )
    args = [
        f"--root={tmp_path / 'study'}",
        f"--pretrain.shards={data['shards']}",
        f"--pretrain.subsets_dir={data['subsets_dir']}",
        "--grid.subsets=[n32,n64]",
        "--grid.caption_sources=[web,web+syn]",
        '--pretrain.overrides=["--steps=2", "--global_batch=16", "--data.micro_batch=16", "--data.num_workers=0",'
        ' "--engine.zero_stage=0", "--log.interval=1", "--log.progress=false", "--checkpoint.interval=0",'
        f' "--data.group_size=8", "--eval.zero_shot={data["zero_shot"]}"]',
        "--finetune.stages=[depth]",
        "--finetune.base.all.train.steps=2",
        "--finetune.base.all.train.batch_size=4",
        "--finetune.base.all.data.num_train=8",
        "--finetune.base.all.data.num_val=4",
        f"--attention.images={data['zero_shot']}",
        "--attention.num_images=4",
        "--report.reference_model=debug",
    ]
    assert main(args) == 0, capsys.readouterr().out[-4000:]
    out = capsys.readouterr().out
    assert out.count(": complete in") == 4  # 4 pretraining launches, each finished
    report = tmp_path / "study" / "report"
    data_json = json.loads((report / "report.json").read_text())
    pre = [r for r in data_json["points"] if r.get("kind") == "pretrain"]
    assert len(pre) == 4 and all(r["status"] == "complete" and "depth.rmse" in r for r in pre)
    assert {r["subset_size"] for r in pre} == {32, 64}
    assert any(r.get("point") == "random init" and "depth.rmse" in r for r in data_json["points"])
    assert data_json["missing"] == [] and (report / "index.html").is_file()
    assert {c["metric"] for c in data_json["comparisons"]} >= {"depth.rmse"}
    assert set(json.loads((report / "attention.json").read_text())["distance_px"]) == {
        "web",
        "web+syn",
        "random init",
    }

    # again: every point and trial is reused, nothing is launched or trained
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "study" / "pretrain").glob("*/summary.json")}
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[scaling] pretrain " not in out and "fine-tune 1/" not in out and "5 already complete" in out
    assert mtimes == {p: p.stat().st_mtime for p in mtimes}
