"""``clipp``: one command over every job. ``clipp --help`` lists them; ``clipp <job> --help`` documents one.

clipp synthworld --out runs/world        # == python -m data_prep.synthworld ...
clipp pretrain --config jobs/configs/debug.toml
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

# job name -> (module, one-line description). Modules are imported only when their job runs.
JOBS: dict[str, tuple[str, str]] = {
    "quickstart": ("jobs.quickstart", "the whole pipeline on the embedded default, end to end"),
    "synthworld": ("data_prep.synthworld", "generate the synthetic image-text world in real data layouts"),
    "shard": ("data_prep.shard", "DataComp/DataCompDR-style pairs -> WebDataset shards"),
    "caption": ("data_prep.caption", "synthetic captions (CoCa / HF image-to-text) for shards"),
    "train_coca": ("data_prep.train_coca", "train a small CoCa captioner (e.g. on the synthetic world)"),
    "pretrain": ("jobs.pretrain", "DeepSpeed ZeRO CLIP pretraining"),
    "finetune": ("jobs.finetune", "one downstream fine-tuning stage"),
    "finetune_sweep": ("jobs.finetune_sweep", "Ray Tune sweeps over fine-tuning stages"),
    "pipeline": ("jobs.pipeline", "pretrain -> fine-tune sweeps -> report DAG"),
    "scaling_report": ("jobs.scaling_report", "scaling-curve report over pretraining runs"),
    "reproduce": ("jobs.reproduce", "toy reproduction of the caption-quality claim"),
    "submit": ("jobs.submit", "submit a job to SLURM, Kubernetes or Ray"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, doc) in JOBS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the job's package is not there at all
            found = False
        if found:
            out[name] = (module, doc)
    return out


def usage() -> str:
    jobs = _available()
    width = max(len(n) for n in jobs) if jobs else 10
    lines = ["usage: clipp <job> [--help] [job arguments]", "", "jobs:"]
    lines += [f"  {name:<{width}}  {doc}   (python -m {module})" for name, (module, doc) in jobs.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    jobs = _available()
    if args[0] not in jobs:
        print(f"clipp: unknown job {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(jobs[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
