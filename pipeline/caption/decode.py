"""Batched caption decoding for open_clip CoCa with a key/value cache in the text decoder.

open_clip's ``CoCa.generate`` re-runs the text tower and the multimodal decoder over the whole prefix at
every step, copies each image once per beam, and (in 3.3.0) needs transformers' beam-search classes. This
module decodes the same model with:

- a key/value cache for the causal self-attention of the text tower and of the multimodal decoder, so each
  step processes one new token per row;
- cross-attention keys/values computed once per *image* and shared by all rows of that image (beams or
  samples), by folding the rows into the query axis instead of copying the image;
- finished images dropped from the batch as they finish.

Strategies (:class:`DecodeConfig`): ``greedy``, ``beam`` (open_clip's group beam search: ``num_beams`` split
into ``num_beam_groups``, optional Hamming ``diversity_penalty``) and ``sample`` (temperature, top-k, top-p),
all with repetition penalty and min/max length. Lengths follow open_clip: ``max_len`` counts the start token
and the end token, and the end token is blocked while the sequence (start token included) is shorter than
``min_len``. With ``beam_score="logits"`` (open_clip's behaviour, the default) beams are ranked by summed raw
logits; ``"log_softmax"`` ranks them by log-probabilities (textbook beam search). Greedy and beam search give
the same tokens as open_clip's ``generate`` on the same weights (tests/test_caption_decode.py).

Sampling is reproducible row by row: each row (image, caption index) draws its uniforms from its own seed,
so a caption does not depend on the batch it was decoded in, nor on a resumed job's batch boundaries.

    decoder = CocaDecoder(model)
    tokens = decoder.generate(images, DecodeConfig(strategy="sample", top_p=0.9), num_return=5, row_seeds=seeds)
    # tokens[i][k]: list of token ids of caption k of image i (no start / end / pad tokens)

Nothing here imports transformers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

SOT_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407


@dataclass(frozen=True)
class DecodeConfig:
    """How token sequences are chosen."""

    strategy: Literal["greedy", "beam", "sample"] = "sample"
    """greedy: argmax; beam: (group) beam search; sample: temperature / top-k / top-p sampling."""
    max_len: int = 30
    """Longest sequence in tokens, start and end tokens included (open_clip's ``seq_len``)."""
    min_len: int = 5
    """The end token is blocked while the sequence, start token included, is shorter (open_clip's ``min_seq_len``)."""
    temperature: float = 1.0
    """Sampling temperature (sample only); < 1 sharpens, > 1 flattens."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = off."""
    top_p: float = 0.9
    """Sample only from the smallest set of tokens whose probability reaches top_p; 1.0 = off."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the sequence (CTRL-style, as transformers does); 1.0 = off."""
    num_beams: int = 6
    """Beams per image (beam only)."""
    num_beam_groups: int = 3
    """Beam groups (diverse beam search); num_beams must be a multiple. open_clip's default is 6 / 3."""
    diversity_penalty: float = 0.0
    """Hamming diversity penalty between beam groups (subtracted per earlier-group use of a token)."""
    length_penalty: float = 1.0
    """Finished beam scores are divided by length ** length_penalty."""
    beam_score: Literal["logits", "log_softmax"] = "logits"
    """What beams add up: raw logits (open_clip's generate, same tokens) or log-probabilities."""

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ValueError(f"max_len: must be >= 2, got {self.max_len}")
        if not 0 <= self.min_len < self.max_len:
            raise ValueError(
                f"min_len: must be in [0, max_len), got {self.min_len} with max_len={self.max_len}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        if self.strategy == "beam":
            if self.num_beams < 2:
                raise ValueError(f"num_beams: beam search needs >= 2 beams, got {self.num_beams}")
            if self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups:
                raise ValueError(
                    f"num_beam_groups: must divide num_beams={self.num_beams}, got {self.num_beam_groups}"
                )
        if self.diversity_penalty < 0:
            raise ValueError(f"diversity_penalty: must be >= 0, got {self.diversity_penalty}")


def row_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for caption ``index`` of the image with key ``key`` (stable across runs and machines)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------------------
# logits processing (the semantics of transformers' processors, reimplemented)


def apply_repetition_penalty(scores: torch.Tensor, prev: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative scores of tokens in ``prev`` [N, T] by ``penalty``."""
    if penalty == 1.0:
        return scores
    picked = torch.gather(scores, 1, prev)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, prev, picked)


_CANDIDATES = (
    256  # top-p first looks among this many most likely tokens; a full sort only when they fall short
)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index into each row of (unnormalised, non-negative) ``probs`` picked by the uniforms in [0, 1)."""
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _top_p_sample(
    sorted_scores: torch.Tensor, p: float, uniforms: torch.Tensor, log_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of the sampled token among ``sorted_scores`` (descending), and whether the nucleus fit in them."""
    probs = (sorted_scores - log_norm.unsqueeze(1)).exp()
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < p  # the mass of more likely tokens is still short of p (transformers' rule)
    fits = cum[:, -1] >= p
    return _inverse_cdf(probs * keep, uniforms), fits


def sample_next(scores: torch.Tensor, top_k: int, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one token per row from softmax(scores) restricted to the top-k tokens, then the top-p nucleus.

    Tokens are ordered by decreasing probability before the inverse-CDF draw, so a row's token depends only
    on its own scores and uniform. Equivalent to transformers' TopK / TopP warpers followed by sampling.
    """
    scores = scores.float()
    vocab = scores.shape[-1]
    if top_k <= 0 and top_p >= 1.0:
        return _inverse_cdf((scores - scores.max(dim=-1, keepdim=True).values).exp(), uniforms)
    k = min(top_k if top_k > 0 else _CANDIDATES, vocab)
    vals, idx = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
    if top_p >= 1.0:
        rank = _inverse_cdf((vals - vals[:, :1]).exp(), uniforms)
        return idx.gather(1, rank.unsqueeze(1)).squeeze(1)
    log_norm = torch.logsumexp(vals if top_k > 0 else scores, dim=-1)
    rank, fits = _top_p_sample(vals, top_p, uniforms, log_norm)
    out = idx.gather(1, rank.unsqueeze(1)).squeeze(1)
    if top_k <= 0 and not bool(fits.all()):
        # flat distributions: the nucleus is larger than the candidates, sort those rows in full
        rows = (~fits).nonzero().squeeze(1)
        full_vals, full_idx = torch.sort(scores[rows], dim=-1, descending=True)
        full_rank, _ = _top_p_sample(full_vals, top_p, uniforms[rows], log_norm[rows])
        out[rows] = full_idx.gather(1, full_rank.unsqueeze(1)).squeeze(1)
    return out


# --------------------------------------------------------------------------------------------------------
# the cached model


def _check_block(block: nn.Module, where: str) -> None:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise NotImplementedError(
            f"{where}: only open_clip's default ResidualAttentionBlock (nn.MultiheadAttention) is supported, "
            f"got {type(block).__name__}"
        )
    if not attn.batch_first:
        raise NotImplementedError(f"{where}: batch_first=False attention is not supported")


class _State:
    """Per-batch decoding state: self-attention caches for every layer, cross-attention K/V per image."""

    def __init__(
        self,
        text_k: list[torch.Tensor],
        text_v: list[torch.Tensor],
        dec_k: list[torch.Tensor],
        dec_v: list[torch.Tensor],
        cross_k: list[torch.Tensor],
        cross_v: list[torch.Tensor],
        tok_valid: torch.Tensor,
        rows_per_image: int,
    ) -> None:
        self.text_k, self.text_v, self.dec_k, self.dec_v = text_k, text_v, dec_k, dec_v
        self.cross_k, self.cross_v = cross_k, cross_v
        self.tok_valid = tok_valid  # [N, T_max] bool: tokens that are not the text tower's padding id
        self.rows_per_image = rows_per_image
        self.length = 0  # positions filled in the caches

    def reorder_rows(self, index: torch.Tensor) -> None:
        """Row i of the new state is row index[i] of the old one (beam reordering, within images)."""
        for caches in (self.text_k, self.text_v, self.dec_k, self.dec_v):
            for i, c in enumerate(caches):
                caches[i] = c.index_select(0, index)
        self.tok_valid = self.tok_valid.index_select(0, index)

    def keep_images(self, images: torch.Tensor) -> None:
        """Keep only the given images (indices into the current batch), with all their rows."""
        r = self.rows_per_image
        rows = (images.unsqueeze(1) * r + torch.arange(r, device=images.device)).reshape(-1)
        self.reorder_rows(rows)
        for caches in (self.cross_k, self.cross_v):
            for i, c in enumerate(caches):
                caches[i] = c.index_select(0, images)


class CocaDecoder:
    """Cached, batched decoding over an open_clip ``CoCa`` model (weights are used in place, not copied)."""

    def __init__(
        self,
        model: nn.Module,
        sot_token_id: int = SOT_TOKEN_ID,
        eos_token_id: int = EOS_TOKEN_ID,
        pad_token_id: int | None = None,
    ) -> None:
        for name in ("visual", "text", "text_decoder"):
            if not hasattr(model, name):
                raise TypeError(f"model: expected an open_clip CoCa, it has no {name!r}")
        self.model = model
        self.text = model.text
        self.decoder = model.text_decoder
        if not hasattr(self.text, "token_embedding"):
            raise NotImplementedError("model.text: Hugging Face text towers are not supported")
        for i, blk in enumerate(self.text.transformer.resblocks):
            _check_block(blk, f"text.transformer.resblocks[{i}]")
        for i, (blk, xblk) in enumerate(zip(self.decoder.resblocks, self.decoder.cross_attn)):
            _check_block(blk, f"text_decoder.resblocks[{i}]")
            _check_block(xblk, f"text_decoder.cross_attn[{i}]")
        if self.text.attn_mask is None:
            raise NotImplementedError("model.text: a bidirectional text tower cannot decode")
        self.sot = sot_token_id
        self.eos = eos_token_id
        self.pad = int(getattr(model, "pad_id", 0) if pad_token_id is None else pad_token_id)
        self.text_pad = int(self.text.pad_id)
        self.uses_key_mask = self.text.cls_emb is not None or bool(getattr(self.text, "use_pad_mask", False))
        self.legacy_cls_mask = self.text.cls_emb is not None and not getattr(
            self.text, "correct_cls_mask", False
        )
        self.context_length = min(
            int(self.text.num_pos) - (1 if self.text.cls_emb is not None else 0),
            int(self.decoder.attn_mask.shape[0]),
        )

    # ---- model pieces ------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The image token embeddings the decoder attends to: [B, P, width]."""
        _, image_embs = self.model._encode_image(images.to(device=self.device, dtype=self.dtype))
        return image_embs

    @staticmethod
    def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
        n, t, w = x.shape
        return x.view(n, t, num_heads, w // num_heads).transpose(1, 2)

    def _new_state(self, image_embs: torch.Tensor, rows_per_image: int, max_len: int) -> _State:
        b = image_embs.shape[0]
        n = b * rows_per_image
        dtype, device = self.dtype, self.device

        def caches(blocks: nn.ModuleList) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            ks, vs = [], []
            for blk in blocks:
                heads = blk.attn.num_heads
                width = blk.attn.embed_dim
                shape = (n, heads, max_len, width // heads)
                ks.append(torch.zeros(shape, dtype=dtype, device=device))
                vs.append(torch.zeros(shape, dtype=dtype, device=device))
            return ks, vs

        text_k, text_v = caches(self.text.transformer.resblocks)
        dec_k, dec_v = caches(self.decoder.resblocks)
        cross_k, cross_v = [], []
        for xblk in self.decoder.cross_attn:
            kv = xblk.ln_1_kv(image_embs)
            w = xblk.attn.embed_dim
            weight, bias = xblk.attn.in_proj_weight, xblk.attn.in_proj_bias
            k = F.linear(kv, weight[w : 2 * w], None if bias is None else bias[w : 2 * w])
            v = F.linear(kv, weight[2 * w :], None if bias is None else bias[2 * w :])
            cross_k.append(self._heads(k, xblk.attn.num_heads))
            cross_v.append(self._heads(v, xblk.attn.num_heads))
        tok_valid = torch.ones(n, max_len, dtype=torch.bool, device=device)
        return _State(text_k, text_v, dec_k, dec_v, cross_k, cross_v, tok_valid, rows_per_image)

    def _self_attention(
        self,
        blk: nn.Module,
        x: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attn = blk.attn
        n, t, w = x.shape
        qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.split(w, dim=-1)
        k_cache[:, :, start : start + t] = self._heads(k, attn.num_heads)
        v_cache[:, :, start : start + t] = self._heads(v, attn.num_heads)
        end = start + t
        out = F.scaled_dot_product_attention(
            self._heads(q, attn.num_heads), k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask
        )
        out = out.transpose(1, 2).reshape(n, t, w)
        out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
        x = x + blk.ls_1(out)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def _cross_attention(
        self, blk: nn.Module, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows_per_image: int
    ) -> torch.Tensor:
        attn = blk.attn
        n, t, w = x.shape
        b = n // rows_per_image
        q = F.linear(
            blk.ln_1(x), attn.in_proj_weight[:w], None if attn.in_proj_bias is None else attn.in_proj_bias[:w]
        )
        # rows of one image share its keys/values: fold them into the query axis
        q = q.view(b, rows_per_image * t, attn.num_heads, w // attn.num_heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(n, t, w)
        out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
        x = x + blk.ls_1(out)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def _masks(
        self, state: _State, t: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Additive masks for the new ``t`` positions: (text tower: causal + padding keys, decoder: causal)."""
        start, end = state.length, state.length + t
        causal = None
        if t > 1:
            q_pos = torch.arange(start, end, device=device).unsqueeze(1)
            k_pos = torch.arange(end, device=device).unsqueeze(0)
            causal = torch.zeros(t, end, dtype=self.dtype, device=device)
            causal.masked_fill_(k_pos > q_pos, float("-inf"))
        text_mask = causal
        if self.uses_key_mask:
            valid = state.tok_valid[:, :end]
            if self.legacy_cls_mask:
                # open_clip's legacy CoCa mask is shifted by one: key p is padding when token p-1 is
                valid = torch.cat([torch.ones_like(valid[:, :1]), valid[:, : end - 1]], dim=1)
            if not bool(valid.all()):
                pad = torch.zeros(valid.shape, dtype=self.dtype, device=device)
                pad = pad.masked_fill_(~valid, float("-inf"))[:, None, None, :]
                text_mask = pad if causal is None else pad + causal
        return text_mask, causal

    def step(self, tokens: torch.Tensor, state: _State) -> torch.Tensor:
        """Feed ``tokens`` [N, t] (the next t positions of every row); return next-token logits [N, V] (fp32)."""
        n, t = tokens.shape
        start = state.length
        state.tok_valid[:, start : start + t] = tokens != self.text_pad
        text_mask, dec_mask = self._masks(state, t, tokens.device)

        x = self.text.token_embedding(tokens).to(self.dtype)
        x = x + self.text.positional_embedding[start : start + t].to(self.dtype)
        for i, blk in enumerate(self.text.transformer.resblocks):
            x = self._self_attention(blk, x, state.text_k[i], state.text_v[i], start, text_mask)
        # the CoCa text tower hands its un-normalised token states to the decoder
        for i, (blk, xblk) in enumerate(zip(self.decoder.resblocks, self.decoder.cross_attn)):
            x = self._self_attention(blk, x, state.dec_k[i], state.dec_v[i], start, dec_mask)
            x = self._cross_attention(xblk, x, state.cross_k[i], state.cross_v[i], state.rows_per_image)
        state.length = start + t
        last = self.decoder.ln_final(x[:, -1])
        return (last @ self.decoder.text_projection).float()

    # ---- decoding ----------------------------------------------------------------------------------

    def _process(self, logits: torch.Tensor, prefix: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
        scores = apply_repetition_penalty(logits, prefix, cfg.repetition_penalty)
        if prefix.shape[1] < cfg.min_len:
            scores[:, self.eos] = float("-inf")
        return scores

    @torch.inference_mode()
    def generate(
        self,
        images: torch.Tensor | None,
        cfg: DecodeConfig,
        num_return: int = 1,
        row_seeds: list[int] | None = None,
        image_embs: torch.Tensor | None = None,
    ) -> list[list[list[int]]]:
        """``num_return`` token-id lists per image: ``out[i][k]`` without start, end or pad tokens.

        greedy needs ``num_return == 1``; beam returns the best ``num_return`` hypotheses
        (``<= num_beams``); sample draws ``num_return`` rows per image, row ``i * num_return + k`` using
        ``row_seeds[i * num_return + k]`` (default: seeds 0, 1, 2, ...).
        """
        if cfg.max_len > self.context_length + 1:
            raise ValueError(f"max_len: at most {self.context_length + 1} for this model, got {cfg.max_len}")
        if image_embs is None:
            if images is None:
                raise ValueError("images: give images or image_embs")
            image_embs = self.encode_images(images)
        if cfg.strategy == "greedy":
            if num_return != 1:
                raise ValueError(f"num_return: greedy decoding gives one caption per image, got {num_return}")
            return self._sample(image_embs, cfg, 1, None, greedy=True)
        if cfg.strategy == "sample":
            return self._sample(image_embs, cfg, num_return, row_seeds, greedy=False)
        if num_return > cfg.num_beams:
            raise ValueError(
                f"num_return: at most num_beams={cfg.num_beams} for beam search, got {num_return}"
            )
        return self._beam(image_embs, cfg, num_return)

    def _sample(
        self, image_embs: torch.Tensor, cfg: DecodeConfig, r: int, row_seeds: list[int] | None, greedy: bool
    ) -> list[list[list[int]]]:
        b = image_embs.shape[0]
        n = b * r
        device = self.device
        uniforms = None
        if not greedy:
            seeds = list(range(n)) if row_seeds is None else list(row_seeds)
            if len(seeds) != n:
                raise ValueError(f"row_seeds: expected {n} seeds (images x num_return), got {len(seeds)}")
            gen = torch.Generator()
            rows = []
            for s in seeds:
                gen.manual_seed(int(s))
                rows.append(torch.rand(cfg.max_len, generator=gen, dtype=torch.float64))
            uniforms = torch.stack(rows).to(device)
        state = self._new_state(image_embs, r, cfg.max_len)
        tokens = torch.full((n, cfg.max_len), self.pad, dtype=torch.long, device=device)
        tokens[:, 0] = self.sot
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        alive = torch.arange(b, device=device)  # images still in the batch
        out_tokens = tokens.clone()
        for t in range(1, cfg.max_len):
            logits = self.step(tokens[:, t - 1 : t], state)
            scores = self._process(logits, tokens[:, :t], cfg)
            if t + 1 == cfg.max_len:
                nxt = torch.full((tokens.shape[0],), self.eos, dtype=torch.long, device=device)
            elif greedy:
                nxt = scores.argmax(dim=-1)
            else:
                nxt = sample_next(scores / cfg.temperature, cfg.top_k, cfg.top_p, uniforms[:, t])
            nxt = torch.where(finished, torch.full_like(nxt, self.pad), nxt)
            tokens[:, t] = nxt
            finished |= (nxt == self.eos) | (nxt == self.pad)
            image_done = finished.view(-1, r).all(dim=1)
            if bool(image_done.any()):
                rows = (alive.unsqueeze(1) * r + torch.arange(r, device=device)).reshape(-1)
                out_tokens[rows, : t + 1] = tokens[:, : t + 1]
                if bool(image_done.all()):
                    break
                keep = (~image_done).nonzero().squeeze(1)
                state.keep_images(keep)
                keep_rows = (keep.unsqueeze(1) * r + torch.arange(r, device=device)).reshape(-1)
                tokens, finished = tokens[keep_rows], finished[keep_rows]
                if uniforms is not None:
                    uniforms = uniforms[keep_rows]
                alive = alive[keep]
        else:
            rows = (alive.unsqueeze(1) * r + torch.arange(r, device=device)).reshape(-1)
            out_tokens[rows] = tokens
        return self._to_lists(out_tokens.view(b, r, -1), stop_at_pad=True)

    def _to_lists(self, tokens: torch.Tensor, stop_at_pad: bool) -> list[list[list[int]]]:
        out = []
        for per_image in tokens.tolist():
            caps = []
            for row in per_image:
                seq = []
                for tok in row[1:]:
                    if tok == self.eos or (stop_at_pad and tok == self.pad):
                        break
                    seq.append(tok)
                caps.append(seq)
            out.append(caps)
        return out

    def _beam(self, image_embs: torch.Tensor, cfg: DecodeConfig, num_return: int) -> list[list[list[int]]]:
        """Group beam search with the bookkeeping of transformers' ``BeamSearchScorer`` (as open_clip uses it)."""
        b = image_embs.shape[0]
        g_num = cfg.num_beam_groups
        s = cfg.num_beams // g_num
        r = cfg.num_beams
        device = self.device
        state = self._new_state(image_embs, r, cfg.max_len)
        tokens = torch.full((b * r, cfg.max_len), self.pad, dtype=torch.long, device=device)
        tokens[:, 0] = self.sot
        beam_scores = torch.full((b, r), -1e9, dtype=torch.float32, device=device)
        beam_scores[:, ::s] = 0.0
        hyps: list[list[list[tuple[float, list[int]]]]] = [[[] for _ in range(g_num)] for _ in range(b)]
        worst = [[1e9] * g_num for _ in range(b)]
        done = [[False] * g_num for _ in range(b)]
        alive = list(range(b))  # original image index of each batch position
        t = 1
        while True:
            na = len(alive)
            logits = self.step(tokens[:, t - 1 : t], state).view(na, r, -1)
            if cfg.beam_score == "log_softmax":
                logits = logits.log_softmax(dim=-1)
            vocab = logits.shape[-1]
            prefix = tokens[:, :t].view(na, r, t)
            new_scores = beam_scores.clone()
            src = torch.arange(na * r, device=device).view(na, r).clone()
            next_tok = torch.full((na, r), self.pad, dtype=torch.long, device=device)
            for g in range(g_num):
                lo, hi = g * s, (g + 1) * s
                group_prefix = prefix[:, lo:hi].reshape(na * s, t)
                scores = self._process(logits[:, lo:hi].reshape(na * s, vocab), group_prefix, cfg)
                if cfg.diversity_penalty > 0 and g > 0:
                    prev = next_tok[:, :lo]
                    freq = torch.zeros(na, vocab, device=device).scatter_add_(
                        1, prev, torch.ones_like(prev, dtype=torch.float32)
                    )
                    scores = scores - cfg.diversity_penalty * freq.repeat_interleave(s, dim=0)
                total = scores.view(na, s, vocab) + beam_scores[:, lo:hi].unsqueeze(-1)
                top_scores, top_idx = torch.topk(
                    total.view(na, s * vocab), 2 * s, dim=1, largest=True, sorted=True
                )
                cand_beam = (top_idx // vocab).tolist()
                cand_tok = (top_idx % vocab).tolist()
                cand_score = top_scores.tolist()
                best_next = top_scores.max(dim=1).values.tolist()
                prefix_rows = prefix[:, lo:hi].tolist()
                for i in range(na):
                    ob = alive[i]
                    if done[ob][g]:
                        continue
                    filled = 0
                    for rank, (bm, tok, sc) in enumerate(zip(cand_beam[i], cand_tok[i], cand_score[i])):
                        if tok == self.eos:
                            if rank >= s:
                                continue
                            self._add_hyp(hyps[ob][g], worst[ob], g, s, prefix_rows[i][bm], sc, t + 1, cfg)
                        else:
                            new_scores[i, lo + filled] = sc
                            next_tok[i, lo + filled] = tok
                            src[i, lo + filled] = i * r + lo + bm
                            filled += 1
                        if filled == s:
                            break
                    if len(hyps[ob][g]) >= s:
                        done[ob][g] = worst[ob][g] >= best_next[i] / ((t + 1) ** cfg.length_penalty)
                beam_scores[:, lo:hi] = new_scores[:, lo:hi]
            src = src.view(-1)
            tokens = tokens.index_select(0, src)
            tokens[:, t] = next_tok.view(-1)
            state.reorder_rows(src)
            t += 1
            finished_images = [i for i, ob in enumerate(alive) if all(done[ob])]
            if len(finished_images) == na or t >= cfg.max_len:
                break
            if finished_images:
                keep = [i for i in range(na) if i not in set(finished_images)]
                keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                state.keep_images(keep_t)
                rows = (keep_t.unsqueeze(1) * r + torch.arange(r, device=device)).reshape(-1)
                tokens = tokens[rows]
                beam_scores = beam_scores[keep_t]
                alive = [alive[i] for i in keep]
        # open beams of unfinished groups become hypotheses too
        final_rows = tokens[:, :t].view(len(alive), r, t).tolist()
        final_scores = beam_scores.tolist()
        for i, ob in enumerate(alive):
            for g in range(g_num):
                if done[ob][g]:
                    continue
                for j in range(g * s, (g + 1) * s):
                    self._add_hyp(hyps[ob][g], worst[ob], g, s, final_rows[i][j], final_scores[i][j], t, cfg)
        out = []
        for ob in range(b):
            candidates = [h for g in range(g_num) for h in hyps[ob][g]]
            ranked = sorted(candidates, key=lambda h: h[0])
            caps = []
            for _ in range(num_return):
                _, seq = ranked.pop()
                caps.append([tok for tok in seq[1:]])
            out.append(caps)
        return out

    @staticmethod
    def _add_hyp(
        group_hyps: list[tuple[float, list[int]]],
        worst: list[float],
        g: int,
        capacity: int,
        seq: list[int],
        sum_score: float,
        length: int,
        cfg: DecodeConfig,
    ) -> None:
        score = sum_score / (length**cfg.length_penalty)
        if len(group_hyps) < capacity or score > worst[g]:
            group_hyps.append((score, list(seq)))
            if len(group_hyps) > capacity:
                ranked = sorted((sc, idx) for idx, (sc, _) in enumerate(group_hyps))
                del group_hyps[ranked[0][1]]
                worst[g] = ranked[1][0]
            else:
                worst[g] = min(score, worst[g])
