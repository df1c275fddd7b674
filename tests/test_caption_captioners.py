"""Captioners: K seeded captions per image from CoCa (our decoder) and from a tiny local BLIP (transformers).

.venv/bin/pytest tests/test_caption_captioners.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.caption.captioners import (
    ARCH_DEBUG,
    COCA_DEBUG_CFG,
    CaptionerConfig,
    CocaCaptioner,
    HFCaptioner,
    build_captioner,
    build_coca,
)
from pipeline.caption.decode import DecodeConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def peaky_coca() -> torch.nn.Module:
    """A tiny random CoCa with sharp next-token distributions, so duplicate captions actually happen."""
    m = build_coca(COCA_DEBUG_CFG, seed=0)
    with torch.no_grad():
        m.text_decoder.text_projection.mul_(6.0)
    return m


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))


KEYS = [f"uid{i:03d}" for i in range(8)]


def _coca(model: torch.nn.Module, **decode: object) -> CocaCaptioner:
    unique = bool(decode.pop("unique", True))
    seed = int(decode.pop("seed", 0))  # type: ignore[call-overload]
    cfg = CaptionerConfig(
        arch=ARCH_DEBUG, device="cpu", unique=unique, seed=seed, decode=DecodeConfig(max_len=8, **decode)
    )  # type: ignore[arg-type]
    return CocaCaptioner(cfg, model=model)


def _distinct(caps: list[list[str]]) -> float:
    return sum(len(set(c)) for c in caps) / len(caps)


def test_coca_captioner_writes_five_captions_per_image_fixed_by_seed_and_uid_not_by_batching(
    peaky_coca: torch.nn.Module, pixels: torch.Tensor
) -> None:
    captioner = _coca(peaky_coca, top_p=0.95)
    caps = captioner.caption(pixels, KEYS)
    assert [len(c) for c in caps] == [5] * 8
    assert captioner.caption(pixels, KEYS) == caps
    assert (
        captioner.caption(pixels[5:], KEYS[5:]) + captioner.caption(pixels[:5], KEYS[:5])
        == caps[5:] + caps[:5]
    )
    assert _coca(peaky_coca, top_p=0.95, seed=1).caption(pixels, KEYS) != caps
    # the uid seeds the captions: the same pixels under other uids get other captions
    assert captioner.caption(pixels, [k + "x" for k in KEYS]) != caps


def test_diversity_controls_temperature_and_unique_resampling_give_more_distinct_captions(
    peaky_coca: torch.nn.Module, pixels: torch.Tensor
) -> None:
    cold = _coca(peaky_coca, top_p=1.0, temperature=0.5, unique=False).caption(pixels, KEYS)
    cold_unique = _coca(peaky_coca, top_p=1.0, temperature=0.5, unique=True).caption(pixels, KEYS)
    hot = _coca(peaky_coca, top_p=1.0, temperature=2.0, unique=False).caption(pixels, KEYS)
    assert _distinct(cold) < 5, "fixture should produce duplicate captions at low temperature"
    assert _distinct(cold_unique) > _distinct(cold)
    assert _distinct(hot) > _distinct(cold)
    # resampling only replaces duplicates: the first caption of every image is the same
    assert [c[0] for c in cold_unique] == [c[0] for c in cold]


def test_beam_search_captioner_returns_the_top_hypotheses(
    peaky_coca: torch.nn.Module, pixels: torch.Tensor
) -> None:
    captioner = _coca(peaky_coca, strategy="beam", num_beams=6, num_beam_groups=3, diversity_penalty=2.0)
    caps = captioner.caption(pixels, KEYS)
    assert [len(c) for c in caps] == [5] * 8
    assert captioner.caption(pixels, KEYS) == caps


def test_coca_checkpoint_round_trip_gives_the_same_captions(
    peaky_coca: torch.nn.Module, pixels: torch.Tensor, tmp_path: Path
) -> None:
    path = tmp_path / "coca.pt"
    torch.save({"state_dict": peaky_coca.state_dict(), "model_cfg": COCA_DEBUG_CFG}, path)
    cfg = CaptionerConfig(arch=ARCH_DEBUG, device="cpu", checkpoint=str(path), decode=DecodeConfig(max_len=8))
    loaded = build_captioner(cfg)
    assert loaded.caption(pixels, KEYS) == CocaCaptioner(cfg, model=peaky_coca).caption(pixels, KEYS)
    torch.save(peaky_coca.state_dict(), tmp_path / "bare.pt")  # open_clip-style bare state dict
    bare = build_captioner(
        CaptionerConfig(
            arch=ARCH_DEBUG,
            device="cpu",
            checkpoint=str(tmp_path / "bare.pt"),
            decode=DecodeConfig(max_len=8),
        )
    )
    assert bare.caption(pixels, KEYS) == loaded.caption(pixels, KEYS)


def write_tiny_blip(path: Path) -> Path:
    """A randomly initialised BLIP captioner and its processor, saved with save_pretrained (no downloads)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    path.mkdir(parents=True, exist_ok=True)
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[DEC]",
        "a",
        "red",
        "blue",
        "circle",
        "square",
        "on",
        "grass",
        "the",
        "sky",
        "star",
    ]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    text = dict(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=32,
        bos_token_id=5,
        pad_token_id=0,
        eos_token_id=3,
        sep_token_id=3,
        max_position_embeddings=32,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    ).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_hf_captioner_loads_a_local_blip_directory_and_writes_k_seeded_captions(tmp_path: Path) -> None:
    blip = write_tiny_blip(tmp_path / "blip")
    cfg = CaptionerConfig(
        backend="hf",
        hf_dir=str(blip),
        device="cpu",
        num_captions=3,
        decode=DecodeConfig(max_len=8, min_len=2, top_p=1.0),
    )
    captioner = build_captioner(cfg)
    assert isinstance(captioner, HFCaptioner)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)) for i in range(4)]
    pixels = torch.stack([captioner.preprocess(im) for im in images])
    assert pixels.shape == (4, 3, 32, 32)
    keys = ["a", "b", "c", "d"]
    caps = captioner.caption(pixels, keys)
    assert [len(c) for c in caps] == [3] * 4
    vocabulary = {"a", "red", "blue", "circle", "square", "on", "grass", "the", "sky", "star"}
    assert all(set(c.split()) <= vocabulary for per in caps for c in per)
    assert any(c for per in caps for c in per)
    assert captioner.caption(pixels, keys) == caps
    other = build_captioner(
        CaptionerConfig(
            backend="hf",
            hf_dir=str(blip),
            device="cpu",
            num_captions=3,
            seed=7,
            decode=DecodeConfig(max_len=8, min_len=2, top_p=1.0),
        )
    )
    assert other.caption(pixels, keys) != caps


def test_captioner_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_captions"):
        CaptionerConfig(decode=DecodeConfig(strategy="greedy"))
    with pytest.raises(ValueError, match="hf_dir"):
        CaptionerConfig(backend="hf")
    with pytest.raises(ValueError, match="num_beam_groups"):
        CaptionerConfig(backend="hf", hf_dir="x", decode=DecodeConfig(strategy="beam"))
    with pytest.raises(ValueError, match="arch"):
        build_captioner(CaptionerConfig(arch="ViT-B-32", device="cpu"))
    with pytest.raises(ValueError, match="checkpoint"):
        build_captioner(
            CaptionerConfig(arch=ARCH_DEBUG, checkpoint=str(tmp_path / "missing.pt"), device="cpu")
        )
