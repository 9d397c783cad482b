"""How a stage's work is laid out (tasks/lib/workers.py): ``use_gpu`` resolved by one rule, and one plan_workers for
the training workers and the sampling actors, from the resources a Ray cluster reports."""

from __future__ import annotations

import pytest

from tasks.lib.errors import StageError
from tasks.lib.workers import WorkerPlan, plan_workers, resolve_gpu


def test_use_gpu_auto_takes_a_gpu_when_there_is_one_and_true_refuses_none():
    assert resolve_gpu("auto", 1, "train.use_gpu", "the Ray cluster") is True
    assert resolve_gpu("auto", 0, "train.use_gpu", "the Ray cluster") is False
    assert resolve_gpu(False, 4, "train.use_gpu", "the Ray cluster") is False
    assert resolve_gpu(True, 0.5, "train.use_gpu", "the Ray cluster") is True  # a share is a GPU to run on
    with pytest.raises(StageError, match=r"^sample.use_gpu: true but the Ray cluster has no GPU; set it to auto or "
                                         r"false$"):
        resolve_gpu(True, 0, "sample.use_gpu", "the Ray cluster")


def test_training_workers_share_the_cpus_and_must_all_fit():
    two = plan_workers("train", 2, "auto", {"CPU": 16.0})
    assert two == WorkerPlan(workers=2, use_gpu=False, cpus=8, gpus=0.0, threads=8)
    assert two.resources == {"CPU": 8} and two.each() == "8 CPU(s)"
    # Ray Data's read tasks need a CPU the workers leave free
    assert plan_workers("train", 2, False, {"CPU": 2.0}, spare_cpu=True).cpus == 0.5
    with pytest.raises(StageError, match=r"^train.num_workers: 3 workers need 3 CPUs, the Ray cluster has 2$"):
        plan_workers("train", 3, False, {"CPU": 2.0})


def test_training_workers_on_gpus_and_shares_of_one():
    gpu = plan_workers("train", 2, "auto", {"CPU": 16.0, "GPU": 2.0})
    assert (gpu.use_gpu, gpu.cpus, gpu.gpus, gpu.threads, gpu.resources) == (True, 1, 1.0, 1, {"CPU": 1, "GPU": 1.0})
    halves = plan_workers("train", 2, True, {"CPU": 4.0, "GPU": 1.0}, gpus_per_worker=0.5)
    assert (halves.workers, halves.gpus, halves.each()) == (2, 0.5, "0.5 GPU")
    with pytest.raises(StageError, match=r"^train.num_workers: 3 GPU workers of 0.5 GPU each need 2 GPUs, the Ray "
                                         r"cluster has 1; lower train.num_workers or set train.use_gpu: auto$"):
        plan_workers("train", 3, True, {"CPU": 4.0, "GPU": 1.0}, gpus_per_worker=0.5)


def test_sampling_actors_are_capped_by_the_work_and_what_fits():
    """An actor waiting for resources would hold its share of the shards forever: never more actors than shards, than
    asked, or than fit; each CPU actor has the fixed thread count the images' last bits depend on."""
    assert plan_workers("sample", 4, False, {"CPU": 2.0}, threads=1, jobs=10) == WorkerPlan(2, False, 1, 0.0, 1)
    assert plan_workers("sample", 4, False, {"CPU": 16.0}, threads=1, jobs=3).workers == 3
    assert plan_workers("sample", 2, False, {"CPU": 16.0}, threads=1, jobs=10).workers == 2
    on_gpus = plan_workers("sample", 4, "auto", {"CPU": 16.0, "GPU": 2.0}, threads=1, jobs=10)
    assert (on_gpus.workers, on_gpus.use_gpu, on_gpus.gpus, on_gpus.threads) == (2, True, 1.0, 1)
    with pytest.raises(StageError, match="^sample.use_gpu: true but the Ray cluster has no GPU"):
        plan_workers("sample", 2, True, {"CPU": 16.0}, threads=1, jobs=10)


def test_work_in_this_process_takes_the_same_rule(monkeypatch):
    import torch

    from tasks.lib.workers import local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device("auto", "sample.use_gpu") == torch.device("cpu")
    with pytest.raises(StageError, match=r"^sample.use_gpu: true but this machine has no GPU; set it to auto or false"):
        local_device(True, "sample.use_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_device("auto", "sample.use_gpu") == torch.device("cuda")
