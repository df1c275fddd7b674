"""Fast checks of the trainer's parts that need no DeepSpeed process group: configs, optimizer groups,
schedule, EMA, FLOP count, retrieval metric, checkpoint retention and RNG state, export round trip.

    .venv/bin/pytest tests/test_trainer_units.py -q
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random

import numpy as np
import open_clip
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data.loader import LoaderConfig
from pipeline.model.clip import ModelConfig, build_clip
from pipeline.model.flops import forward_flops_per_sample
from pipeline.train import checkpoint
from pipeline.train.ema import EMA, EMAConfig
from pipeline.train.evaluate import EvalConfig, evaluate, recall_at_k
from pipeline.train.export import export_open_clip, load_export
from pipeline.train.optim import OptimConfig, build_scheduler, lr_at, param_groups
from pipeline.train.trainer import TrainConfig

DEBUG_DATA = LoaderConfig(micro_batch=8, image_size=64, context_length=32)


def debug_config(**kw) -> TrainConfig:
    base = dict(model=ModelConfig(name="debug"), data=DEBUG_DATA, global_batch=32, steps=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def debug_model():
    model, preprocess, tokenizer = build_clip(ModelConfig(name="debug"))
    return model, preprocess, tokenizer


def test_global_batch_is_split_into_ranks_micro_batches_and_accumulation():
    cfg = debug_config()
    assert cfg.accumulation_for(1) == 4
    assert cfg.accumulation_for(2) == 2
    assert cfg.accumulation_for(4) == 1
    assert cfg.accumulation_for(3) == 2  # 11 + 11 + 10 samples in micro-batches of 6 + 5 (or 5 + 5)
    with pytest.raises(ValueError, match="global_batch"):
        cfg.accumulation_for(33)
    with pytest.raises(ValueError, match="accumulation_steps"):
        debug_config(accumulation_steps=2).accumulation_for(1)


def test_config_errors_name_the_field_to_change():
    with pytest.raises(ValueError, match="global_batch"):
        debug_config(global_batch=0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        debug_config(accumulation_steps=33)
    with pytest.raises(ValueError, match="data.image_size"):
        debug_config(data=dataclasses.replace(DEBUG_DATA, image_size=224))
    with pytest.raises(ValueError, match="data.context_length"):
        debug_config(data=dataclasses.replace(DEBUG_DATA, context_length=77))
    with pytest.raises(ValueError, match="name"):
        ModelConfig(name="no-such-model")


def test_vit_b16_preset_is_the_seed_recipe():
    cfg = load_config(TrainConfig, "jobs/configs/pretrain/vit_b16.toml")
    assert (cfg.model.name, cfg.data.image_size, cfg.data.context_length) == ("ViT-B-16", 224, 77)
    assert (cfg.global_batch, cfg.steps, cfg.optim.warmup_steps) == (65_536, 200_000, 2_000)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.lr, cfg.optim.min_lr) == (0.9, 0.95, 1e-3, 1e-6)
    assert (cfg.optim.weight_decay, cfg.engine.precision, cfg.ema.decay) == (0.2, "bf16", 0.9995)
    assert (
        cfg.data.scale == (0.9, 1.0) and cfg.data.ratio[0] == 0.75 and abs(cfg.data.ratio[1] - 4 / 3) < 1e-3
    )
    assert cfg.loss.w_real > 0 and cfg.loss.w_syn > 0
    assert cfg.accumulation_for(256) == 1 and cfg.accumulation_for(8) == 32


def test_debug_preset_loads_with_shards_from_the_command_line():
    cfg = load_config(
        TrainConfig,
        "jobs/configs/pretrain/debug.toml",
        ["--data.shards=x/{0..3}.tar", "--engine.zero_stage=3"],
    )
    assert cfg.model.name == "debug" and cfg.engine.zero_stage == 3 and cfg.data.shards == "x/{0..3}.tar"
    with pytest.raises(ConfigError, match="engine: zero_stage"):
        load_config(TrainConfig, "jobs/configs/pretrain/debug.toml", ["--engine.zero_stage=4"])


def test_no_weight_decay_on_biases_norms_logit_scale_and_embeddings(debug_model):
    model = debug_model[0]
    groups = {g["name"]: g for g in param_groups(model, 0.2)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.2
    for name in (
        "logit_scale",
        "token_embedding.weight",
        "positional_embedding",
        "visual.class_embedding",
        "visual.positional_embedding",
        "ln_final.weight",
        "ln_final.bias",
        "visual.ln_pre.weight",
        "transformer.resblocks.0.attn.in_proj_bias",
    ):
        assert name in no_decay, name
    for name in (
        "visual.conv1.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "text_projection",
        "visual.proj",
        "transformer.resblocks.0.mlp.c_fc.weight",
    ):
        assert name in decay, name
    assert len(no_decay) + len(decay) == len(list(model.parameters()))


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    total = 110
    lrs = [lr_at(s, cfg, total) for s in range(total)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[-1] == pytest.approx(1e-5)
    mid = 10 + (total - 10 - 1) / 2
    assert lr_at(int(mid), cfg, total) == pytest.approx(
        1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * int(mid - 10) / 99))
    )
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(lrs)


def test_ema_follows_the_closed_form_and_skips_steps_between_updates():
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, EMAConfig(decay=0.9, update_interval=2))
    targets = []
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        targets.append({n: p.detach().clone() for n, p in model.named_parameters()})
        ema.update(step)
    assert ema.num_updates == 2
    d = 0.9**2
    for name, value in ema.full_state_dict().items():
        expected = (start[name] * d + targets[1][name] * (1 - d)) * d + targets[3][name] * (1 - d)
        torch.testing.assert_close(value, expected)
    other = EMA(model, EMAConfig(decay=0.9, update_interval=2))
    other.load_state_dict(ema.state_dict())
    for a, b in zip(other.full_state_dict().values(), ema.full_state_dict().values()):
        assert torch.equal(a, b)


def _vit_forward_flops(tokens: int, width: int, layers: int, mlp: int, patch_dim: int, embed: int) -> int:
    per_layer = 2 * tokens * width * (3 * width + width + 2 * mlp) + 2 * 2 * tokens * tokens * width
    return (tokens - 1) * patch_dim * width * 2 + layers * per_layer + 2 * width * embed


def test_flop_count_matches_the_transformer_formula(debug_model):
    model = debug_model[0]
    image_only = forward_flops_per_sample(model, image_size=64, context_length=32, num_texts=0)
    expected = _vit_forward_flops(tokens=65, width=64, layers=3, mlp=256, patch_dim=3 * 8 * 8, embed=64)
    assert image_only == pytest.approx(expected, rel=0.02)
    one_text = forward_flops_per_sample(model, image_size=64, context_length=32, num_texts=1)
    two_texts = forward_flops_per_sample(model, image_size=64, context_length=32, num_texts=2)
    text = one_text - image_only
    assert two_texts - one_text == text and text > 0


def test_retrieval_recall_counts_any_caption_of_an_image():
    # 2 images, 3 captions: captions 0 and 1 belong to image 0, caption 2 to image 1.
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    owner = torch.tensor([0, 0, 1])
    r = recall_at_k(sim, owner, ks=(1,))
    assert r["i2t_r1"] == 0.5  # image 0's best caption is its own; image 1's best is caption 0
    assert r["t2i_r1"] == pytest.approx(1 / 3)  # captions -> images: 0->1 (wrong), 1->0, 2->0 (wrong)


def test_checkpoint_retention_keeps_the_last_n_and_every_kth_step():
    assert checkpoint.to_delete([5, 10, 15, 20, 25], keep_last=2, keep_every=10) == [5, 15]
    assert checkpoint.to_delete([5, 10], keep_last=3, keep_every=0) == []


def test_rng_states_round_trip_through_a_weights_only_load():
    state = checkpoint.rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.set_rng_state(loaded)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_export_loads_in_stock_open_clip_and_gives_the_same_embeddings(tmp_path, debug_model):
    model, preprocess, tokenizer = debug_model
    torch.manual_seed(1)
    weights = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    model.load_state_dict(weights)
    export_open_clip(weights, ModelConfig(name="debug"), preprocess, tmp_path / "export")
    open_clip.add_model_config(tmp_path / "export" / "debug.json")
    loaded, _, transform = open_clip.create_model_and_transforms(
        "debug", pretrained=str(tmp_path / "export" / "open_clip_pytorch_model.bin")
    )
    images, text = torch.randn(3, 3, 64, 64), tokenizer(["a red circle", "a blue star", "grass"])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(text), model.encode_text(text))
        assert float(loaded.logit_scale) == float(model.logit_scale)
    again = load_export(tmp_path / "export")[0].eval()
    tower = open_clip.create_model("debug", pretrained_image_path=str(tmp_path / "export" / "visual.pt"))
    with torch.no_grad():
        assert torch.equal(again.encode_image(images), model.encode_image(images))
        assert torch.equal(tower.eval().encode_image(images), model.encode_image(images))
    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    with torch.no_grad():
        assert torch.equal(local.eval().encode_text(text), model.encode_text(text))


def test_deepspeed_config_matches_the_batch_and_keeps_zero1_reduction_unoverlapped():
    from pipeline.train.engine import EngineConfig, deepspeed_config

    optim = OptimConfig(grad_clip_norm=0.5)
    ds = deepspeed_config(
        EngineConfig(zero_stage=1), optim, micro_batch=8, accumulation_steps=4, world_size=2
    )
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (64, 8, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["overlap_comm"] is False
    ds3 = deepspeed_config(
        EngineConfig(
            zero_stage=3, precision="fp32", deepspeed={"zero_optimization": {"stage3_max_live_parameters": 7}}
        ),
        optim,
        micro_batch=8,
        accumulation_steps=1,
        world_size=1,
    )
    assert ds3["zero_optimization"]["overlap_comm"] is True and ds3["bf16"]["enabled"] is False
    assert (
        ds3["zero_optimization"]["stage3_max_live_parameters"] == 7 and ds3["zero_optimization"]["stage"] == 3
    )


class ColourModel(torch.nn.Module):
    """A stand-in CLIP that knows three colours: images embed as their mean RGB, the words red / green /
    blue as the matching axis, so every evaluation below has a known, perfect answer."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.words = {int(tokenizer([w])[0, 1]): i for i, w in enumerate(("red", "green", "blue"))}

    def encode_image(self, images):
        return images.mean(dim=(2, 3)) + 10.0  # normalised CLIP inputs: shift so all channels are positive

    def encode_text(self, tokens):
        out = torch.full((tokens.shape[0], 3), 10.0)
        for row, toks in enumerate(tokens.tolist()):
            for t in toks:
                if t in self.words:
                    out[row, self.words[t]] += 5.0
        return out


