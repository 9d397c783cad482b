"""DDPM core library (Ho, Jain, Abbeel 2020): schedules, diffusion math, UNet, samplers, EMA, checkpoints.

PyTorch, plus diffusers' schedulers for the multistep solvers (ddpm/solvers.py, imported when one is used): nothing
in this package imports Prefect, Ray, MLflow or DVC, so a researcher can use it alone.
The diffusion math takes the network as an argument and never owns it.
"""

__version__ = "0.1.0"
