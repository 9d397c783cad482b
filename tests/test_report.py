"""`make report`: README.md's and BENCHMARKS.md's measured blocks are exactly what the committed records give, a changed
record changes its block, and the demo, inpainting and GPU records carry what the blocks quote."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_demo, report
from benchmarks.inpaint_agreement import score

REPO = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"


def _copy(tmp_path: Path) -> Path:
    """The files the report reads and writes, in a temporary root."""
    for f in ("README.md", "BENCHMARKS.md"):
        shutil.copy2(REPO / f, tmp_path / f)
    shutil.copytree(REPO / RESULTS, tmp_path / RESULTS)
    return tmp_path


def _block(text: str, name: str) -> str:
    return text.split(f"<!-- report:{name}:begin -->\n", 1)[1].split(f"<!-- report:{name}:end -->", 1)[0]


def test_the_committed_files_match_their_records():
    assert report.run(REPO, check=True) == []


def test_a_changed_record_changes_its_blocks_and_a_second_run_changes_nothing(tmp_path, capsys):
    root = _copy(tmp_path)
    path = root / RESULTS / "gpu_h200_2026-11-28.json"
    rows = json.loads(path.read_text())
    row = next(r for r in rows if r["name"] == "train_compiled_bf16_b128")
    row["images_per_s"], row["achieved_tflops"] = 2956.8, 110.3  # 1.10x the paper's 2,688 images/s at batch 128
    path.write_text(json.dumps(rows))

    assert report.main(["--root", str(root), "--check"]) == 1
    stale = capsys.readouterr().err
    assert "BENCHMARKS.md:gpu" in stale and "README.md:speed" in stale and "README.md:demo" not in stale

    assert report.main(["--root", str(root)]) == 0
    readme, bench = (root / "README.md").read_text(), (root / "BENCHMARKS.md").read_text()
    assert "trains at 2,957 images/s compiled (1,874 eager): 1.10x the paper's whole TPU v3-8" in " ".join(
        _block(readme, "speed").split())
    gpu = _block(bench, "gpu")
    # the fraction of the roof measured in the same run (699.4 TFLOP/s) and of the datasheet's dense 989.5
    assert "| training, `torch.compile` | 1 | 128 | 2,957 | 110.3 | 15.8% | 11.1% | 1.10x |" in gpu
    assert "gpu_h200_2026-11-28.json" in gpu  # the block names its record
    # Only the blocks; the hand-written text around them is untouched.
    assert readme.split("<!-- report:speed:begin -->")[0] == (REPO / "README.md").read_text().split(
        "<!-- report:speed:begin -->")[0]
    assert report.run(root, check=True) == []
    before = readme + bench
    assert report.run(root) == []
    assert (root / "README.md").read_text() + (root / "BENCHMARKS.md").read_text() == before


def test_the_tpu_comparison_is_made_only_at_the_papers_batch():
    bench = (REPO / "BENCHMARKS.md").read_text()
    gpu = _block(bench, "gpu")
    for line in gpu.splitlines():
        if line.startswith("| training") and "out of memory" not in line:
            batch = int(line.split("|")[3].replace(",", ""))
            assert line.rstrip(" |").endswith("x") == (batch == 128), line
    readme = (REPO / "README.md").read_text()
    # The claims without a record are gone from the hand-written prose (a generated block may hold the same digits
    # when a record gives them, e.g. a ratio range).
    prose = report.BLOCK_RE.sub("", bench) + report.BLOCK_RE.sub("", readme)
    for old in ("2.0x and 1.45x", "1.96x the throughput", "fractions of peak are against 790", "0.89x", "187 vs 194",
                "53.3%", "1.27×", "9 min 23 s"):
        assert old not in prose, old


def test_a_missing_or_unknown_block_is_refused(tmp_path):
    root = _copy(tmp_path)
    text = (root / "README.md").read_text()
    (root / "README.md").write_text(text.replace("report:inpaint:", "report:inpainting:"))
    with pytest.raises(SystemExit, match="unknown: inpainting; missing: inpaint"):
        report.run(root, check=True)


def _fake_demo(root: Path) -> None:
    """A finished demo's outputs, as the stages and `python -m benchmarks.bench_demo` leave them."""
    (root / "metrics").mkdir(parents=True)
    (root / "samples").mkdir()
    fid = {"values": [0.633, 1.121, 0.873], "mean": 0.8757, "std": 0.2440, "min": 0.633}
    kid = {"values": [0.05, 0.15, 0.11], "mean": 0.1033, "std": 0.0493, "min": 0.05}
    (root / "metrics/eval.json").write_text(json.dumps({
        "feature_extractor": "ddpm-classifier", "num_generated": 360, "num_reference": 1437, "fid": 0.8757,
        "kid_mean": 0.1033, "repeats": 3, "per_repeat": {"fid": fid, "kid_mean": kid},
        "floor": {"fid": 0.518, "kid_mean": -0.076, "num_holdout": 360, "num_reference": 1437},
        "fid_ratio": 0.8757 / 0.518}))
    (root / "metrics/classifier.json").write_text(json.dumps({"accuracy": 0.9917, "num_holdout": 360}))
    (root / "metrics/train.json").write_text(json.dumps({"steps": 1500, "fit_wall_s": 327.0, "ray_startup_s": 5.0}))
    (root / "samples/samples.json").write_text(json.dumps({"count": 1080, "sampler": "ddim", "steps": 100,
                                                           "wall_s": 51.0}))
    row = dict(eta=0.0, kid_mean=0.3, kid_std=0.4, sampler="ddim", wall_s=10.0)
    (root / "metrics/sampler_table.json").write_text(json.dumps({
        "rows": [dict(row, eta=None, sampler="ddpm", steps=1000, fid=1.725, sampling_s=88.5, images_per_s=2.3),
                 dict(row, steps=100, fid=2.089, sampling_s=9.7, images_per_s=20.7),
                 dict(row, steps=10, fid=3.79, sampling_s=0.8, images_per_s=235.3)],
        "floor": {"fid": 1.02, "kid_mean": -0.0385, "num_holdout": 200}, "num_samples": 200, "seeds": [0, 199],
        "checkpoint": "checkpoints/ckpt_00001500.pt", "use_ema": True, "device": "2 Ray sampling actor(s)",
        "feature_extractor": "ddpm-classifier", "num_reference": 1437}))
    (root / "demo_stdout.log").write_text(
        "...\nstages:     fetch ran (2.0 s), train_classifier ran (6.0 s), train ran (332.0 s), sample ran (51.0 s), "
        "evaluate ran (1.0 s), figures ran (19.0 s), sampler_table ran (132.0 s)\ntrain: ...\n")
    (root / "demo_wall.json").write_text(json.dumps({"total_wall_s": 563.0, "git_commit": "abc"}))


