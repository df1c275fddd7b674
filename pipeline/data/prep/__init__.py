"""Data prep: DataComp / DataCompDR-style image-text pairs into WebDataset shards (``python -m data_prep.shard``).

Modules: ``sources`` (parquet / folder inputs, image fetching, synthetic captions, img2dataset joins),
``images`` (safe decode, resize, re-encode), ``filters``, ``writer`` (deterministic atomic shards, stats,
``sizes.json``, ``manifest.json``), ``subsets`` (nested uid-hash subsets), ``safe_tar`` (reading external
tars), ``executors`` (local pool / Ray / SLURM array task ranges) and ``job`` (plan, per-shard work, merge).
See docs/data-prep.md.
"""
