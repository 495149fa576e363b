"""The serving benchmark's adapters: 64 random LoRA adapters for SmolLM2-135M, r=16, lora_alpha=32 on
all 7 projections, in PEFT's format, each from its own seed. Both servers load the same files.

The layout comes from PEFT itself (`get_peft_model` + `save_pretrained` on the base model); A and B
are then drawn from N(0, 0.02^2), the scale bench_backbone.py uses: B is not zero (every adapter
changes the outputs) and the update stays small beside the base weights (outputs remain sane).

    python -m bench.serve.adapters        (writes them to the cache directory and prints it)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COUNT, RANK, ALPHA, SCALE = 64, 16, 32, 0.02
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CACHE = Path(os.environ.get("ADAPTERHUB_BENCH_CACHE", "~/.cache/adapterhub")).expanduser() / "bench-serve-adapters"
STAMP = {"count": COUNT, "rank": RANK, "alpha": ALPHA, "scale": SCALE, "targets": TARGETS}


def names(n: int = COUNT) -> list[str]:
    return [f"a{i:02d}" for i in range(n)]


def make_adapters(root: Path = CACHE) -> dict[str, Path]:
    """name -> directory of each adapter under `root`, written once (kept while their recipe is unchanged)."""
    dirs = {name: root / name for name in names()}
    stamp = root / "recipe.json"
    if (
        stamp.exists()
        and json.loads(stamp.read_text()) == STAMP
        and all((d / "adapter_model.safetensors").exists() for d in dirs.values())
    ):
        return dirs
    from peft import LoraConfig, get_peft_model

    from adapterhub.default_model import load_default

    base, _ = load_default()
    template = root / "template"
    get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)).save_pretrained(template)
    shapes = {k: v.shape for k, v in load_file(template / "adapter_model.safetensors").items()}
    config = (template / "adapter_config.json").read_text()
    for seed, d in enumerate(dirs.values()):
        g = torch.Generator().manual_seed(seed)
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text(config)
        save_file(
            {k: torch.randn(s, generator=g) * SCALE for k, s in sorted(shapes.items())},
            d / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
    stamp.write_text(json.dumps(STAMP))
    return dirs


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else CACHE
    print(make_adapters(root)[names()[0]].parent)
