"""Training: the job's config (config), what a run derives from it and the step it builds (plan,
step), the optimizer (optim), objectives and their loss (objectives, loss), the loop (trainer),
the run directory's records and lock (rundir), recipes of stages (recipe), programs compiled for
a TPU slice (aot, topology) and what a person sees (progress). Imports eval, weights, data, model
and the root modules."""

from solarjax.train.config import RecipeConfig, TrainConfig, load_job
from solarjax.train.plan import RunPlan
from solarjax.train.recipe import run_recipe
from solarjax.train.trainer import Trainer

__all__ = ["RecipeConfig", "TrainConfig", "load_job", "RunPlan", "run_recipe", "Trainer"]
