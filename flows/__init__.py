"""Prefect orchestration of the pipeline stages: the ``train-eval`` flow (:mod:`flows.train_eval`) and a
``serve`` entry point for its deployments (:mod:`flows.serve`). Only sequencing, caching, logging and
artifacts live here; every stage is a plain function in ``tasks/``."""
