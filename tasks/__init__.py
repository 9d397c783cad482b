"""Pipeline stages: fetch -> train_classifier -> train (Ray Train) -> sample (Ray actors) -> evaluate.

Each module is a plain ``run(cfg, <input paths>, <output paths>)`` plus a ``python -m tasks.<stage>`` command
line that ``dvc.yaml`` calls and the Prefect flow wraps. Stages pass paths, never tensors.
"""