def test_the_demo_record_of_a_finished_demo_writes_the_readme_paragraph_and_table(tmp_path):
    demo, root = tmp_path / "demo", tmp_path / "repo"
    root.mkdir()
    _copy(root)
    _fake_demo(demo)
    rec = bench_demo.main(["--records", str(demo), "--results", str(root / RESULTS)])
    assert rec["total_wall_s"] == 563.0 and rec["stages"]["sampler_table"] == {"status": "ran", "wall_s": 132.0}
    assert rec["evaluate"]["fid"]["values"] == [0.633, 1.121, 0.873] and rec["classifier"]["accuracy"] == 0.9917
    saved = json.loads((root / RESULTS / "demo.json").read_text())
    assert saved["command"] == "python -m benchmarks.bench_demo" and saved["machine"]["cpu"]
    assert saved["git_commit"] == "abc"

    assert set(report.run(root)) >= {"README.md:demo", "README.md:sampler_table", "BENCHMARKS.md:results"}
    readme = (root / "README.md").read_text()
    demo_text = " ".join(_block(readme, "demo").split())
    assert "`make demo` takes **9 min 23 s** after install" in demo_text
    assert ("fetch 2 s, train_classifier 6 s, train 332 s (1,500 steps), sample 51 s (3 × 360 images for "
            "`evaluate.repeats: 3`, DDIM at 100 network evaluations), evaluate 1 s, figures 19 s, sampler_table 132 s (each through `dvc repro`, its own "
            "Python process included); the rest (20 s)") in demo_text
    assert ("**0.876 ± 0.244** (mean ± std of 3 disjoint seed ranges of 360 images: 0.633, 1.121, 0.873; min 0.633) "
            "against a real-vs-real floor of 0.518, i.e. 1.69× on the mean, 1.22× on the min; KID 0.103 ± 0.049 "
            "against a floor of -0.076; the classifier's held-out accuracy is 99.2%") in demo_text
    table = _block(readme, "sampler_table")
    assert "| DDPM (Alg. 2) | 1000 | 1.725 | 0.3 | 88.5 | 2.3 |" in table
    assert "| DDIM, η=0 | 10 | 3.79 | 0.3 | 0.8 | 235.3 |" in table
    assert "| real held-out images (floor) | – | 1.02 | -0.0385 | – | – |" in table
    assert "DDPM-1000 took 9.1× the sampling time of DDIM-100 for 10× the network evaluations" in " ".join(table.split())
    assert "1,110 network evaluations per seed, 222,000 in all" in " ".join(table.split())
    assert report.run(root, check=True) == []

    # a record of the solver era (with the table's answer) is written with the stage's own markdown
    from tasks.sampler_table import answer

    rec = json.loads((root / RESULTS / "demo.json").read_text())
    t = rec["sampler_table"]
    t["answer"] = answer(t["rows"], 0.1)
    (root / RESULTS / "demo.json").write_text(json.dumps(rec))
    report.run(root)
    table = " ".join(_block((root / "README.md").read_text(), "sampler_table").split())
    assert "| sampler | NFE | FID | ± (bootstrap) | / DDPM | holds |" in table
    assert "No row holds DDPM's quality" in table and "the rows cost 1,110 network evaluations per seed" in table


