"""What a model does after training: sampling with a KV cache (sample), the tasks of the H6
benchmarks and their documents (tasks), and scoring them by the harness's rules (scoring).
Imports weights, data, model and the root modules."""

from solarjax.eval.sample import Sampling, generate
from solarjax.eval.scoring import evaluate
from solarjax.eval.tasks import load_task

__all__ = ["Sampling", "generate", "evaluate", "load_task"]
