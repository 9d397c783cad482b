"""The pipeline's stages, one module each, named as in dvc.yaml: fetch -> train_classifier -> train (Ray Train) ->
sample (Ray actors) -> evaluate -> figures, sampler_table.

Each stage module is a plain ``run(cfg, <input paths>, <output paths>)`` plus the ``python -m tasks.<stage>``
command line that dvc.yaml calls (and the Prefect flow runs through ``dvc repro``). Stages pass paths, never
tensors, and never import each other: what two stages share is support code in :mod:`tasks.lib`.
"""
