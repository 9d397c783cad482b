"""The tracking layer: MLflow, and nothing else in the project imports it.

* :mod:`tracking.run`: the one MLflow run of a pipeline run (store, look-up by params hash, failures as warnings);
* :mod:`tracking.training`: the train stage's callback (curves, stepped grids, the logged model);
* :mod:`tracking.outputs`: what the other stages wrote, read from their files and logged;
* :mod:`tracking.plugin`: the ``mlflow`` tracker, the entry point (group ``ddpm_pipeline.trackers``) through which
  the stages reach all this without importing it (tasks/lib/callbacks.py).

The stages import none of it; the train-eval flow imports :mod:`tracking.outputs` and :mod:`tracking.run`.
"""
