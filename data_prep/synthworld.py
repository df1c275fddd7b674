"""Generate the synthetic image-text world and write it in real data layouts (DataComp, img2dataset, ImageNet,
COCO, ADE20K, NYUv2); prints a summary of what it wrote and where.

    python -m data_prep.synthworld                                   # 1,000 pool + 200 + 200 images, 64 px
    python -m data_prep.synthworld --out=/data/sw --num_samples=100000 --world.image_size=128
    python -m data_prep.synthworld --preset=shape_necessary --layouts=datacomp,imagenet
    python -m data_prep.synthworld --help                            # every knob, with its default and doc

See docs/synthworld.md for the classes, captions, knobs and layouts.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.cli import job_main, parse_config
from pipeline.data.synth_export import ExportConfig, export


def format_summary(summary: dict) -> str:
    lines = [
        f"synthworld: wrote {summary['scenes_generated']} scenes ({summary['image_size']} px) "
        f"in {summary['seconds']} s to {summary['out']}"
    ]
    for name, info in summary["layouts"].items():
        details = ", ".join(f"{k}={v}" for k, v in info.items() if k != "path")
        lines.append(f"  {name:<12} {info['path']}  ({details})")
    lines.append(f"  summary      {summary['out']}/summary.json; config {summary['out']}/world.toml")
    return "\n".join(lines)


@job_main("python -m data_prep.synthworld")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(
        ExportConfig,
        argv,
        prog="python -m data_prep.synthworld",
        description=__doc__.split("\n\n")[0],
        job="synthworld",
    )
    print(format_summary(export(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
