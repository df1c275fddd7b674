"""Our cached CoCa decoder against open_clip's own ``generate`` on the same (tiny, random) weights.

.venv/bin/pytest tests/test_caption_decode.py -q
"""

from __future__ import annotations

import pytest
import torch

from pipeline.caption.captioners import COCA_DEBUG_CFG, build_coca
from pipeline.caption.decode import EOS_TOKEN_ID, SOT_TOKEN_ID, CocaDecoder, DecodeConfig
from pipeline.caption.openclip_compat import enable_open_clip_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny random CoCa whose end token is likely enough that captions end at different lengths."""
    m = build_coca(COCA_DEBUG_CFG, seed=0)
    with torch.no_grad():
        m.text_decoder.text_projection[:, EOS_TOKEN_ID] *= 8.0
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _open_clip_tokens(out: torch.Tensor, stop_at_pad: bool) -> list[list[int]]:
    """open_clip's padded output rows -> token lists without start / end / padding."""
    rows = []
    for row in out.tolist():
        assert row[0] == SOT_TOKEN_ID
        seq = []
        for tok in row[1:]:
            if tok == EOS_TOKEN_ID or (stop_at_pad and tok == 0):
                break
            seq.append(tok)
        rows.append(seq)
    return rows


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.5])
def test_greedy_tokens_equal_open_clip_generate_top_k_1_on_a_batch(model, images, repetition_penalty):
    enable_open_clip_generate()
    torch.manual_seed(0)
    ref = model.generate(
        images,
        generation_type="top_k",
        top_k=1,
        seq_len=12,
        min_seq_len=3,
        repetition_penalty=repetition_penalty,
    )
    ref_tokens = _open_clip_tokens(ref, stop_at_pad=True)
    cfg = DecodeConfig(strategy="greedy", max_len=12, min_len=3, repetition_penalty=repetition_penalty)
    ours = [caps[0] for caps in CocaDecoder(model).generate(images, cfg)]
    assert len({len(t) for t in ref_tokens}) > 1, "fixture should give captions of several lengths"
    assert ours == ref_tokens


@pytest.mark.parametrize(("num_beams", "num_beam_groups", "repetition_penalty"), [(6, 3, 1.0), (4, 1, 1.3)])
def test_beam_search_tokens_equal_open_clip_generate_on_a_batch(
    model, images, num_beams, num_beam_groups, repetition_penalty
):
    enable_open_clip_generate()
    ref = model.generate(
        images,
        generation_type="beam_search",
        seq_len=12,
        min_seq_len=3,
        num_beams=num_beams,
        num_beam_groups=num_beam_groups,
        repetition_penalty=repetition_penalty,
    )
    ref_tokens = _open_clip_tokens(ref, stop_at_pad=False)
    cfg = DecodeConfig(
        strategy="beam",
        max_len=12,
        min_len=3,
        num_beams=num_beams,
        num_beam_groups=num_beam_groups,
        repetition_penalty=repetition_penalty,
    )
    ours = [caps[0] for caps in CocaDecoder(model).generate(images, cfg)]
    assert len({len(t) for t in ref_tokens}) > 1, "fixture should give captions of several lengths"
    assert ours == ref_tokens


def test_cached_step_logits_equal_a_full_forward_even_with_padding_ids_in_the_prefix(model, images):
    decoder = CocaDecoder(model)
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(1, 49406, (images.shape[0], 9), generator=gen)
    text[:, 0] = SOT_TOKEN_ID
    text[0, 3] = 0  # the text tower masks id 0 (open_clip's pad id) as a key: the cache must too
    text[1, 5] = 0
    with torch.no_grad():
        full = model(images, text, output_labels=False)["logits"]
        state = decoder._new_state(decoder.encode_images(images), 1, 16)
        prefill = decoder.step(text[:, :4], state)  # several positions at once, then one at a time
        steps = [prefill] + [decoder.step(text[:, i : i + 1], state) for i in range(4, 9)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], rtol=1e-4, atol=1e-4)


def test_sampled_captions_are_reproducible_and_do_not_depend_on_batching(model, images):
    decoder = CocaDecoder(model)
    cfg = DecodeConfig(strategy="sample", max_len=12, top_k=40, top_p=0.9, temperature=1.5)
    seeds = list(range(100, 100 + 3 * len(images)))
    whole = decoder.generate(images, cfg, num_return=3, row_seeds=seeds)
    again = decoder.generate(images, cfg, num_return=3, row_seeds=seeds)
    split = decoder.generate(images[:3], cfg, num_return=3, row_seeds=seeds[:9]) + decoder.generate(
        images[3:], cfg, num_return=3, row_seeds=seeds[9:]
    )
    other = decoder.generate(images, cfg, num_return=3, row_seeds=[s + 1000 for s in seeds])
    assert whole == again == split
    assert whole != other
    assert all(len(caps) == 3 for caps in whole)
    assert any(len({tuple(c) for c in caps}) > 1 for caps in whole)


def test_sampling_with_top_k_1_is_greedy(model, images):
    decoder = CocaDecoder(model)
    greedy = decoder.generate(images, DecodeConfig(strategy="greedy", max_len=12))
    sampled = decoder.generate(images, DecodeConfig(strategy="sample", max_len=12, top_k=1, temperature=3.0))
    assert sampled == greedy


def test_min_and_max_length_bound_every_caption(model, images):
    decoder = CocaDecoder(model)
    for min_len, max_len in [(8, 12), (2, 6)]:
        cfg = DecodeConfig(strategy="sample", max_len=max_len, min_len=min_len, top_p=1.0, temperature=0.5)
        caps = decoder.generate(images, cfg, num_return=2, row_seeds=list(range(2 * len(images))))
        lengths = [len(c) for per in caps for c in per]
        # min_len counts the start token; max_len counts start and end tokens; id 0 (padding) may end one
        ended_by_pad = sum(1 for n in lengths if n < min_len - 1)
        assert ended_by_pad <= 1
        assert max(lengths) <= max_len - 2


def test_diversity_penalty_makes_beam_groups_return_different_captions(model, images):
    decoder = CocaDecoder(model)
    plain = DecodeConfig(strategy="beam", max_len=12, num_beams=6, num_beam_groups=3)
    diverse = DecodeConfig(strategy="beam", max_len=12, num_beams=6, num_beam_groups=3, diversity_penalty=5.0)
    plain_caps = decoder.generate(images, plain, num_return=3)
    diverse_caps = decoder.generate(images, diverse, num_return=3)

    def distinct(caps: list[list[list[int]]]) -> float:
        return sum(len({tuple(c) for c in per}) for per in caps) / len(caps)

    assert distinct(diverse_caps) > distinct(plain_caps)
    assert distinct(diverse_caps) >= 2.5


def test_decode_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="num_beam_groups"):
        DecodeConfig(strategy="beam", num_beams=4, num_beam_groups=3)
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="min_len"):
        DecodeConfig(max_len=5, min_len=5)
