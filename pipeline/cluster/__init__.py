"""Cluster job submission: SLURM sbatch scripts, Kubernetes kustomize overlays and ``ray job submit``.

The entry point is ``python -m jobs.submit`` (see docs/cluster-jobs.md). This package holds the pieces it
uses: the launch config and job registry (:mod:`.config`), the code snapshot and config resolution
(:mod:`.snapshot`), one renderer per target (:mod:`.slurm`, :mod:`.k8s`, :mod:`.ray_jobs`) and a tiny
distributed smoke job (:mod:`.smoke`) for checking a cluster before spending GPU hours on it.
"""
