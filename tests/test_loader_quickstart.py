"""``python -m jobs.quickstart`` pretrains on the captions its caption step wrote (each step's job replaced by a
fast stand-in that writes what the real one writes; the pretrain stand-in builds the real loader from the
arguments the quickstart passes).

.venv/bin/pytest tests/test_loader_quickstart.py -q
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import webdataset as wds
from test_loader import TOKENIZER, write_shards

from pipeline.config import load_config
from pipeline.data import schema
from pipeline.data.loader import build_loader
from pipeline.data.prep import safe_tar

ROOT = Path(__file__).resolve().parents[1]


def _arg(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def test_quickstart_pretrains_on_the_coca_captions_it_wrote_and_says_so(tmp_path, monkeypatch, capsys):
    import data_prep.caption
    import data_prep.shard
    import data_prep.synthworld
    import data_prep.train_coca
    import jobs.finetune
    import jobs.pretrain
    from jobs.quickstart import main
    from pipeline.train.trainer import TrainConfig

    seen: dict[str, object] = {}

    def shard(argv: list[str]) -> int:
        write_shards(Path(_arg(argv, "output.path")), num_shards=2, per_shard=16, num_syn=2)
        return 0

    def caption(argv: list[str]) -> int:  # what data_prep.caption writes in sidecar mode
        shards, out = Path(_arg(argv, "input.shards")), Path(_arg(argv, "output.path"))
        out.mkdir(parents=True)
        for tar in sorted(shards.glob("*.tar")):
            with open(tar, "rb") as f:
                keys = [k for k, _ in safe_tar.iter_tar_samples(f)]
            with wds.TarWriter(str(out / tar.name)) as sink:
                for k in keys:
                    sink.write(
                        {"__key__": k, "syn.json": schema.encode_syn([f"coca says {k}", f"coca adds {k}"])}
                    )
            marker = {"samples": len(keys), "captioned": len(keys), "captioner": "coca:coca_debug:coca.pt"}
            (out / f"{tar.stem}.caption.json").write_text(json.dumps(marker))
        return 0

    def pretrain(argv: list[str]) -> int:
        overrides = [a for a in argv if not a.startswith(("--preset=", "--run_dir=", "--log."))]
        cfg = load_config(TrainConfig, job="pretrain", preset=_arg(argv, "preset"), overrides=overrides)
        data = replace(cfg.data, num_workers=0, context_length=16)
        batch = next(iter(build_loader(data, 0, 1, TOKENIZER)))
        seen["syn_text"] = [row.tolist() for row in batch["syn_text"]]
        seen["uid"] = batch["uid"]
        return 0

    for module, fn in [
        (data_prep.synthworld, lambda argv: 0),
        (data_prep.shard, shard),
        (data_prep.train_coca, lambda argv: 0),
        (data_prep.caption, caption),
        (jobs.pretrain, pretrain),
        (jobs.finetune, lambda argv: 0),
    ]:
        monkeypatch.setattr(module, "main", fn)
    assert main([f"--out={tmp_path / 'qs'}"]) == 0
    out = capsys.readouterr().out
    captions = tmp_path / "qs" / "captions"
    line = f"synthetic captions: {captions} (CoCa, 32 of 32 samples captioned, 2 sidecar shards)"
    assert out.count(line) == 2  # before pretraining and in the summary
    for uid, row in zip(seen["uid"], seen["syn_text"]):  # type: ignore[call-overload]
        expected = [TOKENIZER([f"coca {v} {uid}"], context_length=16)[0].tolist() for v in ("says", "adds")]
        assert row in expected, uid


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
