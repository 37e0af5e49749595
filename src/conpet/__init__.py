"""conpet: continual parameter-efficient tuning of large language models.

Quick start::

    from conpet import RunConfig, run
    metrics = run(RunConfig(model="minilm", learner="sequential"))
    print(metrics["average_accuracy"])
"""

from conpet.config import DataConfig, PETConfig, RunConfig, TrainConfig, load_config
from conpet.errors import ConpetError

__version__ = "0.1.0"


def run(cfg: RunConfig, progress: bool | None = None) -> dict:
    """Run a continual stream (see :func:`conpet.runner.run`)."""
    from conpet.runner import run as _run

    return _run(cfg, progress)


__all__ = ["RunConfig", "DataConfig", "PETConfig", "TrainConfig", "load_config", "run", "ConpetError", "__version__"]
