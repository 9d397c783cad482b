"""The figures stage (tasks/figures.py) and the sampler table (tasks/sampler_table.py) on the tiny config: each figure
has the right size and count of panels, and the panels hold what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tasks import figures, sampler_table
from tasks.figures import cell_size, grid_shape, panel_grid

FIG = {"figures.enabled": True, "figures.seeds": 2, "figures.frames": 4, "figures.recon_images": 3,
       "figures.recon_seeds": 2, "figures.recon_fractions": [1.0, 0.5, 0.0], "figures.gif_samples": 5,
       "figures.gif_frames": 3}


def _panel(grid: np.ndarray, row: int, col: int, side: int) -> np.ndarray:
    """The panel at (row, col) of a panel_grid, one channel, downscaled back to the image's own pixels."""
    c = cell_size(side)
    y, x = 2 + row * (c + 2), 2 + col * (c + 2)
    scale = c // side
    return grid[y:y + c:scale, x:x + c:scale, 0]


def test_panel_grid_size_and_placement():
    imgs = np.arange(7 * 64, dtype=np.uint8).reshape(7, 1, 8, 8)
    g = panel_grid(imgs, ncol=3)
    assert g.shape == (*grid_shape(3, 3, 8), 3) == (3 * 34 + 2, 3 * 34 + 2, 3)
    assert np.array_equal(_panel(g, 1, 2, 8), imgs[5, 0])
    assert (g[:2] == 255).all()  # white padding
    big = np.zeros((2, 3, 40, 40), np.uint8)
    assert panel_grid(big, 2).shape == (*grid_shape(1, 2, 40), 3) == (44, 86, 3)  # no upscaling past 32 px


def test_figures_on_the_tiny_config(tiny_config, tiny_trained, tmp_path):
    from tasks.lib.shards import load_dataset

    cfg = tiny_config(FIG)
    out = tmp_path / "figs"
    inputs = (tiny_trained / "checkpoints", tiny_trained / "dataset", tiny_trained / "train_loss.tsv")
    summary = figures.run(cfg, *inputs, out)
    assert json.loads((out / "figures.json").read_text()) == summary
    assert summary["sampler"] == "ddim-5 (eta 0, trailing)" and summary["checkpoint_step"] == 6

    # 1. progressive: 2 seeds x (x_t row, x0 row), 4 columns evenly spaced over the 5 DDIM steps (trailing: the
    # chain starts at t = T = 100), T .. 0
    prog = summary["progressive"]
    assert (prog["rows"], prog["cols"]) == (4, 4) and prog["timesteps"] == [100, 80, 40, 20]
    with Image.open(out / prog["file"]) as im:
        assert im.size[::-1] == grid_shape(4, 4, 8)

    # 2. one reconstruction PNG per t: 3 held-out images x (original, diffused, 2 reconstructions)
    holdout = load_dataset(tiny_trained / "dataset").holdout.images
    recon = summary["reconstruction"]
    assert [r["t"] for r in recon] == [100, 50, 0]
    assert sorted(p.name for p in out.glob("reconstruction_t*.png")) == [
        "reconstruction_t0000.png", "reconstruction_t0050.png", "reconstruction_t0100.png"]
    for r in recon:
        g = np.asarray(Image.open(out / r["file"]).convert("RGB"))
        assert g.shape[:2] == grid_shape(3, 4, 8) and (r["rows"], r["cols"]) == (3, 4)
        for i in range(3):
            assert np.array_equal(_panel(g, i, 0, 8), holdout[i, 0])  # column 0: the original
        recons = [_panel(g, i, c, 8) for i in range(3) for c in (2, 3)]
        if r["t"] == 0:  # not diffused at all: input and reconstructions are the original
            assert all(np.array_equal(_panel(g, i, c, 8), holdout[i, 0]) for i in range(3) for c in (1, 2, 3))
        else:
            assert not np.array_equal(_panel(g, 0, 1, 8), holdout[0, 0])
            assert not all(np.array_equal(_panel(g, i, 2, 8), _panel(g, i, 3, 8)) for i in range(3)), \
                "different seeds, different reconstructions"
            assert len(recons) == 6

    # 3. the GIF: 3 frames of a 3x3 grid (5 samples)
    gif = summary["animation"]
    with Image.open(out / gif["file"]) as im:
        assert im.n_frames == gif["frames"] == 3
        assert im.size[::-1] == grid_shape(2, 3, 8) and (gif["rows"], gif["cols"]) == (2, 3)

    # 4. the loss curve of the 6 logged steps
    with Image.open(out / summary["loss"]["file"]) as im:
        assert im.format == "PNG" and im.size == (600, 350)
    assert summary["loss"]["points"] == 6 and summary["loss"]["last_step"] == 6

    # Fewer fractions later: the stale PNG goes; disabled: only figures.json, no stale figures
    figures.run(tiny_config({**FIG, "figures.recon_fractions": [0.5]}), *inputs, out)
    assert [p.name for p in out.glob("reconstruction_t*.png")] == ["reconstruction_t0050.png"]
    assert figures.run(tiny_config(), *inputs, out) == {"enabled": False}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "figures.json"]


