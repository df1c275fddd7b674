"""The one table of jobs: name -> entry point, one-line description, docs page and cluster shape.

``clipp --help``, ``python -m jobs.submit --job`` (the jobs with a cluster shape) and the README's jobs
table are all read from :data:`JOBS`; tests/test_foundation.py checks that they agree. To add a job, add a
row here. ``python -m jobs.registry`` prints the README table (paste it between the markers there).

The library (``pipeline.cluster``) defines :class:`~pipeline.cluster.config.JobSpec` but never imports this
table: ``jobs.submit`` passes it in, so ``pipeline/`` keeps no knowledge of what the jobs are.
"""

from __future__ import annotations

import importlib.util

from pipeline.cluster.config import JobSpec

JOBS: dict[str, JobSpec] = {
    "quickstart": JobSpec(
        module="jobs.quickstart",
        doc="the whole pipeline on the embedded default, end to end",
        docs="data-loading.md",
    ),
    "synthworld": JobSpec(
        module="data_prep.synthworld",
        doc="synthetic image-text world (masks, boxes, depth) in DataComp / COCO / ADE20K / NYUv2 / ImageNet layouts",
        docs="synthworld.md",
    ),
    "shard": JobSpec(
        module="data_prep.shard",
        doc="DataComp / DataCompDR-style pairs -> WebDataset tars (local, Ray or SLURM array; local or s3://)",
        docs="data-prep.md",
        slurm_kind="array",
        k8s_base="shard",
    ),
    "caption": JobSpec(
        module="data_prep.caption",
        doc="synthetic captions (CoCa / HF image-to-text) for shards",
        docs="captioning.md",
        slurm_kind="array",
        k8s_base="caption",
        gpus_per_array_task=1,
    ),
    "train_coca": JobSpec(
        module="data_prep.train_coca",
        doc="train a small CoCa captioner (e.g. on the synthetic world)",
        docs="captioning.md",
    ),
    "pretrain": JobSpec(
        module="jobs.pretrain",
        doc="DeepSpeed ZeRO CLIP pretraining: exact large batch (tiled loss + gradient caching), EMA, resume",
        docs="training.md",
        slurm_kind="distributed",
        k8s_base="pretrain",
        run_dir_keys=("run_dir",),
        loader_workers_key="data.num_workers",
        ray_ok=False,
    ),
    "finetune": JobSpec(
        module="jobs.finetune",
        doc="one fine-tuning stage: classification, detection, segmentation, depth, region alignment, DenseCLIP",
        docs="finetune.md",
    ),
    "prune": JobSpec(
        module="jobs.prune",
        doc="subnetwork search: iterative magnitude pruning of the image encoder with distillation only",
        docs="finetune.md",
    ),
    "distill": JobSpec(
        module="jobs.distill",
        doc="FD-CLIP feature distillation: a fresh image tower regresses a CLIP's whitened tokens (resumable)",
        docs="distill.md",
    ),
    "sweep": JobSpec(
        module="jobs.finetune_sweep",
        doc="Ray Tune sweeps over fine-tuning stages",
        docs="sweeps.md",
        slurm_kind="ray",
        k8s_base="sweep",
    ),
    "pipeline": JobSpec(
        module="jobs.pipeline",
        doc="pretrain -> fine-tune sweeps -> report DAG",
        docs="sweeps.md",
    ),
    "scaling_report": JobSpec(
        module="jobs.scaling_report",
        doc="scaling-curve report over pretraining runs",
        docs="reports.md",
    ),
    "reproduce": JobSpec(
        module="jobs.reproduce",
        doc="toy reproduction of the caption-quality claim",
        docs="reports.md",
    ),
    "smoke": JobSpec(
        module="jobs.smoke",
        doc="tiny distributed job (ranks, all-reduce, preemption) to check a new cluster",
        docs="cluster-jobs.md",
        slurm_kind="distributed",
        k8s_base="pretrain",
        run_dir_keys=("run_dir",),
    ),
    "submit": JobSpec(
        module="jobs.submit",
        doc="submit a job to SLURM, Kubernetes or Ray",
        docs="cluster-jobs.md",
    ),
}
"""Every job, in the order ``clipp --help`` lists them. The name is what ``clipp <name>`` and
``python -m jobs.submit --job <name>`` take."""


def submittable() -> dict[str, JobSpec]:
    """The jobs ``python -m jobs.submit`` can send to SLURM, Kubernetes or Ray."""
    return {name: spec for name, spec in JOBS.items() if spec.submittable}


def available() -> dict[str, JobSpec]:
    """The jobs whose module is importable here (an install may leave out a package, e.g. data_prep)."""
    out = {}
    for name, spec in JOBS.items():
        try:
            found = importlib.util.find_spec(spec.module) is not None
        except ModuleNotFoundError:  # the job's package is not there at all
            found = False
        if found:
            out[name] = spec
    return out


def markdown_table() -> str:
    """The README's jobs table: one row per job, from :data:`JOBS`."""
    lines = ["| job | what | command | docs |", "|---|---|---|---|"]
    for name, spec in JOBS.items():
        docs = f"[{spec.docs.removesuffix('.md')}](docs/{spec.docs})" if spec.docs else ""
        lines.append(f"| `{name}` | {spec.doc} | `python -m {spec.module}` | {docs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
