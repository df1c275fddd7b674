"""Cluster job submission: SLURM sbatch scripts, Kubernetes kustomize overlays and ``ray job submit``.

The entry point is ``python -m jobs.submit`` (see docs/cluster-jobs.md). This package holds the pieces it
uses: the launch config and the job spec type (:mod:`.config`; the table of jobs is jobs/registry.py,
passed in by jobs.submit), the code snapshot and config resolution (:mod:`.snapshot`) and one renderer per
target (:mod:`.slurm`, :mod:`.k8s`, :mod:`.ray_jobs`). The smoke job for new clusters is jobs/smoke.py.
"""
