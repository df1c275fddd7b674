"""Tiny synthetic-world data for the trainer tests: training shards, a zero-shot folder, retrieval shards.

Shards follow ``pipeline/data/schema.py`` (jpg, txt = the noisy web caption, syn.json = synthetic captions,
json = metadata) and are written by :func:`pipeline.data.synth_export.write_pretraining_shards`. The held-out split is the world's ``val``
split: an ImageNet-style folder of PNGs named by the main object's shape, and shards whose ``txt`` is the
precise caption. Also a launcher that starts ``jobs.pretrain`` as N rank processes, as srun does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from ports import free_port

from pipeline.data import synthworld as sw
from pipeline.data.synth_export import shard_pattern, write_pretraining_shards

ROOT = Path(__file__).resolve().parents[1]
TORCH_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))

# An easy world: one large object per scene, 4 shapes, one colour per scene, so that shape is what tells
# the captions of a batch apart and a tiny model learns it in a few hundred CPU steps.
EASY_WORLD = sw.WorldConfig(
    image_size=64,
    num_shapes=4,
    num_colours=2,
    one_colour_per_scene=True,
    num_sizes=1,
    num_stuff_classes=3,
    min_things=1,
    max_things=1,
    min_radius=0.2,
    max_radius=0.3,
    noise_std=2.0,
)


@dataclass(frozen=True)
class WorldData:
    shards: str
    zero_shot: Path
    retrieval: str
    classnames: tuple[str, ...]


def write_shards(
    out: Path,
    world: sw.WorldConfig,
    split: str,
    num_shards: int,
    per_shard: int,
    precise_txt: bool = False,
    num_syn: int = 3,
) -> str:
    write_pretraining_shards(out, world, num_shards * per_shard, per_shard, split, num_syn, precise_txt)
    return shard_pattern(out, num_shards)


def write_image_folder(out: Path, world: sw.WorldConfig, split: str, num: int) -> Path:
    for index in range(num):
        scene = sw.make_scene(world, index, split)
        folder = out / sw.THING_CLASSES[sw.zero_shot_label(scene)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(folder / f"{scene.uid}.png")
    for name in world.shapes:  # every class gets a folder, even one with no image in this sample
        (out / name).mkdir(parents=True, exist_ok=True)
    return out


def make_world_data(
    root: Path,
    num_shards: int = 4,
    per_shard: int = 64,
    num_val: int = 128,
    world: sw.WorldConfig = EASY_WORLD,
) -> WorldData:
    shards = write_shards(root / "train", world, "train", num_shards, per_shard)
    zero_shot = write_image_folder(root / "zero_shot", world, "val", num_val)
    retrieval = write_shards(root / "retrieval", world, "val", 1, num_val, precise_txt=True, num_syn=0)
    return WorldData(shards, zero_shot, retrieval, tuple(world.shapes))


def pretrain_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment srun / torchrun would give rank ``rank`` (our launcher-agnostic rank discovery)."""
    env = dict(os.environ)
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    return env


class Ranks:
    """``jobs.pretrain`` as ``world_size`` processes, one per rank, each in its own process group (as
    srun starts tasks), so a test can signal or kill every rank and read every rank's exit code."""

    def __init__(self, args: list[str], world_size: int, log_dir: Path) -> None:
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{r}.out" for r in range(world_size)]
        self.procs = []
        for rank in range(world_size):
            with open(self.logs[rank], "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "jobs.pretrain", *args],
                        cwd=ROOT,
                        env=pretrain_env(rank, world_size, port),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, sig)

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            raise

    def output(self) -> str:
        return "\n".join(f"--- rank {r}\n" + log.read_text()[-4000:] for r, log in enumerate(self.logs))


def run_pretrain(args: list[str], world_size: int, log_dir: Path, timeout: float = 600) -> list[int]:
    """Run ``jobs.pretrain`` on ``world_size`` ranks to the end; the exit codes (output on failure)."""
    ranks = Ranks(args, world_size, log_dir)
    codes = ranks.wait(timeout)
    if any(codes):
        print(ranks.output())
    return codes


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)
