"""conpet: continual parameter-efficient tuning of large language models.

Quick start::

    from conpet import RunConfig, run
    metrics = run(RunConfig(model="minilm", learner="sequential"))
    print(metrics["average_accuracy"])

    from conpet import ContinualModel
    model = ContinualModel.from_run("runs/x")      # the learned bank, loaded once
    model.predict(["..."])                          # label, score, the task that answered
"""

__version__ = "0.1.0"

from conpet.config import DataConfig, PETConfig, RunConfig, TrainConfig, load_config  # noqa: E402
from conpet.errors import ConpetError  # noqa: E402
from conpet.model import ContinualModel  # noqa: E402
from conpet.runner import run  # noqa: E402

__all__ = ["RunConfig", "DataConfig", "PETConfig", "TrainConfig", "load_config", "run", "ConpetError", "ContinualModel",
           "__version__"]
