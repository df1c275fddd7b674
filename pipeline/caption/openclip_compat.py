"""Compatibility shim that lets open_clip 3.3.0's own ``CoCa.generate`` run with transformers >= 4.56.

Used ONLY to run open_clip's reference decoding path (equality tests, ``benchmarks/bench_caption.py``);
our captioners decode with :mod:`pipeline.caption.decode` and never need it.

open_clip imports ``BeamSearchScorer`` from ``transformers`` / ``transformers.generation``; transformers
4.56+ keeps it only in ``transformers.generation.beam_search``, so open_clip marks transformers as missing
and every ``generate`` call fails an assertion. This sets the names open_clip
looks for on its ``coca_model`` module.

    from pipeline.caption.openclip_compat import enable_open_clip_generate
    enable_open_clip_generate()
    model.generate(images, generation_type="top_k", top_k=1)
"""

from __future__ import annotations


def enable_open_clip_generate() -> None:
    """Make ``open_clip.coca_model.CoCa.generate`` usable (idempotent)."""
    import open_clip.coca_model as coca_model

    if getattr(coca_model, "_has_transformers", False) and hasattr(coca_model, "BeamSearchScorer"):
        return
    from transformers import (
        EosTokenCriteria,
        LogitsProcessorList,
        MaxLengthCriteria,
        MinLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        StoppingCriteriaList,
        StopStringCriteria,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    from transformers.generation.beam_search import BeamSearchScorer

    names = {
        "LogitsProcessorList": LogitsProcessorList,
        "TopPLogitsWarper": TopPLogitsWarper,
        "TopKLogitsWarper": TopKLogitsWarper,
        "RepetitionPenaltyLogitsProcessor": RepetitionPenaltyLogitsProcessor,
        "MinLengthLogitsProcessor": MinLengthLogitsProcessor,
        "MaxLengthCriteria": MaxLengthCriteria,
        "StopStringCriteria": StopStringCriteria,
        "EosTokenCriteria": EosTokenCriteria,
        "StoppingCriteriaList": StoppingCriteriaList,
        "BeamSearchScorer": BeamSearchScorer,
    }
    for name, value in names.items():
        setattr(coca_model, name, value)
    coca_model.GENERATION_TYPES = {
        "top_k": TopKLogitsWarper,
        "top_p": TopPLogitsWarper,
        "beam_search": "beam_search",
    }
    coca_model._has_transformers = True