def test_figures_bad_inputs_are_one_line(tiny_config, tiny_trained, tmp_path, capsys):
    from tasks.lib.errors import DataError

    bad = tmp_path / "loss.tsv"
    bad.write_text("step\tloss\n1\tnot-a-number\n")
    with pytest.raises(DataError, match="loss.tsv: not a loss log"):
        figures.read_loss(bad)
    with pytest.raises(DataError, match="figures.recon_images"):
        figures.run(tiny_config({**FIG, "figures.recon_images": 10_000}), tiny_trained / "checkpoints",
                    tiny_trained / "dataset", tiny_trained / "train_loss.tsv", tmp_path / "f")
    params = tmp_path / "params.yaml"
    params.write_text("figures:\n  frames: 1\n")
    with pytest.raises(SystemExit) as e:
        from tasks.lib.cli import run_cli

        run_cli(figures.main, ["--params", str(params), "--out", str(tmp_path / "g")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: figures.frames: input should be greater than 1, got 1"]
    assert not (tmp_path / "g").exists()


def test_sampler_table_rows_and_markdown(tiny_config):
    cfg = tiny_config({"sampler_table.enabled": True, "sampler_table.num_samples": 10,
                       "sampler_table.ddim_steps": [20, 5, 10, 5], "sampler_table.solvers": ["unipc", "dpm++2m-sde"],
                       "sampler_table.solver_steps": [10, 5]})
    assert sampler_table.settings(cfg) == [{"sampler": "ddpm", "steps": 100, "eta": None},
                                           {"sampler": "ddim", "steps": 20, "eta": 0.0},
                                           {"sampler": "ddim", "steps": 10, "eta": 0.0},
                                           {"sampler": "ddim", "steps": 5, "eta": 0.0},
                                           {"sampler": "unipc", "steps": 5, "eta": None},
                                           {"sampler": "unipc", "steps": 10, "eta": None},
                                           {"sampler": "dpm++2m-sde", "steps": 5, "eta": None},
                                           {"sampler": "dpm++2m-sde", "steps": 10, "eta": None}]
    assert [r["steps"] for r in sampler_table.settings(tiny_config({"sampler_table.ddpm": False,
                                                                     "sampler_table.solvers": []}))] == [100, 50, 20, 10]
    assert [sampler_table.row_name(r) for r in sampler_table.settings(cfg)[-2:]] == ["dpmpp2m_sde5", "dpmpp2m_sde10"]
    rows = [{"sampler": "ddpm", "steps": 100, "fid": 1.0, "fid_std": 0.05, "kid_mean": 0.01, "sampling_s": 12.0,
             "wall_s": 14.0, "images_per_s": 0.8},
            {"sampler": "ddim", "steps": 10, "fid": 3.25, "fid_std": 0.2, "fid_delta_std": 0.1, "kid_mean": 0.2,
             "wall_s": 1.2, "images_per_s": 8.3},
            {"sampler": "unipc", "steps": 5, "fid": 1.15, "fid_delta_std": 0.1, "wall_s": 0.6, "images_per_s": 16},
            {"sampler": "unipc", "steps": 10, "fid": 1.08, "fid_delta_std": 0.01, "wall_s": 1.2, "images_per_s": 8},
            {"sampler": "dpm++2m-sde", "steps": 10, "fid": 1.12, "fid_delta_std": 0.01, "wall_s": 1.2,
             "images_per_s": 8}]
    verdict = sampler_table.answer(rows, 0.1)
    # unipc-10 is within the 10%; unipc-5 (15% over) is within 2 sigma (0.2) of the paired difference but a row within
    # the tolerance exists, so the noise does not crown it; the SDE solver's 12% excess is 12 sigma
    assert [r.get("holds") for r in rows] == [None, False, False, True, False]
    assert [r.get("within_noise") for r in rows[1:]] == [False, True, False, False]
    assert [r.get("excess_sigmas") for r in rows[1:]] == [pytest.approx(22.5), pytest.approx(1.5),
                                                           pytest.approx(8.0), pytest.approx(12.0)]
    assert verdict["cheapest"] == {"row": "unipc10", "sampler": "unipc", "nfe": 10, "fid": 1.08,
                                   "ratio_to_ddpm": pytest.approx(1.08), "by": "tolerance",
                                   "excess_sigmas": pytest.approx(8.0), "speedup_in_nfe": 10.0}
    assert verdict["per_sampler"]["unipc"]["nfe_needed"] == 10
    assert verdict["per_sampler"]["unipc"]["nfe_within_noise"] == 5
    assert verdict["per_sampler"]["dpm++2m-sde"]["nfe_needed"] is None
    assert verdict["per_sampler"]["ddim"]["best"] == {"nfe": 10, "fid": 3.25, "ratio_to_ddpm": 3.25}
    assert verdict["goal"] == {"nfe": 50, "met": True} and verdict["moonshot"]["met"] is True
    assert verdict["median_delta_std"] == pytest.approx(0.055)  # median of 0.1, 0.1, 0.01, 0.01
    # without a row inside the tolerance, the cheapest row within the noise is named, and says so
    noisy = [dict(r) for r in rows if r["steps"] != 10 or r["sampler"] == "ddim"]
    v2 = sampler_table.answer(noisy, 0.1)
    assert (v2["cheapest"]["row"], v2["cheapest"]["by"]) == ("unipc5", "noise")
    assert "by the noise only" in "\n".join(sampler_table.answer_lines(v2))
    assert sampler_table.answer(rows[1:], 0.1) is None  # no DDPM row: no reference
    result = {"rows": rows, "answer": verdict, "bootstrap": 200, "timestep_spacing": "trailing",
              "floor": {"fid": 0.5, "kid_mean": -0.01}, "num_samples": 10, "seeds": [0, 9],
              "checkpoint": "/x/ckpt_00000006.pt", "use_ema": True, "feature_extractor": "ddpm-classifier",
              "num_reference": 1437, "device": "2 Ray sampling actor(s) of the sample stage"}
    md = sampler_table.markdown_table(result).splitlines()
    assert md[0].startswith("| sampler | NFE | FID | ± (bootstrap) | / DDPM | holds | KID |")
    assert md[2:4] == ["| DDPM (Alg. 2) | 100 | 1 | 0.05 | – | ref | 0.01 | 12.0 | 0.8 |",
                       "| DDIM, η=0 | 10 | 3.25 | 0.2 | 3.25 | no | 0.2 | 1.2 | 8.3 |"]
    assert md[7] == "| real held-out images (floor) | – | 0.5 | – | – | – | -0.01 | – | – |"
    text = "\n".join(md)
    assert "trailing timestep spacing" in text and "200 bootstrap resamplings" in text
    assert "**Cheapest that holds it: UniPC at 10 NFE** (FID 1.08, 1.08x DDPM's, +8.0 σ, by the tolerance)" in text
    assert "- SDE-DPM-Solver++(2M): not within the tolerance; best 1.12 at 10 NFE (1.12x DDPM's)." in text
    from tasks.lib.config import ConfigError

    with pytest.raises(ConfigError, match="sampler_table.ddim_steps"):
        tiny_config({"sampler_table.enabled": True, "sampler_table.ddim_steps": [200]})
    with pytest.raises(ConfigError, match="sampler_table.solver_steps"):
        tiny_config({"sampler_table.enabled": True, "sampler_table.solver_steps": [0]})
    with pytest.raises(ConfigError, match="sampler_table.num_samples"):
        tiny_config({"sampler_table.enabled": True, "sampler_table.num_samples": 5})


def test_sampler_table_disabled_writes_only_the_notice(tiny_config, tmp_path):
    out = sampler_table.run(tiny_config(), "nowhere", "nowhere", None, tmp_path / "ref", tmp_path / "t.json",
                            tmp_path / "t.md")
    assert out == {"enabled": False, "rows": []} == json.loads((tmp_path / "t.json").read_text())
    assert "enabled is false" in (tmp_path / "t.md").read_text()


def test_flow_artifacts_of_the_figures_and_table(tmp_path):
    """The Prefect artifacts' content: links to every figure file and the table's rows with the floor."""
    from flows.artifacts import figures_markdown, sampler_table_rows

    fig = {"enabled": True, "sampler": "ddim-5 (eta 0)", "checkpoint": "/c/ckpt_00000006.pt",
           "progressive": {"file": "progressive.png", "timesteps": [81, 1]},
           "reconstruction": [{"file": "reconstruction_t0100.png", "t": 100, "cols": 4}],
           "animation": {"file": "denoising.gif", "frames": 3}, "loss": {"file": "loss.png"}}
    table = {"enabled": True, "rows": [{"sampler": "ddim", "steps": 10, "fid": 2.0, "kid_mean": 0.1, "wall_s": 1.0,
                                        "images_per_s": 10.0}], "floor": {"fid": 0.5, "kid_mean": 0.0},
             "num_samples": 10, "seeds": [0, 9], "checkpoint": "/c/ckpt_00000006.pt", "use_ema": True,
             "feature_extractor": "ddpm-classifier", "num_reference": 1437, "device": "1 actor"}
    from tasks.sampler_table import markdown_table

    (tmp_path / "t.md").write_text(markdown_table(table) + "\n")  # what the stage writes beside its json
    md = figures_markdown(fig, table, tmp_path / "figures", tmp_path / "t.md")
    for name in ("progressive.png", "reconstruction_t0100.png", "denoising.gif", "loss.png"):
        assert f"({(tmp_path / 'figures' / name).as_uri()})" in md
    assert "t = 81, 1" in md and "2 reconstructions" in md and "| DDIM, η=0 | 10 | 2 | – | – | – | 0.1 |" in md
    assert sampler_table_rows(table) == [
        {"sampler": "ddim", "NFE": 10, "FID": 2.0, "FID_std": None, "vs_DDPM": None, "holds": None, "KID": 0.1,
         "sampling_s": 1.0, "images_per_s": 10.0},
        {"sampler": "real held-out (floor)", "NFE": None, "FID": 0.5, "FID_std": None, "vs_DDPM": None,
         "holds": None, "KID": 0.0, "sampling_s": None, "images_per_s": None}]
    assert figures_markdown({"enabled": False}, {"enabled": False, "rows": []}, tmp_path / "f",
                            tmp_path / "none.md").count("\n") == 2
