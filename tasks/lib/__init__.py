"""Support code of the stages: what two stages share, or what a stage's command line needs around its work; each
module has one job.

- config: params.yaml -> a typed, frozen Config, every field marked result, count, report or execution (ddpm/config.py);
  runkey: what a checkpoint was made with (from the marks);
- cli (a stage's command line), errors (what a user can fix), files (atomic writes, JSON, hashes), images
  ([-1, 1] <-> uint8, grids), workers (devices and Ray workers: ``use_gpu``, :func:`~tasks.lib.workers.plan_workers`),
  cluster (the Ray connection);
- shards (the dataset artifact) and datasets (its sources: fetch); classifier (train_classifier, and the features of
  evaluate and sampler_table);
- samples (the samples artifact: read by evaluate, sampler_table and the trackers); sampling (sharded sampling over
  Ray actors: sample, sampler_table); scoring and refstats (the extractor, the cached reference statistics, FID/KID
  and the floor: evaluate, sampler_table);
- inputs (the check of a run's external inputs), layout (where a run's files are), callbacks (the interface to the
  trackers), summary (a finished run's console summary), info (``ddpm info``).

Nothing here imports a stage (tasks/<stage>.py), flows/ or tracking/ (tests/test_architecture.py).
"""
