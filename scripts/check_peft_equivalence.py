"""Load a saved task adapter with plain ``peft.PeftModel.from_pretrained`` on the same base model
and compare its logits with conpet's own loading path, on that task's test rows.

    python scripts/check_peft_equivalence.py RUN_DIR/seed-0/adapters/task-03 [--rows 64]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapter", type=Path)
    p.add_argument("--rows", type=int, default=64)
    args = p.parse_args()

    from peft import PeftModel
    from transformers import AutoModel

    from conpet.backbone import cloze_features, load_backbone
    from conpet.config import RunConfig, load_config
    from conpet.data import load_stream
    from conpet.heads import GrowingHead
    from conpet.inputs import collate, encode_rows
    from conpet.pet import get_pet

    meta = json.loads((args.adapter / "conpet.json").read_text())
    run_dir = args.adapter.parents[2]
    cfg: RunConfig = load_config(str(run_dir / "config.yaml"))
    stream = load_stream(cfg.data)
    task = stream.tasks[meta["task_index"]]
    rows = task.test[: args.rows]
    bb = load_backbone(cfg.model)
    enc = encode_rows(stream.rows, stream.kind, bb.tokenizer, bb.is_decoder, cfg.train.max_length)
    batch = collate(enc, rows, bb.pad_id)
    head = GrowingHead.load(args.adapter)

    pet = get_pet(meta["pet"], meta["pet_options"])
    ours = pet.attach_from(bb.model, args.adapter, "default")
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(meta["backbone_path"]), str(args.adapter))
    with torch.no_grad():
        a = head(cloze_features(ours.eval(), batch))
        b = head(cloze_features(plain.eval(), batch))
    print(f"adapter {args.adapter} ({meta['model']}, {meta['pet']}, task {meta['task']}): {len(rows)} test rows, "
          f"{a.shape[1]} classes")
    print(f"max |logit difference| conpet vs plain peft: {float((a - b).abs().max()):.3g}; "
          f"same predictions: {bool(torch.equal(a.argmax(-1), b.argmax(-1)))}")


if __name__ == "__main__":
    main()
