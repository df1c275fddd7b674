r"""Submit a job to SLURM, Kubernetes or a Ray cluster, from a snapshot of the code and its resolved config.

    python -m jobs.submit --target slurm --job pretrain --config jobs/configs/pretrain/debug.toml --dry-run
    python -m jobs.submit --target slurm --job shard --config my_shard.toml --launch.slurm.array_tasks=64
    python -m jobs.submit --target k8s --job pretrain --config jobs/configs/pretrain/vit_b16.toml \
        --launch.k8s.overlay=prod --launch.k8s.image=registry.example.com/clip-pipeline:v1
    python -m jobs.submit --target ray --job sweep --config jobs/configs/sweep/dense_gpu.toml \
        --launch.ray.address=http://head:8265

`--config` and plain `--a.b=c` overrides are the job's (resolved by the job module itself);
`--launch FILE` and `--launch.section.field=value` set where and how it runs (keys listed below).
Before submitting, the code and both resolved configs are copied to <run_dir>/submit/<stamp>-<target>/;
the job runs from that copy. `--dry-run` prints everything that would be written and the command, and
writes nothing. Docs: docs/cluster-jobs.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobs.registry import JOBS, submittable
from pipeline.cli import job_main
from pipeline.cluster.config import LaunchConfig
from pipeline.cluster.submit import SubmitRequest, describe, make_plan, submit
from pipeline.config import ConfigError, help_text, load_config, to_toml

LAUNCH_PREFIX = "--launch."


def _parser() -> argparse.ArgumentParser:
    jobs = submittable()
    width = max(len(n) for n in jobs)
    listing = "\n".join(f"  {n:<{width}}  {s.doc}   (python -m {s.module})" for n, s in jobs.items())
    parser = argparse.ArgumentParser(
        prog="python -m jobs.submit",
        description=__doc__,
        epilog=f"jobs (jobs/registry.py):\n{listing}\n\n"
        "launch keys (in --launch FILE, or as --launch.key=value):\n" + help_text(LaunchConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", required=True, choices=["slurm", "k8s", "ray"], help="where to run")
    parser.add_argument("--job", required=True, choices=list(jobs), help="which job (listed below)")
    parser.add_argument("--config", help="the job's TOML config (its own keys; default: the job's defaults)")
    parser.add_argument("--launch", dest="launch_file", metavar="FILE", help="TOML launch config")
    parser.add_argument("--dry-run", action="store_true", help="print what would be submitted; write nothing")
    parser.add_argument("--print-launch-config", action="store_true", help="print the resolved launch config")
    return parser


@job_main("python -m jobs.submit", user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        parser.error(f"unrecognised argument {bad[0]!r} (overrides look like --section.field=value)")
    launch_overrides = ["--" + r[len(LAUNCH_PREFIX) :] for r in rest if r.startswith(LAUNCH_PREFIX)]
    job_overrides = tuple(r for r in rest if not r.startswith(LAUNCH_PREFIX))
    try:
        launch = load_config(LaunchConfig, args.launch_file, launch_overrides, base=LaunchConfig())
    except ConfigError as e:
        raise ConfigError(f"launch config: {e}") from None
    if args.print_launch_config:
        print(to_toml(launch), end="")
        return 0
    request = SubmitRequest(
        target=args.target, job=args.job, config=args.config, job_overrides=job_overrides, launch=launch
    )
    plan = make_plan(request, JOBS)  # a JobConfigError / ValueError: one line from job_main, exit 2
    if args.dry_run:
        print(describe(plan), end="")
        return 0
    record = submit(plan)
    where = record.get("job_id") or record.get("output", "").strip() or f"exit {record.get('returncode')}"
    print(f"submitted {args.job} to {args.target}: {where}")
    print(f"submission folder: {plan.record_dir}")
    print(f"run directory:     {plan.run_dir}")
    return int(record.get("returncode", 0) or 0)


if __name__ == "__main__":
    sys.exit(main())
