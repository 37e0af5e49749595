"""The generative results table: learners on ``freedict-translation`` with SmolLM2, several seeds
(``bench/learner_table.py`` with the generative stream's defaults).

    python bench/generative_table.py [--learners 'sequential,joint,emr*,lwf*,dynamic'] [--seeds 3]
        [--threads 0] [--out runs/generative-table] [--record bench/results/generative-freedict-smollm2.json]
        [--report]

Columns: the stream's primary metric (chrF) as average score after the last task, exact match
beside it, forgetting and BWT (on chrF), the reference-text perplexity after the last task (the
base model's alone in the header), and training seconds per task. Finished (learner, seed) pairs
are recorded at once and never rerun; a stopped run is resumed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learner_table import main  # noqa: E402

DEFAULTS = {"learners": "sequential,joint,emr*,lwf*,dynamic", "benchmark": "freedict-translation",
            "max_new_tokens": 10, "top_layers": "4", "out": Path("runs/generative-table"),
            "record": Path("bench/results/generative-freedict-smollm2.json")}

if __name__ == "__main__":
    sys.exit(main(defaults=DEFAULTS))
