"""Kubernetes: a per-run kustomize overlay on top of k8s/overlays/<overlay>/<base>, built and applied by kubectl.

The submission folder holds a copy of k8s/ (the code snapshot) and ``kustomize/`` with the run's overlay:

    resources:  ../k8s/overlays/<overlay>/<base>
    nameSuffix: -<run>                        # every object of the run is distinct
    configMapGenerator: clip-job-config       # replaced by the job's resolved config (job.toml)
                        clip-job-env          # merged: launch env (NCCL, OMP), module, task counts
    images / patches                          # image, replicas, GPUs, CPU and memory from the launch config

so ``kubectl apply -k <submission>/kustomize`` starts exactly what was recorded. JSON6902 patches are used
throughout: strategic merge does not know the custom kinds and would replace their container lists whole.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster.config import JobSpec, LaunchConfig

OVERLAY_DIR = "kustomize"
"""Folder of the run's overlay inside the submission folder (beside the snapshot's k8s/)."""

Ops = list[dict[str, Any]]


def _replace(path: str, value: Any) -> dict[str, Any]:
    return {"op": "replace", "path": path, "value": value}


@dataclass(frozen=True)
class Workload:
    """Where one base's knobs live inside its object."""

    kind: str
    compute_templates: tuple[str, ...]
    """JSON pointers of the pod templates that do the work (they get the GPUs, CPU and memory)."""
    replicas: Callable[[int], Ops]
    """Patch ops setting the number of pods (or parallel tasks) to n."""
    count_env: str = ""
    """clip-job-env key that must mirror the replica count (NUM_TASKS, NNODES)."""
    gpus: Callable[[int], Ops] = lambda g: []
    """Extra ops when GPUs per pod change (e.g. processes per node)."""
    gpu_env: str = ""
    """clip-job-env key that must mirror GPUs per pod (processes per node)."""


def _pytorchjob_replicas(n: int) -> Ops:
    if n == 1:
        return [{"op": "remove", "path": "/spec/pytorchReplicaSpecs/Worker"}]
    return [_replace("/spec/pytorchReplicaSpecs/Worker/replicas", n - 1)]


_RAY_WORKERS = "/spec/rayClusterSpec/workerGroupSpecs/0"

WORKLOADS: dict[str, Workload] = {
    "shard": Workload(
        "Job",
        ("/spec/template",),
        lambda n: [_replace("/spec/completions", n), _replace("/spec/parallelism", n)],
        count_env="NUM_TASKS",
    ),
    "pretrain": Workload(
        "PyTorchJob",
        ("/spec/pytorchReplicaSpecs/Master/template", "/spec/pytorchReplicaSpecs/Worker/template"),
        _pytorchjob_replicas,
        gpus=lambda g: [_replace("/spec/nprocPerNode", str(max(g, 1)))],
    ),
    "pretrain-jobset": Workload(
        "JobSet",
        ("/spec/replicatedJobs/0/template/spec/template",),
        lambda n: [
            _replace("/spec/replicatedJobs/0/template/spec/parallelism", n),
            _replace("/spec/replicatedJobs/0/template/spec/completions", n),
        ],
        count_env="NNODES",
        gpu_env="NPROC_PER_NODE",
    ),
    "caption": Workload(
        "RayJob",
        (f"{_RAY_WORKERS}/template",),
        lambda n: [_replace(f"{_RAY_WORKERS}/{k}", n) for k in ("replicas", "minReplicas", "maxReplicas")],
    ),
}
WORKLOADS["sweep"] = WORKLOADS["caption"]


def manifest_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "k8s"


def base_name(spec: JobSpec, launch: LaunchConfig) -> str:
    return launch.k8s.base or spec.k8s_base


def _split_image(image: str) -> dict[str, str]:
    """``registry/name:tag`` or ``registry/name@sha256:...`` -> kustomize ``images`` fields."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return {"newName": name, "digest": digest}
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
        return {"newName": name, "newTag": tag}
    return {"newName": image}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def workload_patches(workload: Workload, launch: LaunchConfig) -> tuple[Ops, dict[str, str]]:
    """JSON6902 ops for the launch config's replicas / GPUs / CPU / memory, and the env keys to merge."""
    k = launch.k8s
    ops: Ops = []
    env: dict[str, str] = {}
    for template in workload.compute_templates:
        res = f"{template}/spec/containers/0/resources"
        if k.gpus is not None:
            ops += [
                {"op": "add", "path": f"{res}/{part}/nvidia.com~1gpu", "value": k.gpus}
                for part in ("requests", "limits")
            ]
        for key, value in (("cpu", k.cpu), ("memory", k.memory)):
            if value:
                ops += [_replace(f"{res}/{part}/{key}", value) for part in ("requests", "limits")]
    if k.gpus is not None:
        ops += workload.gpus(k.gpus)
        if workload.gpu_env:
            env[workload.gpu_env] = str(max(k.gpus, 1))
    if k.replicas:
        ops += workload.replicas(k.replicas)
        if workload.count_env:
            env[workload.count_env] = str(k.replicas)
    return ops, env


