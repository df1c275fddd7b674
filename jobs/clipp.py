"""``clipp``: one command over every job. ``clipp --help`` lists them; ``clipp <job> --help`` documents one.

    clipp synthworld --out runs/world        # == python -m data_prep.synthworld ...
    clipp pretrain --preset debug

The jobs are the table in jobs/registry.py; modules are imported only when their job runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from jobs.registry import available


def usage() -> str:
    jobs = available()
    width = max(len(n) for n in jobs) if jobs else 10
    lines = ["usage: clipp <job> [--help] [job arguments]", "", "jobs:"]
    lines += [f"  {name:<{width}}  {spec.doc}   (python -m {spec.module})" for name, spec in jobs.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    jobs = available()
    if args[0] not in jobs:
        print(f"clipp: unknown job {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(jobs[args[0]].module)
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
