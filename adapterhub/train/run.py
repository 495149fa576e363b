"""`adapterhub train`: a fit described by a YAML/TOML file and/or flags (flags win).

model = "smollm2"                # the embedded default, a local directory or a Hub id
task = "classification"          # or "causal_lm"; classification needs num_labels
num_labels = 2
strategy = "adapter"             # feature_extraction | full | discriminative | progressive | adapter | domain
adapter_type = "lora"            # adapter / domain: any installed type
adapter_config = {r = 8, lora_alpha = 16}
data = "train.jsonl"             # one example per line (adapterhub/train/data.py)
eval_data = "eval.jsonl"
domain_data = "domain.txt"       # domain: unlabelled target-domain text, one per line
epochs = 3
batch_size = 8
output_dir = "runs/lora"         # result in output_dir/best; rerunning resumes
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from .errors import TrainingError
from .loop import FitOptions, FitResult, fit
from .strategies import (
    AdapterTuning,
    DiscriminativeLR,
    DomainAdaptation,
    FeatureExtraction,
    FullFineTuning,
    ProgressiveUnfreezing,
    Strategy,
)

FIT_OPTIONS = (
    "epochs",
    "batch_size",
    "lr",
    "seed",
    "warmup",
    "weight_decay",
    "max_length",
    "truncate",
    "chat",
    "checkpoint_every",
)  # the FitOptions a settings file may give
KEYS = frozenset(
    {
        "model",
        "task",
        "num_labels",
        "strategy",
        "adapter_type",
        "adapter_config",
        "names",
        "data",
        "eval_data",
        "domain_data",
        "domain_epochs",
        "output_dir",
        "ratio",
        "decay",
        *FIT_OPTIONS,
    }
)


def read_config(file: str | Path) -> dict:
    """A run's settings from a .toml, .yaml/.yml or .json file."""
    path = Path(file)
    if not path.is_file():
        raise TrainingError(f"{path}: no such settings file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        config = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        config = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        config = json.loads(text)
    else:
        raise TrainingError(f"{path}: give the run's settings as .toml, .yaml or .json")
    unknown = sorted(set(config) - KEYS)
    if unknown:
        raise TrainingError(f"{path}: unknown settings {unknown}; known: {sorted(KEYS)}")
    return config


def read_examples(file: str | Path) -> list[dict]:
    """Examples from a JSON Lines file (.jsonl) or a plain text file (one {"text": line} per line)."""
    path = Path(file)
    if not path.is_file():
        raise TrainingError(f"{path}: no such data file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [{"text": line} for line in lines]
    examples = []
    for number, line in enumerate(lines, 1):
        try:
            examples.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TrainingError(f"{path}:{number}: not a JSON object ({e.msg}); each line is one example") from None
    return examples


def load_backbone(name: str, task: str, num_labels: int | None):
    """(model, tokenizer) for `name`: "smollm2" (the embedded default) or what from_pretrained accepts."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..default_model import GGUF_FILE, default_model_dir

    kwargs = {}
    if name == "smollm2":
        name, kwargs = default_model_dir(), {"gguf_file": GGUF_FILE}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if task == "classification":
        if not num_labels:
            raise TrainingError("task = classification needs num_labels")
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, **kwargs)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    elif task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    else:
        raise TrainingError(f"task = {task!r}: use classification or causal_lm")
    return model, tokenizer


def make_strategy(config: dict) -> Strategy:
    kind = config.get("strategy", "adapter")
    adapter = dict(
        type=config.get("adapter_type", "lora"),
        config=config.get("adapter_config") or {},
        names=config.get("names") or ["adapter"],
    )
    makers = {
        "feature_extraction": lambda: FeatureExtraction(),
        "full": lambda: FullFineTuning(ratio=config.get("ratio", 30.0)),
        "discriminative": lambda: DiscriminativeLR(decay=config.get("decay", 2.6)),
        "progressive": lambda: ProgressiveUnfreezing(decay=config.get("decay", 2.6)),
        "adapter": lambda: AdapterTuning(**adapter),
        "domain": lambda: DomainAdaptation(
            AdapterTuning(**adapter), _domain_texts(config), epochs=config.get("domain_epochs", 1)
        ),
    }
    if kind not in makers:
        raise TrainingError(f"strategy = {kind!r}: use one of {sorted(makers)}")
    return makers[kind]()


def _domain_texts(config: dict) -> list[str]:
    if not config.get("domain_data"):
        raise TrainingError("strategy = domain needs domain_data: a file of unlabelled target-domain text")
    return [e["text"] for e in read_examples(config["domain_data"])]


def run(config: dict) -> FitResult:
    """Loads the backbone and data that `config` names and fits it."""
    if not config.get("data"):
        raise TrainingError("no training data: set data (a .jsonl file of examples)")
    model, tokenizer = load_backbone(
        config.get("model", "smollm2"), config.get("task", "causal_lm"), config.get("num_labels")
    )
    eval_data = read_examples(config["eval_data"]) if config.get("eval_data") else None
    options = FitOptions(
        output_dir=config.get("output_dir"), **{k: config[k] for k in FIT_OPTIONS if config.get(k) is not None}
    )
    return fit(
        model,
        make_strategy(config),
        read_examples(config["data"]),
        tokenizer=tokenizer,
        eval=eval_data,
        options=options,
    )