def _solid(path, rgb):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), rgb).save(path)


COLOURS = {"red": (250, 10, 10), "green": (10, 250, 10), "blue": (10, 10, 250)}


def test_zero_shot_reads_an_imagenet_style_folder_and_scores_a_perfect_model_at_one(tmp_path, debug_model):
    tokenizer, preprocess = debug_model[2], debug_model[1]
    for name, rgb in COLOURS.items():
        for k in range(2):
            _solid(tmp_path / "val" / f"c_{name}" / f"{k}.png", rgb)
    (tmp_path / "val" / "classnames.txt").write_text("blue\ngreen\nred\n")  # sorted folder order
    (tmp_path / "val" / "c_red" / "notes.txt").write_text("not an image")
    cfg = EvalConfig(zero_shot=str(tmp_path / "val"), templates=("a photo of {}.", "{}"))
    result = evaluate(ColourModel(tokenizer), tokenizer, preprocess, cfg)
    assert result["zs_images"] == 6 and result["zs_chance"] == pytest.approx(1 / 3)
    assert result["zs_top1"] == 1.0


def test_retrieval_on_coco_style_captions_scores_a_perfect_model_at_one(tmp_path, debug_model):
    tokenizer, preprocess = debug_model[2], debug_model[1]
    images, annotations = [], []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        _solid(tmp_path / "images" / f"{i}.jpg", rgb)
        images.append({"id": 10 + i, "file_name": f"images/{i}.jpg"})
        annotations += [
            {"image_id": 10 + i, "caption": f"something {name}"},
            {"image_id": 10 + i, "caption": name},
        ]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    cfg = EvalConfig(retrieval=str(tmp_path / "captions.json"))
    result = evaluate(ColourModel(tokenizer), tokenizer, preprocess, cfg)
    assert result["retrieval_images"] == 3
    assert result["i2t_r1"] == result["t2i_r1"] == result["i2t_r5"] == 1.0


