"""Shared command-line handling for every job: ``--preset NAME``, ``--config FILE``, dotted overrides.

Each job's ``main(argv=None)`` calls :func:`parse_config` with its config class and its job name; the
presets are the files in ``jobs/configs/<job>/``. Layers: code defaults < ``--preset`` < ``--config`` <
``--a.b=c`` (see ``pipeline.config``). ``--help`` lists every key with its type, default and doc, and the
shipped presets; a bad key or value exits with a one-line error naming it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from pipeline.config import (
    PRESET_ROOT,
    ConfigError,
    help_text,
    load_config,
    preset_names,
    preset_summary,
    to_toml,
)

T = TypeVar("T")


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    job: str | None = None,
    default_preset: str | None = None,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[T, argparse.Namespace]:
    """Parse ``argv`` into a resolved config of type ``cls`` plus the job's extra (non-config) flags.

    ``job`` names the preset folder ``jobs/configs/<job>/`` (e.g. ``pretrain``, ``finetune/depth``); without
    it the job has no ``--preset`` flag. ``default_preset`` is loaded when ``--preset`` is not given.
    """
    presets = preset_names(job) if job is not None else []
    epilog = "config keys (set in the TOML file or as --key=value):\n" + help_text(cls)
    if job is not None:
        width = max((len(n) for n in presets), default=0)
        lines = [f"  {n:<{width}}  {preset_summary(job, n)}".rstrip() for n in presets]
        where = PRESET_ROOT.relative_to(PRESET_ROOT.parents[1]) / job
        epilog += (
            f"\n\npresets (--preset NAME: {where}/NAME.toml, only the keys that differ from the defaults):\n"
        )
        epilog += "\n".join(lines) if lines else "  (none shipped)"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML file with config values (on top of the preset)")
    if job is not None:
        parser.add_argument(
            "--preset",
            choices=presets,
            default=default_preset,
            help=f"named recipe from jobs/configs/{job}/ (default: {default_preset or 'the code defaults'})",
        )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if extra_args is not None:
        extra_args(parser)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        parser.error(f"unrecognised argument {bad[0]!r} (config overrides look like --section.field=value)")
    preset = getattr(args, "preset", None)
    try:
        cfg = load_config(cls, args.config, rest, job=job, preset=preset)
    except ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    if args.print_config:
        print(to_toml(cfg), end="")
        parser.exit(0)
    return cfg, args


def add_array_task_args(parser: argparse.ArgumentParser) -> None:
    """``--task-index`` / ``--num-tasks`` for jobs that split their work over a SLURM array (or by hand)."""
    parser.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="this array task (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or 0)",
    )
    parser.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        help="array tasks in all (default: SLURM_ARRAY_TASK_COUNT, or 1)",
    )


def job_main(
    prog: str, *, user_errors: tuple[type[Exception], ...] = (ConfigError,)
) -> Callable[[Callable[[Sequence[str] | None], int]], Callable[[Sequence[str] | None], int]]:
    """Decorate a job's ``main(argv)``: a user error is one line ``<prog>: error: <message>`` on stderr and
    exit code 2 (what :func:`parse_config` does for a bad key or value); anything else keeps its traceback.

        @job_main("python -m jobs.pipeline")
        def main(argv: Sequence[str] | None = None) -> int: ...

    ``user_errors`` is ConfigError by default: a ValueError naming the key (and file) to change. Jobs whose
    config is validated again after parsing (``dataclasses.replace`` re-runs ``__post_init__``, whose
    ValueErrors name the field) pass ``(ValueError,)``; long jobs should not, or a ValueError from a bug deep
    in training would be reported as a config error without its traceback.
    """

    def wrap(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            try:
                return main(argv)
            except user_errors as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap
