"""`make report`: the measured blocks of README.md, BENCHMARKS.md and docs/ are exactly what the committed records give,
a changed record changes its block, the demo and GPU records carry what the blocks quote, and every relative link of
the Markdown pages resolves."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks import bench_demo, report, run_all

REPO = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
PAGES = ["README.md", "BENCHMARKS.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))]


def _copy(tmp_path: Path) -> Path:
    """The files the report reads and writes, in a temporary root."""
    for f in report.BLOCKS:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, tmp_path / f)
    shutil.copytree(REPO / RESULTS, tmp_path / RESULTS)
    return tmp_path


def _block(text: str, name: str) -> str:
    return text.split(f"<!-- report:{name}:begin -->\n", 1)[1].split(f"<!-- report:{name}:end -->", 1)[0]


def _flat(text: str) -> str:
    return " ".join(text.split())


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
    assert capsys.readouterr().err.strip() == "stale report blocks (run `make report`): BENCHMARKS.md:gpu"

    assert report.main(["--root", str(root)]) == 0
    bench = (root / "BENCHMARKS.md").read_text()
    gpu = _block(bench, "gpu")
    # the fraction of the roof measured in the same run (699.4 TFLOP/s) and of the datasheet's dense 989.5
    assert "| `train_compiled_bf16_b128` | 1 | 128 | 2,957 | 110.3 | 15.8% | 11.1% | 1.10x | >= 6,000: not met |" in gpu
    assert "[gpu_h200_2026-11-28.json](benchmarks/results/gpu_h200_2026-11-28.json)" in gpu  # names its record
    # Only the block; the hand-written text around it is untouched.
    old = (REPO / "BENCHMARKS.md").read_text()
    assert bench.split("<!-- report:gpu:begin -->")[0] == old.split("<!-- report:gpu:begin -->")[0]
    assert bench.split("<!-- report:gpu:end -->")[1] == old.split("<!-- report:gpu:end -->")[1]
    assert report.run(root, check=True) == []
    before = {f: (root / f).read_text() for f in report.BLOCKS}
    assert report.run(root) == []
    assert {f: (root / f).read_text() for f in report.BLOCKS} == before


def test_the_tpu_comparison_is_made_only_at_the_papers_batch():
    gpu = _block((REPO / "BENCHMARKS.md").read_text(), "gpu")
    rows = [line.split(" | ") for line in gpu.splitlines() if line.startswith("| `train_") and "memory" not in line]
    assert len(rows) == 8
    for cells in rows:
        assert cells[7].endswith("x") == (cells[2] == "128"), cells
    # The claims without a record are gone from the hand-written prose (a generated block may hold the same digits
    # when a record gives them).
    prose = "".join(report.BLOCK_RE.sub("", (REPO / p).read_text()) for p in PAGES)
    for old in ("2.0x and 1.45x", "1.96x the throughput", "fractions of peak are against 790", "187 vs 194", "53.3%",
                "1.27×", "9 min 23 s", "7.7% and 2.9%", "flow_overhead.json)", "benchmarks/TUNING.md)"):
        assert old not in prose, old


def test_docs_links_point_into_docs_and_blocks_link_their_records_from_where_they_are():
    sampling = (REPO / "docs/sampling.md").read_text()
    assert "[benchmarks/results/demo.json](../benchmarks/results/demo.json)" in _block(sampling, "sampler_table")
    assert "[benchmarks/results/demo.json](benchmarks/results/demo.json)" in _block(
        (REPO / "README.md").read_text(), "demo")


def test_a_missing_or_unknown_block_is_refused(tmp_path):
    root = _copy(tmp_path)
    text = (root / "docs/sampling.md").read_text()
    (root / "docs/sampling.md").write_text(text.replace("report:inpaint:", "report:inpainting:"))
    with pytest.raises(SystemExit, match="docs/sampling.md: report blocks unknown: inpainting; missing: inpaint"):
        report.run(root, check=True)


def _fake_demo(root: Path) -> None:
    """A finished demo's outputs, as the stages and `python -m benchmarks.bench_demo` leave them."""
    from tasks.sampler_table import answer

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
    rows = [dict(row, eta=None, sampler="ddpm", steps=1000, fid=1.725, sampling_s=88.5, images_per_s=2.3),
            dict(row, steps=100, fid=2.089, sampling_s=9.7, images_per_s=20.7),
            dict(row, steps=10, fid=3.79, sampling_s=0.8, images_per_s=235.3)]
    (root / "metrics/sampler_table.json").write_text(json.dumps({
        "rows": rows, "answer": answer(rows, 0.1),
        "floor": {"fid": 1.02, "kid_mean": -0.0385, "num_holdout": 200}, "num_samples": 200, "seeds": [0, 199],
        "checkpoint": "checkpoints/ckpt_00001500.pt", "use_ema": True, "device": "2 Ray sampling actor(s)",
        "feature_extractor": "ddpm-classifier", "num_reference": 1437}))
    (root / "demo_stdout.log").write_text(
        "...\nstages:     fetch ran (2.0 s), train_classifier ran (6.0 s), train ran (332.0 s), sample ran (51.0 s), "
        "evaluate ran (1.0 s), figures ran (19.0 s), sampler_table ran (132.0 s)\ntrain: ...\n")
    (root / "demo_wall.json").write_text(json.dumps({"total_wall_s": 563.0, "git_commit": "abc"}))


def test_the_demo_record_of_a_finished_demo_writes_the_readme_table_and_the_sampler_table(tmp_path):
    demo, root = tmp_path / "demo", tmp_path / "repo"
    _copy(root)
    _fake_demo(demo)
    rec = bench_demo.main(["--records", str(demo), "--results", str(root / RESULTS)])
    assert rec["total_wall_s"] == 563.0 and rec["stages"]["sampler_table"] == {"status": "ran", "wall_s": 132.0}
    assert rec["evaluate"]["fid"]["values"] == [0.633, 1.121, 0.873] and rec["classifier"]["accuracy"] == 0.9917
    saved = json.loads((root / RESULTS / "demo.json").read_text())
    assert saved["command"] == "python -m benchmarks.bench_demo" and saved["machine"]["cpu"]
    assert saved["git_commit"] == "abc"

    assert set(report.run(root)) == {"README.md:demo", "docs/sampling.md:sampler_table", "BENCHMARKS.md:results"}
    table = _block((root / "README.md").read_text(), "demo")
    assert "| `make demo` after install | **9 min 23 s** |" in table
    assert ("| each stage (its own process, through `dvc repro`) | fetch 2 s, train_classifier 6 s, train 332 s "
            "(1,500 steps), sample 51 s (3 × 360 images, DDIM at 100 NFE), evaluate 1 s, figures 19 s, sampler_table "
            "132 s |") in table
    assert "| **0.876 ± 0.244** (0.633, 1.121, 0.873) |" in table
    assert "| real-vs-real floor; FID / floor | 0.518; 1.69x on the mean, 1.22x on the best range |" in table
    assert "| KID (floor) | 0.103 ± 0.049 (-0.076) |" in table and "| 99.2% |" in table
    sampler = _flat(_block((root / "docs/sampling.md").read_text(), "sampler_table"))
    assert "| DDPM (Alg. 2) | 1000 | 1.725 | – | – | ref | 0.3 | 88.5 | 2.3 |" in sampler
    assert "| DDIM, η=0 | 10 | 3.79 | – | 2.20 | no | 0.3 | 0.8 | 235.3 |" in sampler
    assert "| real held-out images (floor) | – | 1.02 | – | – | – | -0.0385 | – | – |" in sampler
    assert "No row holds DDPM's quality" in sampler
    assert "the rows cost 1,110 network evaluations per seed, 222,000 in all; the stage took 2 min 12 s" in sampler
    assert "| 5 | `make demo` end to end | params.yaml (digits); stages in README.md | 9 min 23 s |" in _block(
        (root / "BENCHMARKS.md").read_text(), "results")
    assert report.run(root, check=True) == []


