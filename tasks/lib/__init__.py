"""Support code of the stages: what two stages share, or what a stage's command line needs around its work.

config (params.yaml -> a typed, frozen Config), common (I/O, errors, the CLI frame), datasets and classifier (the
fetch and classifier machinery), sampling (sharded sampling over Ray actors: sample, sampler_table), scoring and
refstats (FID/KID with the floor and the cached reference statistics: evaluate, sampler_table), inputs (the check of
a run's external inputs), runkey (what a checkpoint was made with), layout (where a run's files are), callbacks (the
interface to the trackers), summary (a finished run's console summary), info (``ddpm info``).

Nothing here imports a stage (tasks/<stage>.py), flows/ or tracking/ (tests/test_architecture.py).
"""
