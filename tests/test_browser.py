"""What users see, checked in a real browser: headless Debian chromium (tools/browser.py, over the DevTools protocol)
on a real `mlflow server` on loopback, holding a small real run logged by the tracking layer.

chromium is a system package: `make test` installs it with apt when run as root. Elsewhere a missing browser fails
these tests with the package to install; they are never skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import train
from tasks.lib.images import grid_image
from tasks.lib.files import write_npz
from tools.browser import Browser, BrowserError, chromium_path
from tracking import outputs, training
from tracking import run as tracking
from ddpm.unet import UNet

VIEWPORT = (1600, 1000)  # a laptop's browser window: "the first screen"
CARD = '[data-testid="experiment-view-compare-runs-card"]'
GRID = '[data-testid="draggable-chart-cards-grid"]'

# Per chart section, in page order: its name (the header's first line) and its cards' titles. Sections render their
# cards when scrolled into view; an empty list is a section not rendered yet.
SECTIONS_JS = """[...document.querySelectorAll('%s')].map(grid => {
  const first = (grid.innerText || '').split('\\n')[0];
  let el = grid.parentElement;
  while (el && (el.innerText || '').split('\\n')[0] === first) el = el.parentElement;
  return {name: el ? el.innerText.split('\\n')[0] : null,
          cards: [...grid.querySelectorAll('%s')].map(c => c.innerText.split('\\n')[0]),
          top: Math.round(grid.getBoundingClientRect().top)};
})""" % (GRID, CARD)

# Each image card: its title, its picture's box and state, and the part of the card one can see (the card's box cut
# by every clipping element between the picture and the card).
IMAGE_CARDS_JS = """[...document.querySelectorAll('%s')].filter(c => c.querySelector('img')).map(card => {
  const img = card.querySelector('img');
  const box = r => ({top: r.top, bottom: r.bottom, left: r.left, right: r.right});
  let vis = box(card.getBoundingClientRect());
  for (let el = img.parentElement; el && el !== card.parentElement; el = el.parentElement) {
    const s = getComputedStyle(el);
    if (s.overflowX !== 'visible' || s.overflowY !== 'visible') {
      const r = el.getBoundingClientRect();
      vis = {top: Math.max(vis.top, r.top), bottom: Math.min(vis.bottom, r.bottom),
             left: Math.max(vis.left, r.left), right: Math.min(vis.right, r.right)};
    }
  }
  return {title: card.innerText.split('\\n')[0], img: box(img.getBoundingClientRect()), visible: vis,
          loaded: img.complete && img.naturalWidth > 0, src: img.getAttribute('src') || ''};
})""" % CARD


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        return chromium_path()
    except BrowserError as e:
        pytest.fail(str(e))


def log_small_run(cfg, ws: Path) -> str:
    """A run as the stages log it, through the tracking layer: training curves of 40 steps with a strip sampled from
    a real tiny UNet every 10 steps (train/), then the sample stage's files (a shard, grid.png) and an evaluation
    (trained/). Returns the run id."""
    cb = training.MlflowTrainCallback()
    cb.on_fit_start(cfg, "sha-browser", True)
    cb.on_train_start(cfg, 0, [])
    model = UNet.from_config(cfg.unet_config().to_dict()).eval()
    diffusion = train.build_diffusion(cfg.diffusion.model_dump())
    cb.on_step_end(0, model, diffusion)
    for step in range(1, cfg.train.steps + 1):
        cb.on_log({"step": str(step), "loss": str(1 / step ** 0.5), "lr": "0.001", "grad_norm": str(2 / step),
                   "images_per_s": "100"})
        cb.on_step_end(step, model, diffusion)
    cb.flush()
    cb._close("FINISHED")

    samples = ws / "samples"
    samples.mkdir(parents=True)
    images = (np.random.default_rng(0).random((40, 1, 8, 8)) * 255).astype(np.uint8)
    write_npz(samples / "shard_00000.npz", images=images, seeds=np.arange(40), key=np.asarray("k"))
    Image.fromarray(grid_image(images)).save(samples / "grid.png")
    summary = {"count": 40, "sampler": "dpm++2m-sde", "steps": 20, "checkpoint_step": cfg.train.steps,
               "wall_s": 3.0, "images_per_s": 13.3}
    (samples / "samples.json").write_text(json.dumps(summary))
    result = {"fid": 0.69, "kid_mean": 0.001, "kid_std": 0.0005, "fid_ratio": 1.3, "classifier_accuracy": 0.95,
              "floor": {"fid": 0.53, "kid_mean": 0.0002, "num_holdout": 360}, "num_generated": 40}
    (ws / "eval.json").write_text(json.dumps(result))
    assert outputs.log_samples(cfg, summary, samples) == cb.info["run_id"]
    assert outputs.log_evaluation(cfg, result, "sha-browser", samples, ws / "eval.json") == cb.info["run_id"]
    return cb.info["run_id"]


@pytest.mark.slow
def test_mlflow_run_page_opens_on_the_training_curves_and_shows_every_picture(
        chromium, mlflow_server, tiny_config, tmp_path, monkeypatch):
    """The run page's charts (Model metrics tab) in a fresh 1600x1000 browser: the first section is ``train`` with the
    loss curve and the training strip, both on the first screen; every image card shows its picture whole."""
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", tracking.PREFECT_ENV):
        monkeypatch.delenv(var, raising=False)
    uri = mlflow_server()
    cfg = tiny_config({"tracking.enabled": True, "tracking.uri": uri, "tracking.experiment": "browser",
                       "tracking.system_metrics": False,
                       "train.steps": 40, "tracking.grid_every": 10, "tracking.grid_samples": 16,
                       "tracking.grid_steps": 3})
    run_id = log_small_run(cfg, tmp_path)
    found = tracking.find_run(cfg)
    assert found["run_id"] == run_id

    with Browser(*VIEWPORT) as b:
        b.goto(f"{found['url']}/model-metrics")
        b.wait_for(f"document.querySelectorAll('{CARD} img').length > 0", timeout=120,
                   what="an image card with a picture on the run page")
        b.settle(1.0)
        sections = b.evaluate(SECTIONS_JS)
        names = [s["name"] for s in sections]
        # MLflow orders sections by name; everything after training sorts after "train"
        assert names[:3] == ["train", "trained", "trained/floor"], names
        first = sections[0]
        assert {"loss", "lr", "grad_norm", "images_per_s", "train/samples"} == set(first["cards"]), first
        cards = {c["title"]: c for c in b.evaluate(IMAGE_CARDS_JS)}
        loss_top = b.evaluate(f"[...document.querySelectorAll('{CARD}')].find(c => c.innerText.split('\\n')[0] "
                              "=== 'loss').getBoundingClientRect().bottom")
        assert loss_top <= VIEWPORT[1], "the loss chart is below the first screen"
        assert cards["train/samples"]["img"]["bottom"] <= VIEWPORT[1], "the training strip is below the first screen"

        # the final samples' card, in the next section, rendered once scrolled to
        b.evaluate(f"[...document.querySelectorAll('{GRID}')][1].scrollIntoView()")
        b.wait_for(f"[...document.querySelectorAll('{CARD}')].some(c => c.innerText.startsWith('trained/samples') "
                   "&& c.querySelector('img') && c.querySelector('img').complete)", timeout=60,
                   what="the trained/samples card's picture")
        b.settle(1.0)
        cards.update({c["title"]: c for c in b.evaluate(IMAGE_CARDS_JS)})
        trained = {s["name"]: s["cards"] for s in b.evaluate(SECTIONS_JS)}["trained"]
        assert {"fid", "fid_ratio", "kid_mean", "classifier_accuracy", "trained/samples"} <= set(trained), trained

    assert set(cards) == {"train/samples", "trained/samples"}, sorted(cards)
    for title, card in cards.items():
        img, vis = card["img"], card["visible"]
        assert card["loaded"], f"{title}: the picture did not load ({card['src'][:80]})"
        assert img["bottom"] - img["top"] >= 40 and img["right"] - img["left"] >= 160, (title, img)
        inside = (img["top"] >= vis["top"] - 1 and img["bottom"] <= vis["bottom"] + 1 and
                  img["left"] >= vis["left"] - 1 and img["right"] <= vis["right"] + 1)
        assert inside, f"{title}: the picture {img} is not within the card's visible box {vis}"
