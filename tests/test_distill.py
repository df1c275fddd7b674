"""FD-CLIP feature distillation (``python -m jobs.distill``): runs, counts FLOPs, resumes exactly after SIGKILL,
and its student loads in a fine-tuning stage and (the APE variant) in plain open_clip."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from pipeline.data.loader import LoaderConfig
from pipeline.distill.fdclip import (
    LossConfig,
    StudentConfig,
    TeacherConfig,
    build_student,
    build_teacher,
    feature_loss,
    open_clip_state_dict,
)
from pipeline.distill.trainer import DistillConfig, DistillDataConfig, DistillTrainConfig, run_distill
from pipeline.finetune.common import FinetuneTrainConfig
from pipeline.finetune.datasets import DataConfig
from pipeline.finetune.segmentation import SegmentationConfig, run_stage
from pipeline.model.backbone import BackboneConfig, BiasedSelfAttention, build_backbone
from pipeline.train.checkpoint import latest_step
from pipeline.train.export import load_export
from pipeline.train.state import Preempted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent


def tiny(position: str, teacher: str = "", steps: int = 4, **train: int) -> DistillConfig:
    return DistillConfig(
        teacher=TeacherConfig(checkpoint=teacher),
        student=StudentConfig(position=position),
        data=DistillDataConfig(num_scenes=8),
        train=DistillTrainConfig(steps=steps, batch_size=4, micro_batch=2, log_every=1, threads=1, **train),
    )


@pytest.fixture(scope="module")
def shared_rpb_run(tmp_path_factory, debug_checkpoint) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("distill") / "shared_rpb"
    summary = run_distill(tiny("shared_rpb", teacher=debug_checkpoint), run, log=lambda s: None)
    return run, summary


def test_distill_runs_on_the_synthetic_world_and_counts_teacher_forward_and_student_forward_backward(
    shared_rpb_run, debug_checkpoint
):
    run, summary = shared_rpb_run
    assert summary["status"] == "complete" and summary["steps"] == 4
    losses = [r["loss"] for r in summary["history"]]
    assert len(losses) == 4 and all(0 < v < float("inf") for v in losses)
    flops = json.loads((run / "flops.json").read_text())
    assert flops["teacher_forward_per_sample"] > 0 and flops["teacher_backward_per_sample"] == 0
    assert flops["student_backward_per_sample"] == 2 * flops["student_forward_per_sample"]
    assert (
        flops["per_sample"] == flops["teacher_forward_per_sample"] + 3 * flops["student_forward_per_sample"]
    )
    assert flops["total"] == flops["per_sample"] * 4 * 4
    # the export is a whole CLIP: the teacher's text tower, the student's image tower (with its shared bias)
    weights = torch.load(run / "export" / "open_clip_pytorch_model.bin", weights_only=True)
    teacher = torch.load(debug_checkpoint, weights_only=True)
    for key, value in teacher.items():
        if not key.startswith("visual."):
            assert torch.equal(weights[key].reshape(value.shape), value), key
    assert not torch.equal(weights["visual.conv1.weight"], teacher["visual.conv1.weight"])
    assert "visual.rel_pos_bias.embedding" in weights
    assert not weights["visual.positional_embedding"].any()  # position comes from the bias alone
    assert json.loads((run / "export" / "export.json").read_text())["student_position"] == "shared_rpb"


def test_whitened_token_loss_is_zero_for_the_whitened_target_and_positive_otherwise():
    target = torch.nn.functional.layer_norm(torch.randn(2, 5, 8) * 3 + 1, (8,))
    assert torch.allclose(target.mean(-1), torch.zeros(2, 5), atol=1e-5)
    for kind in ("smooth_l1", "mse"):
        assert feature_loss(target, target, LossConfig(kind=kind)) == 0
        assert feature_loss(target + 0.1, target, LossConfig(kind=kind)) > 0


def test_student_is_the_teachers_architecture_with_fresh_weights_and_the_chosen_position_encoding():
    teacher, model_cfg = build_teacher(TeacherConfig())
    for position, shared in (("shared_rpb", True), ("rpb", False)):
        student = build_student(teacher, model_cfg, StudentConfig(position=position))
        assert all(isinstance(b.attn, BiasedSelfAttention) for b in student.visual.transformer.resblocks)
        assert hasattr(student.visual, "rel_pos_bias") == shared
        assert not student.visual.positional_embedding.requires_grad
        assert not any(p.requires_grad for p in student.transformer.parameters())  # text tower: the teacher's
    student = build_student(teacher, model_cfg, StudentConfig(position="ape"))
    assert student.visual.positional_embedding.requires_grad
    assert student.visual.state_dict().keys() == teacher.visual.state_dict().keys()
    assert not torch.equal(student.visual.conv1.weight, teacher.visual.conv1.weight)


def test_killed_distill_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    steps, every = 40, 5
    reference = run_distill(tiny("rpb", steps=steps), tmp_path / "reference", log=lambda s: None)
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "jobs.distill",
        "--preset=debug",
        "--student.position=rpb",
        "--data.num_scenes=8",
        f"--train.steps={steps}",
        "--train.batch_size=4",
        "--train.micro_batch=2",
        "--train.log_every=1",
        "--train.threads=1",
        f"--train.checkpoint_every={every}",
        f"--run_dir={run}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (latest_step(run / "checkpoints") or 0) < every and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(run / "checkpoints")
    assert killed_at is not None and every <= killed_at < steps
    logged: list[str] = []  # the rerun: the same config, in this process
    run_distill(tiny("rpb", steps=steps, checkpoint_every=every), run, log=logged.append)
    assert (
        f"distill: resumed from {run / 'checkpoints' / str(killed_at) / 'state.pt'} at step {killed_at}"
        in logged
    )
    ref = torch.load(tmp_path / "reference" / "export" / "visual.pt", weights_only=True)
    got = torch.load(run / "export" / "visual.pt", weights_only=True)
    assert ref.keys() == got.keys() and "transformer.resblocks.0.attn.rel_pos_bias.embedding" in got
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    curves = [
        [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
        for d in (tmp_path / "reference", run)
    ]
    assert curves[1] == curves[0] and len(curves[0]) == steps and reference["steps"] == steps


def test_distilled_student_fine_tunes_in_the_segmentation_stage(shared_rpb_run, tmp_path):
    run, _ = shared_rpb_run
    backbone = build_backbone(BackboneConfig(checkpoint=str(run / "export")))
    student = torch.load(run / "export" / "visual.pt", weights_only=True)
    assert torch.equal(backbone.visual.rel_pos_bias.embedding, student["rel_pos_bias.embedding"])
    cfg = SegmentationConfig(
        backbone=BackboneConfig(checkpoint=str(run / "export")),
        data=DataConfig(num_train=4, num_val=2),
        train=FinetuneTrainConfig(steps=2, batch_size=2, eval_batch_size=2, log_every=1),
    )
    summary = run_stage(cfg, tmp_path / "seg")
    assert summary["steps"] == 2 and 0.0 <= summary["metrics"]["mIoU"] <= 100.0  # percent


def test_ape_student_loads_in_plain_open_clip_and_relative_position_students_refuse_naming_the_option(
    shared_rpb_run, tmp_path
):
    teacher = shared_rpb_run[0] / "export"  # a project export as teacher (itself a relative-position student)
    summary = run_distill(tiny("ape", teacher=str(teacher), steps=1), tmp_path / "ape", log=lambda s: None)
    export = Path(summary["exports"]["final"])
    model = open_clip.create_model("debug")
    model.load_state_dict(open_clip_state_dict(export), strict=True)
    image = torch.randn(1, 3, 64, 64)
    loaded, _ = load_export(export)  # the project's loader through stock open_clip, too
    assert torch.allclose(loaded.encode_image(image), model.encode_image(image))
    teacher_text = torch.load(teacher / "open_clip_pytorch_model.bin", weights_only=True)["text_projection"]
    assert torch.equal(model.text_projection, teacher_text)
    with pytest.raises(ValueError, match="student.position = 'shared_rpb'"):
        open_clip_state_dict(teacher)


def test_distill_on_webdataset_shards_resumes_at_the_loader_position(tmp_path):
    from trainer_fixtures import EASY_WORLD, write_shards

    shards = write_shards(tmp_path / "shards", EASY_WORLD, "train", num_shards=1, per_shard=24)

    def cfg(**train: int) -> DistillConfig:
        base = tiny("shared_rpb", steps=5, **train)
        loader = LoaderConfig(shards=shards, num_workers=0, shuffle_buffer=8, augment=True)
        return dataclasses.replace(base, data=DistillDataConfig(source="shards", loader=loader))

    reference = run_distill(cfg(), tmp_path / "reference", log=lambda s: None)
    with pytest.raises(Preempted):
        run_distill(cfg(stop_after_step=2), tmp_path / "run", log=lambda s: None)
    resumed = run_distill(cfg(), tmp_path / "run", log=lambda s: None)
    assert resumed["history"] == reference["history"] and len(reference["history"]) == 5
    ref = torch.load(tmp_path / "reference" / "export" / "visual.pt", weights_only=True)
    got = torch.load(tmp_path / "run" / "export" / "visual.pt", weights_only=True)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_distill_on_two_processes_matches_the_one_process_loss_curve(tmp_path, debug_checkpoint):
    """The global batch split over 2 gloo processes gives the 1-process curve, within the 1-process run's own
    fp32 sensitivity (a teacher moved by one rounding step; tests/test_finetune_distributed.py's bound)."""
    from test_finetune_distributed import STEPS, assert_same_curve, loss_curve, perturbed_checkpoint

    from pipeline.config import to_toml
    from tests.ports import free_port

    def cfg(teacher: str) -> DistillConfig:
        base = tiny("shared_rpb", teacher=teacher, steps=STEPS)
        return dataclasses.replace(base, student=StudentConfig(drop_path_rate=0.0))  # no per-rank draws

    config = tmp_path / "two.toml"
    config.write_text(to_toml(cfg(debug_checkpoint)))
    port, procs = free_port(), []
    for rank in range(2):
        env = {
            **os.environ,
            **{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
        }
        cmd = [sys.executable, "-m", "jobs.distill", f"--config={config}", f"--run_dir={tmp_path / 'two'}"]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    run_distill(cfg(debug_checkpoint), tmp_path / "one", log=lambda s: None)
    run_distill(
        cfg(perturbed_checkpoint(debug_checkpoint, tmp_path / "p.pt")), tmp_path / "p", log=lambda s: None
    )
    for proc in procs:
        out = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    one, two, perturbed = (loss_curve(tmp_path / d) for d in ("one", "two", "p"))
    assert_same_curve(two, one, perturbed)