def test_without_a_full_demo_record_the_readme_says_so(tmp_path):
    root = _copy(tmp_path)
    (root / RESULTS / "demo.json").unlink()
    report.run(root)
    readme = (root / "README.md").read_text()
    assert "no record yet" in _block(readme, "demo") and "No record yet" in _block(readme, "sampler_table")
    assert "not recorded" in _block(readme, "demo")  # the citation names the missing file


def test_inpainting_score_counts_labels_and_changed_known_pixels():
    rng = np.random.default_rng(0)
    holdout = rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3])
    known = np.zeros((1, 8, 8), bool)
    known[:, :4] = True  # bottom half to fill
    seeds = np.arange(10, 18)  # base seed 10: samples 0..7 start from held-out images 0,1,2,3,0,1,2,3
    images = holdout[(seeds - 10) % 4].copy()
    images[:, :, 4:] = 0  # the fill
    classify = lambda x: np.where(x[:, 0, 0, 0] == holdout[1, 0, 0, 0], 1, 0)  # right for image 0 and 1 only
    s = score(images, seeds, 10, holdout, labels, known, classify)
    assert s["count"] == 8 and s["distinct_originals"] == 4 and s["known_pixels"] == 8 * 32
    assert s["known_pixels_differing"] == 0
    assert s["label_agreement"] == pytest.approx(0.5) and s["classifier_accuracy_on_originals"] == pytest.approx(0.5)
    images[3, 0, 1, 2] ^= 1  # one known pixel changed
    assert score(images, seeds, 10, holdout, labels, known, classify)["known_pixels_differing"] == 1


def test_machine_records_the_cpu_without_diffusers(monkeypatch):
    import importlib.metadata

    from benchmarks.common import machine

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)  # the bench extra not installed
    monkeypatch.setitem(sys.modules, "diffusers", None)  # and never imported
    m = machine()
    assert m["diffusers"] is None and m["cpu"] and m["cpu"] != "unknown"


def test_gpu_bench_smoke_records_the_measured_roof_and_the_datasheet_apart(tmp_path):
    import benchmarks.gpu_bench as gb

    try:
        assert gb.main(["--smoke", "--skip-compile", "--only", "train_eager_128", "--out", str(tmp_path)]) == 0
    finally:
        gb.DEV, gb.MODEL = "cuda", gb.CIFAR10
    rows = json.loads((tmp_path / "gpu_results.json").read_text())
    machine = rows[0]
    assert machine["name"] == "machine" and machine["cpu"] and "datasheet_dense_bf16_tflops" in machine
    assert "peak_tflops_assumed" not in machine
    roof = next(r for r in rows if r["name"].startswith("bf16_matmul_"))
    assert roof["roof"] is True and roof["tflops"] > 0
    train = next(r for r in rows if r["name"].startswith("train_eager"))
    assert train["fraction_of_roof"] > 0 and train["fraction_of_datasheet"] is None  # no datasheet for a CPU
    assert "fraction_of_peak" not in train