def test_pretrain_cli_accepts_the_deepspeed_launchers_local_rank_and_prints_the_deepspeed_config(capsys):
    from jobs.pretrain import main

    assert main(["--preset", "debug", "--local_rank=0", "--print-ds-config", "--engine.zero_stage=3"]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 64
    assert ds["gradient_accumulation_steps"] == 2  # one process: 64 = 1 x 32 x 2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_deepspeed_config_accumulates_and_reduces_gradients_in_fp32(stage):
    from pipeline.train.engine import EngineConfig, deepspeed_config

    recipe = load_config(TrainConfig, "jobs/configs/pretrain/vit_b16.toml")
    assert recipe.engine.precision == "bf16"
    for engine in (dataclasses.replace(recipe.engine, zero_stage=stage), EngineConfig(zero_stage=stage)):
        ds = deepspeed_config(engine, recipe.optim, micro_batch=256, accumulation_steps=32, world_size=8)
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
        assert ds["communication_data_type"] == "fp32"
    fp32 = deepspeed_config(EngineConfig(zero_stage=stage, precision="fp32"), recipe.optim, 8, 2, 1)
    assert "data_types" not in fp32 and "communication_data_type" not in fp32


def test_bf16_at_zero_stage_0_is_refused_naming_zero_stage():
    from pipeline.train.engine import EngineConfig

    with pytest.raises(ValueError, match="zero_stage: bf16 accumulates gradients in fp32"):
        EngineConfig(zero_stage=0, precision="bf16")
    EngineConfig(zero_stage=0, precision="fp32")
    EngineConfig(zero_stage=0, precision="bf16", deepspeed={"data_types": {"grad_accum_dtype": "bf16"}})


def test_patch_dropout_reaches_the_vision_tower_only_in_training_and_stays_out_of_exports(tmp_path):
    with pytest.raises(ValueError, match="patch_dropout: must be in"):
        ModelConfig(name="debug", patch_dropout=1.0)
    cfg = ModelConfig(name="debug", patch_dropout=0.5)
    model, preprocess, tokenizer = build_clip(cfg)
    assert model.visual.patch_dropout.prob == 0.5
    images = torch.randn(2, 3, 64, 64)
    model.train()
    torch.manual_seed(0)
    a = model.encode_image(images)
    torch.manual_seed(1)
    assert not torch.allclose(a, model.encode_image(images))  # different tokens dropped
    torch.manual_seed(0)
    assert torch.equal(a, model.encode_image(images))  # the same RNG state drops the same tokens
    model.eval()
    assert torch.equal(model.encode_image(images), model.encode_image(images))
    export_open_clip(model.state_dict(), cfg, preprocess, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "debug.json").read_text())
    assert exported["vision_cfg"].get("patch_dropout", 0.0) == 0.0


def test_seed_rngs_gives_every_generator_the_same_stream_per_seed_and_rank():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    checkpoint.seed_rngs(5, rank=1)
    first = draws()
    checkpoint.seed_rngs(5, rank=1)
    assert draws() == first
    checkpoint.seed_rngs(5, rank=0)
    assert all(a != b for a, b in zip(draws(), first))
