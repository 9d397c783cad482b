"""The EMA UNet as an MLflow model without pickle: MLflow's "model from code" (this file) rebuilds it from two
artifacts, its config (``unet.json``: the UNet config, the diffusion config, the training step) and its weights
(``weights.pt``, a plain state dict read with ``torch.load(weights_only=True)``).

    model = mlflow.pyfunc.load_model("models:/ddpm-digits/1")
    unet = model.unwrap_python_model().unet          # a ddpm.unet.UNet in eval mode: unet(x, t)
    eps = model.predict(x, params={"t": t})           # numpy: x [B, C, H, W] float32 in [-1, 1], t [B] timesteps

``tracking/training.py`` logs it with ``code_paths=[ddpm/]``, so loading needs neither this project nor pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class EmaUNet(PythonModel):
    """The network's prediction (eps, x0 or v, by the diffusion config's objective) for ``{"x", "t"}``."""

    def load_context(self, context) -> None:
        import torch

        from ddpm.unet import UNet

        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        self.unet = UNet.from_config(self.config["unet_config"])
        self.unet.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.unet.eval()

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """``model_input``: x [B, C, H, W] float32 in [-1, 1]; ``params["t"]``: the B 0-indexed timesteps (one value
        is used for every image). Returns the prediction [B, C, H, W] float32."""
        import torch

        x = torch.tensor(np.asarray(model_input, dtype=np.float32))
        t = torch.as_tensor(np.asarray((params or {}).get("t", [0]), dtype=np.int64)).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        with torch.inference_mode():
            return self.unet(x, t).numpy()


mlflow.models.set_model(EmaUNet())
