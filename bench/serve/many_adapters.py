"""1,000 distinct LoRA adapters for SmolLM2-135M on disk (bench_engine.py's many-adapter case): r=16 on
all 7 projections like adapters.py's 64, stored in bfloat16 (9.8 MB each, 9.8 GB in all) to halve the
disk they take; each loads into the fp32 slots. Written once under the bench cache directory.

    python -m bench.serve.many_adapters        (writes them and prints the directory)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.serve.adapters import CACHE, SCALE, STAMP, make_adapters, names

ROOT = CACHE.parent / "bench-serve-many-adapters"


def make_many(count: int = 1000, root: Path = ROOT) -> dict[str, Path]:
    """name -> directory of `count` distinct adapters (m0000, m0001, ...), written once."""
    template = make_adapters()[names()[0]]
    config = (template / "adapter_config.json").read_text()
    shapes = {k: v.shape for k, v in load_file(template / "adapter_model.safetensors").items()}
    dirs = {f"m{i:04d}": root / f"m{i:04d}" for i in range(count)}
    stamp = root / "recipe.json"
    recipe = {**STAMP, "count": count, "dtype": "bfloat16"}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return dirs
    for seed, d in enumerate(dirs.values(), start=10_000):
        g = torch.Generator().manual_seed(seed)
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text(config)
        tensors = {k: (torch.randn(s, generator=g) * SCALE).to(torch.bfloat16) for k, s in sorted(shapes.items())}
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
    stamp.write_text(json.dumps(recipe))
    return dirs


if __name__ == "__main__":
    print(next(iter(make_many(int(sys.argv[1]) if len(sys.argv) > 1 else 1000).values())).parent)