def test_one_command_runs_the_demo_then_inpainting_and_records_what_records_rebuilds(tmp_path, monkeypatch):
    """`python -m benchmarks.bench_demo` without --records: the demo's run (faked here: the flow takes ~10 min) is
    recorded, the inpainting measurement runs on the same folder, and --records on that folder gives the same record."""
    from benchmarks import inpaint_agreement, repro_bounds

    out, results = tmp_path / "out", tmp_path / "results"

    def fake_run(folder):
        _fake_demo(folder)
        return (folder / "demo_stdout.log").read_text(), 563.0

    calls = []
    monkeypatch.setattr(bench_demo, "run_demo", fake_run)
    monkeypatch.setattr(inpaint_agreement, "main", lambda argv: calls.append(("inpaint", argv)))
    monkeypatch.setattr(repro_bounds, "main", lambda argv: calls.append(("repro", argv)))
    first = bench_demo.main(["--keep", str(out), "--results", str(results)])
    argv = ["--root", str(out.resolve()), "--results", str(results)]
    assert calls == [("inpaint", argv), ("repro", argv)]
    again = bench_demo.main(["--records", str(out), "--results", str(results)])
    saved = json.loads((results / "demo.json").read_text())
    assert saved["command"] == "python -m benchmarks.bench_demo"
    for key in ("total_wall_s", "stages", "evaluate", "classifier", "sampler_table", "git_commit"):
        assert first[key] == again[key], key


def test_repro_bounds_compare_and_its_readme_sentence(tmp_path):
    import torch

    from benchmarks.repro_bounds import compare

    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0] = 3e-6  # round-off: no uint8 level moves
    b[1, 0, 1, 1] = 0.02  # ~2.5 levels of 255 over [-1, 1]
    c = compare(a, b)
    assert c["max_abs_diff"] == pytest.approx(0.02) and not c["bitwise_equal"]
    assert c["uint8_pixels"] == 32 and c["uint8_pixels_differing"] == 1 and c["uint8_max_levels"] in (2, 3)
    assert compare(a, a.clone())["bitwise_equal"]

    root = tmp_path / "repo"
    shutil.copytree(report.REPO / "benchmarks" / "results", root / "benchmarks" / "results")
    shutil.copy(report.REPO / "README.md", root / "README.md")
    shutil.copy(report.REPO / "BENCHMARKS.md", root / "BENCHMARKS.md")
    rows = [{"eta": 1.0, "what": "seeds 0-7, batch 8, 1 thread, twice", "max_abs_diff": 0.0, "bitwise_equal": True,
             "uint8_pixels": 512, "uint8_pixels_differing": 0, "uint8_max_levels": 0},
            {"eta": 1.0, "what": "seeds 0-7, batch 8: 1 vs 2 threads", "max_abs_diff": 3e-6, "bitwise_equal": False,
             "uint8_pixels": 512, "uint8_pixels_differing": 0, "uint8_max_levels": 0},
            {"eta": 1.0, "what": "seeds 0-7, 1 thread: batch 8 vs batches 3+5", "max_abs_diff": 4e-6,
             "bitwise_equal": False, "uint8_pixels": 512, "uint8_pixels_differing": 0, "uint8_max_levels": 0},
            {"eta": 1.0, "what": "seeds 0-359, 1 thread: batch 90 vs batch 8", "max_abs_diff": 5e-5,
             "bitwise_equal": False, "uint8_pixels": 23040, "uint8_pixels_differing": 2, "uint8_max_levels": 1}]
    (root / "benchmarks" / "results" / "repro.json").write_text(json.dumps({
        "command": "python -m benchmarks.repro_bounds", "checkpoint": "ckpt_00001500.pt", "sampler": "ddim-100",
        "rows": rows, "machine": {"cpu": "Some CPU", "date": "2026-11-29 00:00 UTC"}}))
    assert report.run(root) == ["README.md:repro"]
    block = (root / "README.md").read_text().split("<!-- report:repro:begin -->")[1].split("<!-- report:repro:end")[0]
    text = " ".join(block.split())
    assert "Measured on Some CPU" in text and "sampled twice is bitwise equal" in text
    assert "3 and 5 differ by 4.0e-06" in text and "1 vs 2 threads by 3.0e-06" in text
    assert ("largest difference was 5.0e-05 (seeds 0-359, 1 thread: batch 90 vs batch 8, η = 1); at most 2 of "
            "23,040 uint8 pixels moved (seeds 0-359, 1 thread: batch 90 vs batch 8, η = 1), by at most 1 level") in text