def job_env(launch: LaunchConfig, module: str) -> dict[str, str]:
    """clip-job-env entries this launch sets (the rest stay the overlay's)."""
    e = launch.env
    env = {"CLIP_MODULE": module, **e.nccl, **e.extra}
    if e.omp_num_threads:
        env["OMP_NUM_THREADS"] = str(e.omp_num_threads)
    elif launch.k8s.cpu and _is_number(launch.k8s.cpu):
        env["OMP_NUM_THREADS"] = str(max(1, int(float(launch.k8s.cpu))))
    return env


def render_overlay(
    spec: JobSpec, launch: LaunchConfig, *, run_suffix: str, module: str, job_config: str
) -> dict[str, str]:
    """The run's overlay files: ``kustomization.yaml`` and ``job.toml`` (kustomize reads files only below it)."""
    base = base_name(spec, launch)
    overlay = manifest_dir() / "overlays" / launch.k8s.overlay / base
    if not (overlay / "kustomization.yaml").exists():
        raise ValueError(
            f"k8s.overlay: no overlay {launch.k8s.overlay}/{base} under {manifest_dir() / 'overlays'}"
        )
    if base not in WORKLOADS:
        raise ValueError(
            f"k8s.base: no workload description for base {base!r} (known: {', '.join(WORKLOADS)})"
        )
    workload = WORKLOADS[base]
    ops, count_env = workload_patches(workload, launch)
    env = {**job_env(launch, module), **count_env}
    if workload.kind == "RayJob":
        ops.append(_replace("/spec/entrypoint", f"python -m {module} --config /etc/clip/job.toml"))

    doc: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"../k8s/overlays/{launch.k8s.overlay}/{base}"],
        "nameSuffix": f"-{run_suffix}",
        "labels": [{"pairs": {"clip-pipeline/run": run_suffix}, "includeTemplates": True}],
        "configMapGenerator": [
            {"name": "clip-job-config", "behavior": "replace", "files": ["job.toml"]},
            {
                "name": "clip-job-env",
                "behavior": "merge",
                "literals": [f"{key}={value}" for key, value in sorted(env.items())],
            },
        ],
    }
    if launch.k8s.namespace:
        doc["namespace"] = launch.k8s.namespace
    if launch.k8s.image:
        doc["images"] = [{"name": "clip-pipeline", **_split_image(launch.k8s.image)}]
    files = {"job.toml": job_config}
    if ops:
        doc["patches"] = [{"path": "patch.yaml", "target": {"kind": workload.kind}}]
        files["patch.yaml"] = (
            "# JSON6902 ops from the launch config (replicas, GPUs, CPU, memory).\n" + _yaml(ops)
        )
    header = (
        f"# Generated by `python -m jobs.submit --target k8s` for run {run_suffix}.\n"
        f"# Apply: kubectl apply -k <this folder>   (the job's resolved config is job.toml beside it)\n"
    )
    files["kustomization.yaml"] = header + _yaml(doc)
    return files


def _yaml(data: Any) -> str:
    import yaml  # PyYAML: a dependency of ray and transformers

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=110)


def kubectl_executable(launch: LaunchConfig) -> str:
    if launch.k8s.kubectl:
        return launch.k8s.kubectl
    beside = Path(sys.executable).with_name("kubectl")
    return str(beside) if beside.exists() else "kubectl"


def apply_command(launch: LaunchConfig, overlay: Path) -> list[str]:
    return [kubectl_executable(launch), "apply", "-k", str(overlay)]


def kustomize(launch: LaunchConfig, overlay: Path) -> str:
    """``kubectl kustomize <overlay>`` (offline); raises RuntimeError with kustomize's message."""
    proc = subprocess.run(
        [kubectl_executable(launch), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {proc.stderr.strip()}")
    return proc.stdout
