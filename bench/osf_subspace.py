"""Where OSF's task updates lie: how much of each task's update falls in the subspace that the next
task preserves, from a finished ``osf`` run (no training; seconds on a CPU).

    python bench/osf_subspace.py RUN_SEED_DIR [--json FILE]

``RUN_SEED_DIR`` is a seed folder of an ``osf`` run (``.../seed-0``, holding ``adapters/``). Each
task's folder holds ``osf_update.safetensors``, the accumulated ``W_t - W_0`` of every targeted
weight, and ``conpet.json`` the preserved fractions of the schedule. For task t's own update
``d = (W_t - W_0) - (W_{t-1} - W_0)`` and the next task's preserved rank ``k = int(f min(m, n))``
of the merged weights ``W_t = U S V^T`` (as peft decomposes them), it prints the share of
``||d||^2`` inside the preserved spans, ``||U_k U_k^T d V_k V_k^T||^2 / ||d||^2``, beside the
share a random matrix would have there (``(k / m)(k / n)``), and how far the preserved left
singular spans moved from the base model's (``||U_k(W_0)^T U_k(W_t)||^2 / k``: 1 = not at all).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conpet.backbone import load_backbone


def top_spans(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` left singular vectors (columns) and right singular vectors (rows) of ``w``."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :k], vh[:k]


def preserved_share(spans: tuple[torch.Tensor, torch.Tensor], d: torch.Tensor) -> float:
    """Share of ``||d||^2`` inside the singular spans ``(U_k, V_k^T)`` of a weight (both sides):
    ``||U_k U_k^T d V_k V_k^T||^2 / ||d||^2``."""
    u, vh = spans
    return float((u @ (u.T @ d @ vh.T) @ vh).norm() ** 2 / d.norm() ** 2)


def span_overlap(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """``||U_a^T U_b||^2 / k`` for two ``k``-column orthonormal bases: 1 when the spans coincide,
    about ``k / m`` for unrelated ones."""
    return float((u_a.T @ u_b).norm() ** 2 / u_a.shape[1])


def analyse(seed_dir: Path) -> list[dict]:
    folders = sorted((p for p in (seed_dir / "adapters").iterdir() if (p / "osf_update.safetensors").is_file()),
                     key=lambda p: json.loads((p / "conpet.json").read_text())["task_index"])
    if len(folders) < 2:
        raise SystemExit(f"osf_subspace: {seed_dir}/adapters: needs the updates of at least two tasks")
    meta = json.loads((folders[-1] / "conpet.json").read_text())
    if meta.get("learner") != "osf":
        raise SystemExit(f"osf_subspace: {folders[-1]}: not an osf run (learner {meta.get('learner')!r})")
    fractions = meta["osf_preserved"]
    base = dict(load_backbone(meta["model"]).model.named_parameters())
    updates = [load_file(str(p / "osf_update.safetensors")) for p in folders]
    base_left: dict[str, torch.Tensor] = {}  # every left singular vector of W_0, one SVD per weight
    rows = []
    for t in range(len(folders) - 1):
        f = fractions[t + 1]
        inside = total = random_share = moved = 0.0
        for name, acc in updates[t].items():
            w0 = base[name].detach().float()
            own = acc - (updates[t - 1][name] if t else 0)
            k = max(1, int(f * min(w0.shape)))
            energy = float(own.norm() ** 2)  # each weight counts by its update's energy
            spans = top_spans(w0 + acc, k)  # what the next task preserves
            if name not in base_left:
                base_left[name] = top_spans(w0, min(w0.shape))[0]
            inside += preserved_share(spans, own) * energy
            total += energy
            random_share += k * k / (w0.shape[0] * w0.shape[1]) * energy
            moved += span_overlap(base_left[name][:, :k], spans[0]) * energy
        rows.append({"task": folders[t].name, "next_task_preserves": f, "share_in_preserved": inside / total,
                     "random_share": random_share / total, "preserved_span_overlap_with_base": moved / total})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seed_dir", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = analyse(args.seed_dir)
    print("| task | next task preserves | share of its update there | a random matrix's | preserved spans vs base |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['next_task_preserves']:.2f} | {r['share_in_preserved']:.3f} | "
              f"{r['random_share']:.3f} | {r['preserved_span_overlap_with_base']:.4f} |")
    if args.json:
        from record import write_record

        write_record(args.json, {"seed_dir": str(args.seed_dir), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