def test_records_needs_the_demos_output(tmp_path):
    _fake_demo(tmp_path / "demo")
    (tmp_path / "demo/demo_stdout.log").unlink()
    with pytest.raises(SystemExit, match="demo_stdout.log missing: --records reads the stage walls from the demo's"):
        bench_demo.main(["--records", str(tmp_path / "demo"), "--results", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()


def test_without_a_demo_record_the_pages_say_so(tmp_path):
    root = _copy(tmp_path)
    (root / RESULTS / "demo.json").unlink()
    assert set(report.run(root)) == {"README.md:demo", "docs/sampling.md:sampler_table", "BENCHMARKS.md:results"}
    for page, name in (("README.md", "demo"), ("docs/sampling.md", "sampler_table")):
        block = _flat(_block((root / page).read_text(), name))
        assert block.startswith("No record yet: benchmarks/results/demo.json is missing"), block
        assert "(benchmarks/results/demo.json: not recorded)" in block  # the citation names the missing file
    assert "| 5 |" not in _block((root / "BENCHMARKS.md").read_text(), "results")  # the other rows stay


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


def test_one_command_runs_the_demo_and_records_what_records_rebuilds(tmp_path, monkeypatch):
    """`python -m benchmarks.bench_demo` without --records: the demo's run (faked here: the flow takes ~10 min) is
    recorded, and --records on its folder gives the same record."""
    out, results = tmp_path / "out", tmp_path / "results"

    def fake_run(folder):
        _fake_demo(folder)
        return (folder / "demo_stdout.log").read_text(), 563.0

    monkeypatch.setattr(bench_demo, "run_demo", fake_run)
    first = bench_demo.main(["--keep", str(out), "--results", str(results)])
    again = bench_demo.main(["--records", str(out), "--results", str(results)])
    assert json.loads((results / "demo.json").read_text())["command"] == "python -m benchmarks.bench_demo"
    for key in ("total_wall_s", "stages", "evaluate", "classifier", "sampler_table", "git_commit"):
        assert first[key] == again[key], key


def test_a_repro_record_writes_its_table_into_the_pipeline_page(tmp_path):
    root = _copy(tmp_path)
    rows = [{"eta": 1.0, "what": "seeds 0-7, batch 8, 1 thread, twice", "max_abs_diff": 0.0, "bitwise_equal": True,
             "uint8_pixels": 512, "uint8_pixels_differing": 0, "uint8_max_levels": 0},
            {"eta": 1.0, "what": "seeds 0-359, 1 thread: batch 90 vs batch 8", "max_abs_diff": 5e-5,
             "bitwise_equal": False, "uint8_pixels": 23040, "uint8_pixels_differing": 2, "uint8_max_levels": 1}]
    (root / RESULTS / "repro.json").write_text(json.dumps({
        "command": "python -m benchmarks.repro_bounds --root /tmp/x", "checkpoint": "ckpt_00001500.pt",
        "sampler": "ddim-100", "network": "digits preset", "rows": rows,
        "machine": {"cpu": "Some CPU", "date": "2026-11-29 00:00 UTC"}}))
    assert report.run(root) == ["docs/pipeline.md:repro"]
    block = _block((root / "docs/pipeline.md").read_text(), "repro")
    assert "| seeds 0-7, batch 8, 1 thread, twice | 1 | yes | 0.0e+00 | 0 of 512 | 0 |" in block
    assert "| seeds 0-359, 1 thread: batch 90 vs batch 8 | 1 | no | 5.0e-05 | 2 of 23,040 | 1 |" in block
    assert ("ddim-100 of `ckpt_00001500.pt` (digits preset); Some CPU, 2026-11-29 00:00 UTC; `python -m "
            "benchmarks.repro_bounds`.") in _flat(block)


def test_run_all_refuses_an_unknown_benchmark_by_name():
    with pytest.raises(SystemExit, match="unknown benchmark.s. nope; known: train, sample, sample_compile, ray"):
        run_all.main(["--only", "train,nope"])


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_of_the_markdown_pages_resolves():
    """A link or image to a file of this repository points at one that exists, and its #anchor at a heading there."""
    checked, broken = 0, []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", (REPO / page).read_text(), flags=re.S)  # code blocks hold no links
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", link):  # http(s), mailto
                continue
            path, _, anchor = link.partition("#")
            target = (REPO / page).parent / path if path else REPO / page
            checked += 1
            if not target.exists():
                broken.append(f"{page}: {link}: no such file")
            elif anchor and anchor not in _anchors(target):
                broken.append(f"{page}: {link}: no heading #{anchor} in {target.name}")
    assert broken == [] and checked > 50, (checked, broken)
