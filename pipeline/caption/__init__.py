"""Synthetic captions for shards (DataCompDR-style): decoding, captioners, the caption job, quality filter.

``decode`` (cached CoCa decoding), ``captioners`` (CoCa / Hugging Face behind one interface), ``job`` (shard work
units, resume, outputs, executors), ``quality`` (CLIP-score filter), ``train_coca`` and ``loop`` (the synthetic
world closes the loop). Command line: ``python -m data_prep.caption --help``; see docs/captioning.md.
"""
