"""Toy reproduction of the paper's claim, one command: do quality (synthetic) captions give better transfer to
dense prediction and better data efficiency than noisy web captions? On the synthetic world, CPU-sized.

    python -m jobs.reproduce                                   # --preset toy (jobs/configs/reproduce/toy.toml) -> runs/reproduce
    python -m jobs.reproduce --out=/tmp/repro --study.grid.seeds=[0,1]
    python -m jobs.reproduce --data.subset_sizes=[256,1024] --study.pretrain.overrides='["--steps=100"]'

It writes the toy data (runs/reproduce/data: pool shards with noisy web captions and synthetic captions,
nested subsets, held-out zero-shot images), pretrains the debug CLIP on (a) web captions only and (b) web +
synthetic captions at each subset size (the same pretraining seeds, hence the same initialisation and data
order, for both caption sources), reads out every export and a random initialisation of each seed with dense
readouts that depend on the representation (linear probes and k-NN patch retrieval on frozen patch features,
few-shot fine-tuning; pipeline/report/readouts.py), and writes the scaling report with a verdict at the top:
runs/reproduce/study/report/index.html (and report.md, report.json). Re-running reuses everything finished.
The verdict is what the numbers say, whichever way; it lands in runs/reproduce/reproduce.json too.
Exit code 0 when every point finished, 1 otherwise. See docs/reports.md ("Toy reproduction").
"""

from __future__ import annotations

import os
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline import io
from pipeline.cli import job_main, parse_config
from pipeline.report.toy import ReproduceConfig


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and every child it waited for (the pretraining launches)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@job_main("python -m jobs.reproduce")
def main(argv: Sequence[str] | None = None) -> int:
    started = time.time()
    command = "python -m jobs.reproduce " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    cfg, _ = parse_config(
        ReproduceConfig,
        argv,
        prog="python -m jobs.reproduce",
        description=__doc__.split("\n\n")[0],
        job="reproduce",
        default_preset="toy",
    )
    import dataclasses

    from pipeline.orchestrate import run_finetuning, run_pretraining
    from pipeline.report import html as H
    from pipeline.report.build import build_report
    from pipeline.report.scaling import plan_points, resolve_paths
    from pipeline.report.toy import (
        readout_caveat,
        readout_table,
        readout_verdict,
        run_toy_readouts,
        study_config,
        toy_verdict,
        verdict_markdown,
        write_toy_data,
    )

    out = Path(cfg.out).resolve()
    cfg = dataclasses.replace(cfg, out=str(out))
    record = out / "reproduce.json"
    history = io.read_json(str(record)).get("invocations", []) if record.is_file() else []
    before = sum(h["seconds"] for h in history), sum(h["cpu_seconds"] for h in history)
    print(f"[reproduce] data -> {out / 'data'}", flush=True)
    data = write_toy_data(cfg.data, out / "data")
    print(f"[reproduce] data ready after {time.time() - started:.0f} s", flush=True)
    study = resolve_paths(study_config(cfg, data))
    points = plan_points(study)
    launches = run_pretraining(study, points)
    print(f"[reproduce] pretraining finished after {time.time() - started:.0f} s", flush=True)
    results = run_toy_readouts(cfg, study, points)
    print(f"[reproduce] readouts finished after {time.time() - started:.0f} s", flush=True)
    finetune = run_finetuning(study, points)

    def verdict_hook(report: dict) -> dict:
        verdict = readout_verdict(
            results, study, points, tuple(cfg.readouts.names()), cfg.level, cfg.num_boot
        )
        stages = toy_verdict(report, study)  # the stage fine-tuning readouts, when configured; zero-shot
        verdict["lines"] += [
            f"Stage fine-tuning: {line}" if "zero-shot" not in line.lower() else line
            for line in stages["lines"]
        ]
        verdict["stage_verdict"] = {k: stages[k] for k in ("transfer", "data_efficiency", "per_metric")}
        verdict["caveat"] = readout_caveat(cfg, study)
        seconds = time.time() - started
        md = verdict_markdown(verdict, command.strip(), before[0] + seconds, study.grid.seeds)
        body = f'<div class="verdict {"good" if verdict["transfer"] == "yes" else "mixed"}">'
        body += (
            H.paragraph(
                f"Do quality captions give better transfer? {verdict['transfer']}. "
                f"Better data efficiency? {verdict['data_efficiency']}."
            )
            + "</div>"
        )
        body += H.bullet_list(verdict["lines"]) + H.paragraph(f"Caveat: {verdict['caveat']}")
        if verdict["table"]:
            head, rows = readout_table(verdict)
            body += H.paragraph("Readouts (means over pretraining and readout seeds; intervals paired):")
            body += H.table_html([dict(zip(head, r)) for r in rows], head, text_columns=head)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        timing = f"wall time {seconds / 60:.1f} min, CPU time {cpu_seconds() / 60:.1f} min"
        if history:
            timing += (
                f" (this invocation; with the {len(history)} before it, which did the rest of the work: "
                f"{(before[0] + seconds) / 60:.1f} min wall, {(before[1] + cpu_seconds()) / 60:.1f} min CPU; "
                "see reproduce.json)"
            )
        body += H.paragraph(
            f"Command: {command.strip()}; seeds {list(study.grid.seeds)}; {timing}; data, "
            f"pretraining, fine-tuning and report on {os.cpu_count()} CPUs, load average {load}."
        )
        world = ", ".join(f"{k}={v}" for k, v in data["config"]["world"].items())
        body += H.paragraph(
            f"World: {world}; pool {data['pool_size']} samples; subsets "
            f"{', '.join(data['subsets'])}; captions: web = noisy alt-text, syn = "
            f"{cfg.data.num_syn_captions} paraphrases of the precise caption per image."
        )
        return {
            "verdict": verdict,
            "seconds": seconds,
            "markdown": md,
            "sections": [H.Section("Toy reproduction: verdict", body, anchor="verdict")],
            "meta": {
                "wall time (all invocations)": f"{(before[0] + seconds) / 60:.1f} min",
                "seeds": list(study.grid.seeds),
            },
        }

    report = build_report(study, points, launches, finetune, hook=verdict_hook)
    seconds = time.time() - started
    history.append(
        {
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds(), 1),
            "load_average": list(os.getloadavg()),
            "pretraining_launched": sum(launch.status != "done-before" for launch in launches),
            "finetune_trials_run": len(finetune.get("rows", [])) - finetune.get("done_before", 0),
        }
    )
    io.write_json(
        str(record),
        {
            "command": command.strip(),
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds(), 1),
            "load_average": list(os.getloadavg()),
            "cpus": os.cpu_count(),
            "verdict": report["verdict"],
            "html": report["html"],
            "markdown": report["markdown"],
            "missing": report["missing"],
            "seeds": list(study.grid.seeds),
            "invocations": history,
        },
    )
    verdict = report["verdict"]
    print(
        f"[reproduce] better transfer: {verdict['transfer']}; better data efficiency: {verdict['data_efficiency']}"
    )
    for line in verdict["lines"]:
        print(f"[reproduce] {line}")
    print(f"[reproduce] {verdict['caveat']}")
    print(
        f"[reproduce] report: {report['html']}  ({seconds / 60:.1f} min wall, {cpu_seconds() / 60:.1f} min CPU)"
    )
    for item in report["missing"]:
        print(f"[reproduce] missing: {item}")
    return 0 if not report["missing"] else 1


if __name__ == "__main__":
    sys.exit(main())
