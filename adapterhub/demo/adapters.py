"""The demo adapters: small LoRA adapters on the embedded SmolLM2 whose replies differ at a glance
(upper case, a JSON object, numbers as words: adapterhub/demo/data.py), trained together in one
fit whose batches mix their rows.

The seeded recipe's result ships with adapterhub (`SHIPPED`, adapterhub/demo/shipped/), so a new
machine serves them at once; `adapterhub demo-adapters --force` trains them again into a cache,
which is then preferred.

    directory = adapters.ensure()            # the cache if it holds them, else the shipped set
    bb.load(directory / "upper")             # or peft.PeftModel.from_pretrained(model, directory / "upper")

A set, the cache or the shipped one, written whole or not at all (a temporary directory renamed into place):
    <directory>/<name>/adapter_config.json, adapter_model.safetensors    PEFT format, one per adapter
    <directory>/demo.json                                                what was trained, how, how long
The cache: --cache-dir, else $ADAPTERHUB_DEMO_ADAPTERS_DIR, else $XDG_CACHE_HOME/adapterhub/demo-adapters
(~/.cache/adapterhub/demo-adapters without XDG_CACHE_HOME).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..backbone import Backbone
from ..train import AdapterTuning, fit
from ..train.checkpoint import atomic_directory
from . import data as demo_data

ENV = "ADAPTERHUB_DEMO_ADAPTERS_DIR"
SHIPPED = Path(__file__).parent / "shipped"  # the default Recipe's result, trained once and shipped
MANIFEST = "demo.json"
VERSION = 1  # of the data and the recipe: a cache written by another version is trained again


@dataclass(frozen=True)
class Recipe:
    """How the demo adapters are trained; the defaults take about 2 minutes on 2 CPU cores (SmolLM2)."""

    questions: int = 96  # each asked once per adapter, so 3 * questions rows
    epochs: int = 2
    batch_size: int = 16
    lr: float = 2e-3
    r: int = 8
    lora_alpha: int = 16
    top_layers: int = 15  # LoRA on the last layers only: the backward pass stops below them
    seed: int = 0

    def lora_config(self, layers: int) -> dict:
        """PEFT LoRA settings for a model of `layers` blocks: every projection of the top layers."""
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "layers_to_transform": list(range(max(layers - self.top_layers, 0), layers)),
        }


def default_dir() -> Path:
    """$ADAPTERHUB_DEMO_ADAPTERS_DIR, else the user cache directory's adapterhub/demo-adapters."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "adapterhub" / "demo-adapters"


def cached(directory: Path) -> dict | None:
    """The manifest of a complete cache of this VERSION in `directory` (whatever recipe trained it), else None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        return None
    return manifest if all((directory / name).is_dir() for name in manifest["adapters"]) else None


def ensure(
    directory: str | os.PathLike | None = None,
    *,
    force: bool = False,
    recipe: Recipe = Recipe(),
    model: nn.Module | None = None,
    tokenizer=None,
    progress: bool = True,
) -> Path:
    """A directory holding the demo adapters: `directory` (default: the cache, default_dir()) if it holds
    them; else, for the embedded SmolLM2 and no `directory`, the shipped set; else (or with `force`)
    `directory` after training them into it.

    `model` and `tokenizer` (a causal LM with a chat template) default to the embedded SmolLM2; another
    model needs its own `directory`, so that it never fills the default cache with adapters of its own."""
    if model is not None and directory is None:
        raise ValueError(
            "ensure(model=...) trains adapters for another model than the embedded default: "
            "give it a directory of its own"
        )
    path = Path(directory) if directory is not None else default_dir()
    if not force and cached(path) is not None:
        return path
    if not force and directory is None and recipe == Recipe() and cached(SHIPPED) is not None:
        return SHIPPED
    if model is None:
        from ..default_model import GGUF_FILE, load_default

        model, tokenizer = load_default()
        base_model = f"{GGUF_FILE} (adapterhub.default_model.load_default)"
    else:
        base_model = getattr(model.config, "name_or_path", "") or type(model).__name__
    if progress:
        print(f"training the demo adapters into {path} (about 2 minutes on 2 CPU cores for SmolLM2)...", flush=True)
    with atomic_directory(path) as tmp:
        train_into(tmp, model, tokenizer, recipe, progress, base_model)
    return path


def train_into(directory: Path, model: nn.Module, tokenizer, recipe: Recipe, progress: bool, base_model: str) -> None:
    """Trains one adapter per demo_data style in one fit (each batch mixes their rows), writes each
    to directory/<name>, and the manifest (naming `base_model`) last."""
    names = list(demo_data.STYLES)
    strategy = AdapterTuning("lora", recipe.lora_config(model.config.num_hidden_layers), names=names)
    started = time.perf_counter()
    result = fit(
        model,
        strategy,
        demo_data.examples(recipe.questions, recipe.seed),
        tokenizer=tokenizer,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        chat=True,
        progress=progress,
    )
    for name in names:
        strategy.backbone.save(name, directory / name)
    manifest = {
        "version": VERSION,
        "base_model": base_model,
        "chat_template": True,  # trained on prompts in the tokenizer's chat template: serve them the same way
        "adapters": {name: demo_data.DESCRIPTIONS[name] for name in names},
        "recipe": asdict(recipe),
        "sample_prompts": demo_data.SAMPLE_PROMPTS,
        "train_seconds": round(time.perf_counter() - started, 1),
        "losses": [round(loss, 4) for loss in result.losses],
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def backbone(directory: Path, model: nn.Module) -> Backbone:
    """A Backbone over `model` with every adapter of the cache in `directory` loaded under its name."""
    manifest = cached(directory)
    if manifest is None:
        raise FileNotFoundError(
            f"{directory} holds no demo adapters (of version {VERSION}); run `adapterhub demo-adapters` to train them"
        )
    served = Backbone(model, max_adapters=len(manifest["adapters"]), max_rank=manifest["recipe"]["r"], preallocate=())
    for name in manifest["adapters"]:
        served.load(directory / name, name=name)
    return served


@torch.no_grad()
def replies(
    backbone: Backbone, tokenizer, prompts: Sequence[str], names: Sequence[str | None], max_new_tokens: int = 40
) -> dict[str | None, list[str]]:
    """Greedy replies to every prompt from each of `names` (None: the base model), all in one
    generate() batch whose rows use different adapters."""
    rows = [(name, prompt) for name in names for prompt in prompts]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for _, p in rows
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with backbone.use([name for name, _ in rows]):
        out = backbone.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[:, batch["input_ids"].size(1) :]  # (rows, new tokens)
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    return {name: [decoded[i * len(prompts) + k].strip() for k in range(len(prompts))] for i, name in enumerate(names)}
