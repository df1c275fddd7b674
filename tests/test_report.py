"""Scaling report: collection from run directories, fits with intervals, FLOPs accounting, the HTML report
(opened in a real headless Chromium with its images), and the job's dry run.

    .venv/bin/pytest tests/test_report.py -q        # ~15 s on an idle 2-core CPU (chromium tests skip if absent)

Run directories are fake but realistic: written through ``RunDir`` with the trainer's and the stages' own
config classes, metrics on known curves (see tests/report_fixtures.py), and one real open_clip export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from report_fixtures import DEPTH_GAIN, DEPTH_SLOPE, SEG_GAIN, SEG_SLOPE, SIZES, make_study

from pipeline.orchestrate import pretrain_command
from pipeline.report import collect as col
from pipeline.report.fit import data_multiplier, fit_curve, mean_difference, t_cdf, t_quantile
from pipeline.report.flops import (
    CostConfig,
    check_reference,
    count_forward_flops,
    gpu_hours,
    pretrain_flops,
    recipe_projection,
    step_flops,
)
from pipeline.report.scaling import ScalingConfig, plan_points, resolve_paths


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("study"))


# ------------------------------------------------------------------------------------------- collect


def test_collect_reads_every_run_and_joins_finetuning_to_its_pretraining_point(study):
    runs = col.collect([study.root / "pretrain", study.root / "finetune"])
    assert len(runs["pretrain"]) == 2 * len(SIZES) * 2
    assert len(runs["finetune"]) == 2 * len(SIZES) * 2 * 3 + 2
    by_point = {r["point"]: r for r in runs["pretrain"]}
    row = by_point["debug-web_syn-n4000-s1"]
    assert (row["caption_source"], row["subset_size"], row["seed"], row["status"]) == (
        "web+syn",
        4000,
        1,
        "complete",
    )
    assert row["samples_seen"] == 20 * 64 and row["train_flops"] == 3 * 44_000_000 * 20 * 64
    assert row["zs_top1"] == pytest.approx(0.35)  # the EMA evaluation is preferred
    for ft in runs["finetune"]:
        if ft["backbone_checkpoint"]:
            assert ft["point"] in by_point and Path(ft["backbone_checkpoint"]).is_relative_to(
                ft["pretrain_run"]
            )
        else:
            assert ft["point"] == col.RANDOM_INIT


def test_caption_source_and_subset_size_are_inferred_without_point_labels(tmp_path):
    from report_fixtures import write_pretrain_run, write_uid_list

    uids = write_uid_list(tmp_path / "subsets" / "5pct.txt", 123)
    write_pretrain_run(tmp_path / "runs" / "a", "web", uids, seed=3, with_point=False)
    write_pretrain_run(tmp_path / "runs" / "b", "web+syn", uids, seed=3, with_point=False)
    rows = {r["point"]: r for r in col.collect([tmp_path / "runs"])["pretrain"]}
    assert rows["a"]["caption_source"] == "web" and rows["b"]["caption_source"] == "web+syn"
    assert rows["a"]["subset"] == "5pct" and rows["a"]["subset_size"] == 123 and rows["a"]["seed"] == 3


def test_points_table_keeps_the_best_trial_per_stage_in_the_metrics_direction(study):
    table = col.points_table(col.collect([study.root / "pretrain", study.root / "finetune"]))
    row = next(r for r in table if r["point"] == "debug-web-n1000-s0")
    from report_fixtures import depth_rmse, seg_miou

    assert row["segmentation.mIoU"] == pytest.approx(seg_miou(1000, "web", 0))  # the lr=1e-3 trial, not 1e-2
    assert row["segmentation.lr"] == pytest.approx(1e-3) and row["segmentation.trials"] == 2
    assert row["depth.rmse"] == pytest.approx(depth_rmse(1000, "web", 0))
    baseline = next(r for r in table if r["point"] == col.RANDOM_INIT)
    assert baseline["kind"] == "baseline" and baseline["segmentation.mIoU"] == 25.0


def test_incomplete_runs_are_collected_as_incomplete(tmp_path):
    from pipeline.run_dir import RunDir

    RunDir(tmp_path / "r").write_config(
        {"global_batch": 8, "steps": 5, "loss": {"w_real": 1.0, "w_syn": 0.0}}
    )
    (row,) = col.collect([tmp_path])["pretrain"]
    assert row["status"] == "incomplete" and "train_flops" not in row


def test_tables_round_trip_through_csv_markdown_and_parquet(tmp_path):
    rows = [{"point": "a", "x": 1.5, "n": 3, "ok": True}, {"point": "b|c", "x": None, "n": 4, "ok": False}]
    files = col.write_table(rows, str(tmp_path / "t"), first=["point"])
    assert pq.read_table(files["parquet"]).to_pylist() == [
        {"point": "a", "x": 1.5, "n": 3.0, "ok": True},
        {"point": "b|c", "x": None, "n": 4.0, "ok": False},
    ]
    assert Path(files["csv"]).read_text().splitlines()[0] == "point,x,n,ok"
    assert "b\\|c" in Path(files["md"]).read_text()


# ----------------------------------------------------------------------------------------------- fits


def test_student_t_matches_tabulated_quantiles_and_scipy_free_closed_form():
    # two-sided 95% critical values from any t table
    for dof, q in [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)]:
        assert t_quantile(0.975, dof) == pytest.approx(q, abs=1e-3)
        assert t_cdf(q, dof) == pytest.approx(0.975, abs=1e-4)
        assert t_cdf(-q, dof) == pytest.approx(0.025, abs=1e-4)


def test_loglinear_fit_recovers_the_slope_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    x = np.repeat([1e3, 1e4, 1e5, 1e6], 3)
    y = 0.2 + 0.07 * np.log10(x) + rng.normal(0, 0.01, x.size)
    fit = fit_curve(x, y, "loglinear")
    assert fit.ci["b"][0] < 0.07 < fit.ci["b"][1] and fit.ci["b"][1] - fit.ci["b"][0] < 0.03
    lo, hi = fit.band([1e4])
    assert lo[0] < 0.2 + 0.07 * 4 < hi[0]
    assert fit.dof == 10 and fit.r2 > 0.95


def test_powerlaw_and_gap_fits_recover_exponents():
    x = np.array([1e2, 1e3, 1e4, 1e5])
    assert fit_curve(x, 3.0 * x**-0.25, "powerlaw").params["b"] == pytest.approx(-0.25)
    gap = fit_curve(x, 1.0 - 0.6 * x**-0.3, "powerlaw_gap", ceiling=1.0)
    assert gap.params["a"] == pytest.approx(0.6) and gap.params["b"] == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="y > 0"):
        fit_curve(x, -x, "powerlaw")


def test_two_points_give_a_curve_but_no_interval():
    fit = fit_curve([10, 100], [1.0, 2.0])
    assert fit.params["b"] == pytest.approx(1.0) and math.isnan(fit.ci["b"][0]) and fit.notes
    with pytest.raises(ValueError, match="two distinct"):
        fit_curve([10, 10], [1.0, 2.0])


def test_data_multiplier_of_a_shifted_curve_is_ten_to_the_shift_over_the_slope():
    x = [1e3, 1e4, 1e5]
    ref = fit_curve(x, [1.0 + 0.1 * math.log10(v) for v in x])
    better = fit_curve(x, [1.05 + 0.1 * math.log10(v) for v in x])
    assert data_multiplier(ref, better, 1e4) == pytest.approx(10**0.5)
    d = mean_difference([1.0, 1.2], [2.0, 2.2])
    assert d["diff"] == pytest.approx(1.0) and d["lo"] < 1.0 < d["hi"]


# ---------------------------------------------------------------------------------------------- FLOPs


def test_flops_rules_charge_backward_by_what_gradients_reach():
    assert step_flops(10) == {"forward": 10, "backward": 20, "total": 30}
    assert step_flops(10, frozen_with_grad=4, no_grad=6) == {"forward": 20, "backward": 24, "total": 44}
    summary = {"flops_per_sample": 300.0, "step": 10, "global_batch": 8, "accumulation_steps": 4}
    out = pretrain_flops(summary, {"model": {"grad_checkpointing": True}})
    assert out["model_flops"] == 300 * 80 and out["hardware_flops"] == (300 + 100 + 100) * 80
    cost = CostConfig(peak_flops=1e15, mfu=0.5)
    assert gpu_hours(1.8e18, cost) == pytest.approx(1.0)


def test_counted_vit_b16_flops_match_open_clips_published_profile():
    check = check_reference("ViT-B-16")
    for part in ("image", "text", "total"):
        assert check[f"{part}_rel_error"] < 0.005, check


def test_debug_model_flops_split_into_towers_and_project_a_recipe():
    one = count_forward_flops("debug")
    two = count_forward_flops("debug", num_texts=2)
    assert one["image"] == two["image"] and two["total"] == one["total"] + one["text"] > 0
    recipe = {
        "model": "debug",
        "image_size": 64,
        "context_length": 32,
        "num_texts": 2,
        "global_batch": 8,
        "steps": 5,
    }
    proj = recipe_projection(one, recipe, CostConfig(peak_flops=1e12, mfu=1.0, samples_per_s_per_device=4.0))
    assert proj["model_flops"] == 3 * two["total"] * 40
    assert proj["device_hours_at_throughput"] == pytest.approx(40 / 4 / 3600)


# --------------------------------------------------------------------------------------------- report


def _report_config(study, **grid) -> ScalingConfig:
    cfg = ScalingConfig(name="fake", root=str(study.root))
    cfg = dataclasses.replace(
        cfg,
        grid=dataclasses.replace(
            cfg.grid, subsets=tuple(f"n{s}" for s in SIZES + (64000,)), seeds=(0, 1), **grid
        ),
        pretrain=dataclasses.replace(
            cfg.pretrain, subsets_dir=str(study.root / "shards" / "subsets"), run=False
        ),
        finetune=dataclasses.replace(cfg.finetune, run=False),
        attention=dataclasses.replace(cfg.attention, images=str(study.images), num_images=4),
        report=dataclasses.replace(cfg.report, reference_model="debug"),
    )
    return resolve_paths(cfg)


@pytest.fixture(scope="module")
def report(study):
    from pipeline.orchestrate import run_pretraining
    from pipeline.report.build import build_report

    cfg = _report_config(study)
    points = plan_points(cfg)
    launches = run_pretraining(cfg, points, echo=lambda *a, **k: None)
    return build_report(cfg, points, launches)


def test_report_recovers_the_caption_source_gains_and_lists_the_missing_points(report, study):
    gains = {(c["metric"], c["subset_size"]): c for c in report["comparisons"]}
    for size in SIZES:
        seg = gains[("segmentation.mIoU", float(size))]
        assert seg["gain"] == pytest.approx(SEG_GAIN["web+syn"], abs=0.5) and seg["gain_lo"] > 0
        depth = gains[("depth.rmse", float(size))]  # lower rmse is better: the gain is positive
        assert depth["gain"] == pytest.approx(-DEPTH_GAIN["web+syn"], abs=0.03)
        assert seg["data_multiplier"] == pytest.approx(10 ** (SEG_GAIN["web+syn"] / SEG_SLOPE), rel=0.3)
    fits = {(f["metric"], f["source"]): f for f in report["fits"]}
    assert fits[("segmentation.mIoU", "web")]["b"] == pytest.approx(SEG_SLOPE, abs=0.5)
    assert fits[("depth.rmse", "web")]["b"] == pytest.approx(DEPTH_SLOPE, abs=0.02)
    assert all(v["kind"] == "good" for v in report["verdicts"] if v["metric"] != "zs_top1")
    missing = "\n".join(report["missing"])
    assert "debug-web-n64000-s0" in missing and "debug-web_syn-n64000-s1" in missing
    assert "debug-web-n1000-s0" not in missing
    att = json.loads((study.root / "report" / "attention.json").read_text())
    assert set(att["distance_px"]) == {"web", "web+syn", "random init"}
    assert np.array(att["distance_px"]["web"]).shape == (3, 2)  # debug model: 3 layers x 2 heads


def test_report_files_are_written_and_the_html_links_only_existing_local_files(report, study):
    out = study.root / "report"
    for name in (
        "index.html",
        "report.md",
        "report.json",
        "points.csv",
        "points.parquet",
        "finetune.csv",
        "comparison.csv",
        "fits.csv",
        "plots/scaling_segmentation_mIoU.svg",
    ):
        assert (out / name).is_file(), name
    html = (out / "index.html").read_text()
    import re

    srcs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert len([s for s in srcs if s.endswith(".png")]) >= 5
    for src in srcs:
        assert "://" not in src and not src.startswith("/"), src
        assert (out / src).is_file(), src
    assert "What is missing" in html and "debug-web-n64000-s0" in html
    data = json.loads((out / "report.json").read_text())
    assert data["flops"]["total_pretrain_flops"] == pytest.approx(12 * 3 * 44_000_000 * 20 * 64)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_html_opens_in_headless_chromium_with_every_image_loaded(report, study):
    html_path = study.root / "report" / "index.html"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                html_path.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    dom = result.stdout
    assert "<body" in dom, result.stderr[-2000:]
    import re

    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load handler did not run"
    ok, total = int(loaded.group(1)), int(loaded.group(2))
    assert total >= 5 and ok == total, f"{ok} of {total} images loaded"
    assert 'data-loaded="0"' not in dom and 'class="broken-image"' not in dom


def test_a_broken_image_link_is_detected_by_the_browser_check(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    from pipeline.report import html as H

    page = H.write_page(tmp_path / "p.html", "t", [H.Section("s", H.figure_html("nothing.png", "gone"))])
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    assert 'data-images="0/1"' in dom and 'data-loaded="0"' in dom
    assert '<div class="broken-image">image did not load: nothing.png</div>' in dom


# ------------------------------------------------------------------------------------------------ job


def test_scaling_job_dry_run_lists_every_point_with_its_pretrain_command(tmp_path, capsys):
    from jobs.scaling_report import main

    subsets = tmp_path / "shards" / "subsets"
    for name, n in (("1pct", 10), ("10pct", 100)):
        subsets.mkdir(parents=True, exist_ok=True)
        (subsets / f"{name}.txt").write_text("".join(f"u{i}\n" for i in range(n)))
    code = main(
        [
            f"--root={tmp_path / 'study'}",
            f"--pretrain.shards={tmp_path / 'shards'}/{{00000..00001}}.tar",
            "--grid.subsets=[1pct,10pct]",
            "--grid.caption_sources=[web,web+syn]",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("pending") == 4 and "debug-web_syn-10pct-s0" in out and "(subset size 100)" in out
    assert "--loss.w_syn=0.0" in out and f"--data.subset_uids={subsets / '10pct.txt'}" in out


def test_unknown_caption_source_is_a_config_error_naming_the_key(tmp_path, capsys):
    from jobs.scaling_report import main

    with pytest.raises(SystemExit) as e:
        main([f"--root={tmp_path}", "--grid.caption_sources=[web,coca]", "--dry-run"])
    assert e.value.code == 2 and "grid.caption_sources" in capsys.readouterr().err


def test_pretrain_command_layers_overrides_in_order():
    cfg = ScalingConfig(
        pretrain=dataclasses.replace(
            ScalingConfig().pretrain,
            overrides=("--steps=7",),
            model_overrides={"debug": ["--steps=9"]},
            sources={"coca": {"w_real": 1.0, "w_syn": 0.5, "overrides": ["--data.syn_sampling=first"]}},
        ),
        grid=dataclasses.replace(ScalingConfig().grid, caption_sources=("coca",)),
    )
    (point,) = plan_points(cfg)
    cmd = pretrain_command(cfg, point)
    assert cmd.index("--steps=7") < cmd.index("--steps=9") < cmd.index("--loss.w_syn=0.5")
    assert "--data.syn_sampling=first" in cmd and cmd[-1].startswith("--model.seed") or "--data.seed=0" in cmd


def test_a_point_with_a_materialised_subset_pretrains_on_its_own_shards_without_a_uid_filter():
    cfg = ScalingConfig(
        pretrain=dataclasses.replace(ScalingConfig().pretrain, shards="/data/full/{0..9}.tar")
    )
    point = plan_points(cfg)[0]
    filtered = pretrain_command(cfg, dataclasses.replace(point, subset_uids="/data/full/subsets/n100.txt"))
    own = pretrain_command(
        cfg,
        dataclasses.replace(point, subset_uids="/data/full/subsets/n100.txt", shards="/s/n100/{0..1}.tar"),
    )
    assert (
        "--data.shards=/data/full/{0..9}.tar" in filtered
        and "--data.subset_uids=/data/full/subsets/n100.txt" in filtered
    )
    assert "--data.shards=/s/n100/{0..1}.tar" in own
    assert not any(a.startswith("--data.subset_uids") or "/data/full" in a for a in own)


def test_report_only_mode_reports_on_runs_made_elsewhere_without_a_grid(study, tmp_path, capsys):
    from jobs.scaling_report import main

    points = tmp_path / "points.json"
    run = study.pretrain[("web", SIZES[0], 0)]
    points.write_text(
        json.dumps({"p": {"label": "p", "source": str(run), "checkpoint": "", "pretrain_summary": {}}})
    )
    code = main(
        [
            "--report-only",
            "--no-grid",
            f"--root={tmp_path / 'dag'}",
            f"--points-json={points}",
            f"--collect=[{study.root / 'finetune'}]",
            "--report.reference_model=",
        ]
    )
    assert code == 0, capsys.readouterr().out
    data = json.loads((tmp_path / "dag" / "report" / "report.json").read_text())
    pre = [r for r in data["points"] if r.get("kind") == "pretrain"]
    assert [r["run_dir"] for r in pre] == [str(run)] and "segmentation.mIoU" in pre[0]
    assert data["missing"] == [] and data["planned_points"] == []


def test_report_on_one_run_without_subsets_says_there_is_no_axis_to_plot(study, tmp_path, capsys):
    from report_fixtures import write_pretrain_run

    from jobs.scaling_report import main

    run = write_pretrain_run(tmp_path / "one_run", "web+syn", None, seed=0, with_point=False).path
    points = tmp_path / "points.json"
    points.write_text(
        json.dumps({"p": {"label": "p", "source": str(run), "checkpoint": "", "pretrain_summary": {}}})
    )
    code = main(
        [
            "--report-only",
            "--no-grid",
            f"--root={tmp_path / 'dag'}",
            f"--points-json={points}",
            "--collect=[]",
            "--report.reference_model=",
        ]
    )
    assert code == 0, capsys.readouterr().out
    out = tmp_path / "dag" / "report"
    html, markdown = (out / "index.html").read_text(), (out / "report.md").read_text()
    for text in (html, markdown):
        assert "no data axis to plot against" in text and "No metric has" not in text
    assert "zs_top1" in html  # the results table beside it has the run's metrics


def test_a_data_multiplier_range_of_one_value_prints_one_value():
    from pipeline.report.build import verdict_lines

    row = {
        "metric": "m",
        "model": "debug",
        "source": "web+syn",
        "reference": "web",
        "gain": 1.0,
        "gain_lo": math.nan,
        "gain_hi": math.nan,
    }
    one = verdict_lines([dict(row, data_multiplier=4.6912), dict(row, data_multiplier=4.6901)], 0.95)
    two = verdict_lines([dict(row, data_multiplier=2.0), dict(row, data_multiplier=4.69)], 0.95)
    assert one[0]["text"].endswith("data multiplier 4.69x")
    assert two[0]["text"].endswith("data multiplier 2-4.69x")


# ------------------------------------------------------------------------------------ toy reproduction


def test_toy_data_has_nested_whole_group_subsets_and_both_caption_kinds(tmp_path):
    import tarfile

    from pipeline.data import synthworld as sw
    from pipeline.report.toy import ToyDataConfig, write_toy_data

    cfg = ToyDataConfig(
        pool_size=24, subset_sizes=(8, 24), samples_per_shard=16, num_syn_captions=2, num_eval=4
    )
    data = write_toy_data(cfg, tmp_path / "data")
    small = Path(data["subsets"]["n8"]["uids"]).read_text().split()
    large = Path(data["subsets"]["n24"]["uids"]).read_text().split()
    assert large[: len(small)] == small and len(set(large)) == 24
    groups = {sw.make_scene(cfg.world, int(u.rsplit("-", 1)[1]), "train").group for u in small}
    assert len(groups) == 1  # 8 = one whole hard-negative group
    with tarfile.open(tmp_path / "data" / "shards" / "00000.tar") as tar:
        names = tar.getnames()
        first = small[0]
        syn = json.loads(tar.extractfile(f"{first}.syn.json").read())["syn_text"]
        txt = tar.extractfile(f"{first}.txt").read().decode()
    assert len(names) == 16 * 4 and len(syn) == 2 and txt not in syn
    assert json.loads((tmp_path / "data" / "shards" / "sizes.json").read_text()) == {
        "00000.tar": 16,
        "00001.tar": 8,
    }
    assert sum(1 for _ in (tmp_path / "data" / "zero_shot").rglob("*.png")) == 4
    assert (
        write_toy_data(cfg, tmp_path / "data")["fingerprint"] == data["fingerprint"]
    )  # reused, not rewritten
    with pytest.raises(ValueError, match="group_size"):
        ToyDataConfig(subset_sizes=(12,))


def _comparison(metric, size, ref, src, higher=True):
    sign = 1 if higher else -1
    return {
        "metric": metric,
        "model": "debug",
        "source": "web+syn",
        "reference": "web",
        "subset_size": float(size),
        "reference_mean": ref,
        "source_mean": src,
        "gain": sign * (src - ref),
        "gain_lo": math.nan,
        "gain_hi": math.nan,
        "data_multiplier": math.nan,
    }


def test_toy_verdict_reads_transfer_and_data_efficiency_from_the_measured_means():
    from pipeline.report.toy import toy_verdict

    study = ScalingConfig()
    figures = [{"metric": "segmentation.mIoU", "higher": True}, {"metric": "depth.rmse", "higher": False}]
    comparisons = [  # seg: better everywhere, syn@512 beats web@2048; depth: worse everywhere
        _comparison("segmentation.mIoU", 512, 40.0, 43.0),
        _comparison("segmentation.mIoU", 2048, 42.0, 44.0),
        _comparison("depth.rmse", 512, 1.0, 1.1, higher=False),
        _comparison("depth.rmse", 2048, 0.9, 0.95, higher=False),
    ]
    report = {"metrics": ["segmentation.mIoU", "depth.rmse"], "comparisons": comparisons, "figures": figures}
    v = toy_verdict(report, study)
    assert v["per_metric"]["segmentation.mIoU"]["transfer"] == "yes"
    assert v["per_metric"]["segmentation.mIoU"]["data_efficiency"] == "yes"
    assert (
        v["per_metric"]["depth.rmse"]["transfer"] == "no"
        and v["per_metric"]["depth.rmse"]["data_efficiency"] == "no"
    )
    assert v["transfer"] == "mixed (yes on 1, no on 1 of 2 readouts)"
    assert "4x the data" in " ".join(v["lines"])
    flat = [
        _comparison("segmentation.mIoU", 512, 40.0, 41.0),
        _comparison("segmentation.mIoU", 2048, 39.0, 40.0),
    ]
    v = toy_verdict({"metrics": ["segmentation.mIoU"], "comparisons": flat, "figures": figures}, study)
    assert v["transfer"] == "yes" and v["data_efficiency"] == "undetermined"


def test_local_trials_run_in_parallel_worker_processes_and_are_not_rerun(study, tmp_path):
    from pipeline.orchestrate import run_finetuning
    from pipeline.report.scaling import FinetuneGridConfig, Point

    cfg = ScalingConfig(
        root=str(tmp_path / "s"), finetune=FinetuneGridConfig(stages=("sweep_toy_stage",), parallel=2)
    )
    points = [
        Point(
            f"p{seed}", "debug", "web", "n1000", "", 1000, seed, str(study.pretrain[("web", SIZES[0], seed)])
        )
        for seed in (0, 1)
    ]
    lines: list[str] = []
    info = run_finetuning(cfg, points, echo=lambda line, **_: lines.append(line))
    assert info["errors"] == {} and info["trials"] == 3  # two points + random init
    assert all(r["status"] == "complete" for r in info["rows"]), info["rows"]
    assert any("2 at a time" in line for line in lines)
    again = run_finetuning(cfg, points, echo=lambda line, **_: lines.append(line))
    assert again["errors"] == {} and "3 trials, 3 already complete" in lines[-1]


def test_frozen_encoder_trials_are_a_separate_stage_from_full_fine_tuning(tmp_path):
    from report_fixtures import write_finetune_run, write_pretrain_run, write_uid_list

    uids = write_uid_list(tmp_path / "subsets" / "n8.txt", 8)
    run = write_pretrain_run(tmp_path / "pretrain" / "p", "web", uids, seed=0)
    ckpt = str(run.path / "export" / "ema")
    write_finetune_run(tmp_path / "ft" / "full", "segmentation", ckpt, 40.0)
    write_finetune_run(tmp_path / "ft" / "frozen", "segmentation", ckpt, 30.0, frozen=True)
    (row,) = [r for r in col.points_table(col.collect([tmp_path])) if r["point"] == "p"]
    assert row["segmentation.mIoU"] == 40.0 and row["segmentation-frozen.mIoU"] == 30.0
    assert row["segmentation.trials"] == row["segmentation-frozen.trials"] == 1


def test_toy_verdict_says_when_a_readout_does_not_beat_random_initialisation():
    from pipeline.report.toy import toy_verdict

    comparisons = [
        _comparison("segmentation.mIoU", 512, 40.0, 41.0),
        _comparison("segmentation.mIoU", 2048, 41.0, 42.0),
    ]
    points = [{"point": "random init", "kind": "baseline", "segmentation.mIoU": 45.0}] + [
        {"point": f"p{i}", "kind": "pretrain", "segmentation.mIoU": v}
        for i, v in enumerate((40.0, 41.0, 41.0, 42.0))
    ]
    report = {
        "metrics": ["segmentation.mIoU"],
        "comparisons": comparisons,
        "points": points,
        "figures": [{"metric": "segmentation.mIoU", "higher": True}],
    }
    v = toy_verdict(report, ScalingConfig())
    assert v["per_metric"]["segmentation.mIoU"]["beats_random_init"] is False
    assert any(line.startswith("Sensitivity, segmentation.mIoU") for line in v["lines"])


def test_the_shipped_toy_config_loads_and_its_pretraining_overrides_are_trainer_keys():
    from pipeline.config import load_config
    from pipeline.report.toy import ReproduceConfig
    from pipeline.train.trainer import TrainConfig

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(ReproduceConfig, root / "jobs" / "configs" / "reproduce" / "toy.toml")
    assert max(cfg.data.subset_sizes) <= cfg.data.pool_size
    assert list(cfg.study.grid.caption_sources) == ["web", "web+syn"]
    overrides = list(cfg.study.pretrain.overrides)
    train = load_config(TrainConfig, root / cfg.study.pretrain.config, overrides)  # a mistyped key raises
    assert f"--steps={train.steps}" in overrides and f"--global_batch={train.global_batch}" in overrides


def test_toy_verdict_calls_a_gain_whose_intervals_all_include_zero_not_significant():
    from pipeline.report.toy import toy_verdict

    def with_ci(size, ref, src, lo, hi):
        return {**_comparison("segmentation.mIoU", size, ref, src), "gain_lo": lo, "gain_hi": hi}

    figures = [{"metric": "segmentation.mIoU", "higher": True}]
    wide = [with_ci(512, 40.0, 40.2, -0.5, 0.9), with_ci(2048, 41.0, 41.1, -1.0, 1.2)]
    v = toy_verdict(
        {"metrics": ["segmentation.mIoU"], "comparisons": wide, "figures": figures}, ScalingConfig()
    )
    assert v["transfer"] == "not significant"
    assert "every interval includes zero" in v["lines"][0] and "95% CI -0.5 to +0.9" in v["lines"][0]
    tight = [with_ci(512, 40.0, 41.0, 0.4, 1.6), with_ci(2048, 41.0, 41.1, -1.0, 1.2)]
    v = toy_verdict(
        {"metrics": ["segmentation.mIoU"], "comparisons": tight, "figures": figures}, ScalingConfig()
    )
    assert v["transfer"] == "yes"
