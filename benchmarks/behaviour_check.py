"""Fingerprint of the library's behaviour, for refactors that must not change a number (issue 17).

Runs one tiny fixed-seed pipeline through the ``apmask`` command line in a fresh process under the
pinned numerics (:mod:`apmask_lib.core.repro`): demo data (grass), a tiny random ViT, pre-training ->
fine-tuning -> evaluation with the kNN extension fused (``evaluate.knn_layer``), and a prediction on the
test folder. It records every logged loss (as text, all digits), an md5 over every tensor of the
pre-trained and fine-tuned checkpoints, every float of ``metrics.json`` (paper method and kNN /
fused methods), the threshold and the predicted scores.

    python benchmarks/behaviour_check.py --out /tmp/before.json          # on the old commit
    python benchmarks/behaviour_check.py --out /tmp/after.json --compare /tmp/before.json

``--compare`` exits 1 and lists the differing entries when anything differs.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = ["backbone=random:vit_tiny16", "device=cpu", "data.image_size=64", "data.max_train=8", "data.max_test=4",
        "pretrain.epochs=2", "pretrain.batch_size=4", "pretrain.global_size=64", "pretrain.local_size=32",
        "pretrain.n_local=2", "pretrain.hidden_dim=64", "pretrain.num_workers=0", "pretrain.warmup_epochs=1",
        "pretrain.log_every=1", "finetune.epochs=2", "finetune.batch_size=4", "finetune.num_workers=0",
        "finetune.warmup_epochs=1", "finetune.log_every=1", "evaluate.scales=[64,96]", "evaluate.batch_size=4",
        "evaluate.knn_layer=2", "evaluate.knn_sizes=[64]", "evaluate.fusion=fused", "evaluate.save_maps=true"]

SCRIPT = """
import sys
from apmask_lib.cli import main
sets = sys.argv[1:]
for cmd in ('pretrain', 'finetune', 'evaluate'):
    main([cmd, '--params', '', *sets])
"""


def tensor_digest(path: Path) -> str:
    """md5 over every tensor of a checkpoint (sorted keys, nested dicts walked): equal iff bitwise equal."""
    import torch

    h = hashlib.md5()

    def walk(obj, key=""):
        if isinstance(obj, torch.Tensor):
            h.update(key.encode())
            h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{key}.{k}")

    walk(torch.load(path, map_location="cpu", weights_only=True))
    return h.hexdigest()


def _floats(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_floats(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = repr(obj)
    return out


def fingerprint(work: Path) -> dict:
    from apmask_lib.data import build_dataset

    data = work / "demo"
    build_dataset("demo", data, "grass")
    out = work / "run"
    sets = [f"out_dir={out}", f"data.root={data}", "data.category=grass", *TINY]
    env = {k: v for k, v in os.environ.items() if k not in ("APMASK_NUMERICS", "PYTHONHASHSEED")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", SCRIPT, *[a for s in sets for a in ("-S", s)]], cwd=work, env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"pipeline failed (rc {r.returncode}):\n{r.stderr[-4000:]}")

    def losses(stage: str) -> list[str]:
        with (out / stage / "log.csv").open(newline="") as f:
            return [row["loss"] for row in csv.DictReader(f)]

    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    maps = sorted((out / "evaluate" / "maps").rglob("*.npy"))
    return {"pretrain_losses": losses("pretrain"), "finetune_losses": losses("finetune"),
            "weights": {"pretrain/backbone.pt": tensor_digest(out / "pretrain" / "backbone.pt"),
                        "finetune/model.pt": tensor_digest(out / "finetune" / "model.pt")},
            "metrics": _floats(metrics),
            "maps_md5": hashlib.md5(b"".join(p.read_bytes() for p in maps)).hexdigest(), "n_maps": len(maps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write the fingerprint to")
    ap.add_argument("--compare", type=Path, help="an earlier fingerprint: exit 1 if anything differs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fp = fingerprint(Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}: {len(fp['pretrain_losses'])} pre-training and {len(fp['finetune_losses'])} "
          f"fine-tuning losses, {len(fp['metrics'])} metric values, {fp['n_maps']} maps")
    if args.compare:
        old = json.loads(args.compare.read_text())
        diffs = [k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k)]
        for k in diffs:
            if isinstance(old.get(k), dict) and isinstance(fp.get(k), dict):
                sub = [s for s in sorted(set(old[k]) | set(fp[k])) if old[k].get(s) != fp[k].get(s)]
                print(f"DIFFERS {k}: {sub[:20]}")
            else:
                print(f"DIFFERS {k}: {old.get(k)!r} -> {fp.get(k)!r}")
        print("identical" if not diffs else f"{len(diffs)} entries differ")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
