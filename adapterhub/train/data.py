"""Labelled or unlabelled examples turned into checked, padded batches.

Examples are dicts:
    classification  {"text": str, "label": int | str}          (str: a name in model.config.label2id)
    causal LM       {"text": str}                              loss on every token
                    {"prompt": str, "completion": str}         loss on the completion only
Any example may name {"adapter": name}: the Backbone slot its row trains (several adapters in one batch).
Every problem is a TrainingError naming the example and the fix, raised before training starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .errors import TrainingError

CLASSIFICATION, CAUSAL_LM = "classification", "causal_lm"
IGNORE = -100  # label of tokens without loss, as transformers uses it


@dataclass
class Example:
    ids: list[int]
    labels: list[int] | int  # per token (causal LM) or the class (classification)
    adapter: str | None


def task_of(model: torch.nn.Module) -> str:
    """CLASSIFICATION for *ForSequenceClassification models, CAUSAL_LM for *ForCausalLM ones."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return CLASSIFICATION
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    raise TrainingError(
        f"cannot train a {name}: adapterhub.train trains *ForSequenceClassification models "
        "(labelled texts) and *ForCausalLM models (texts, or prompt/completion pairs); load the "
        "backbone with AutoModelForSequenceClassification or AutoModelForCausalLM"
    )


def context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def prepare(
    examples: Sequence[dict],
    tokenizer,
    model: torch.nn.Module,
    task: str,
    *,
    name: str = "train",
    max_length: int | None = None,
    truncate: bool = False,
    chat: bool = False,
) -> list[Example]:
    """Tokenised, checked examples. `chat`: prompts go through the tokenizer's chat template (instruct models)."""
    if not examples:
        raise TrainingError(f"{name} data is empty: give at least one example")
    limit = max_length or context_length(model)
    prepared = []
    for i, example in enumerate(examples):
        where = f"{name} example {i}"
        if not isinstance(example, dict):
            raise TrainingError(
                f'{where} is a {type(example).__name__}; examples are dicts such as {{"text": ..., "label": ...}}'
            )
        if task == CLASSIFICATION:
            ids, labels = _classification(example, tokenizer, model, where)
        else:
            ids, labels = _language_model(example, tokenizer, where, chat)
        if limit and len(ids) > limit:
            if not truncate:
                raise TrainingError(
                    f"{where} has {len(ids)} tokens, more than the backbone's context of {limit}; "
                    "shorten it, or pass truncate=True (max_length=...) to cut it"
                )
            ids = ids[:limit]
            labels = labels if task == CLASSIFICATION else labels[:limit]
        prepared.append(Example(ids, labels, example.get("adapter")))
    return prepared


def _classification(example: dict, tokenizer, model, where: str) -> tuple[list[int], int]:
    if not isinstance(example.get("text"), str) or "label" not in example:
        raise TrainingError(f'{where} needs "text" (a string) and "label"; it has keys {sorted(example)}')
    label, num_labels = example["label"], model.config.num_labels
    if isinstance(label, str):
        label2id = getattr(model.config, "label2id", {}) or {}
        if label not in label2id or set(label2id) == {f"LABEL_{k}" for k in range(num_labels)}:
            raise TrainingError(
                f"{where} has label {label!r}, which is not a label of the model "
                f"({sorted(label2id)}); create the model with label2id/id2label, or use integers"
            )
        label = label2id[label]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
        raise TrainingError(
            f"{where} has label {example['label']!r}; the model has num_labels={num_labels}, so "
            f"labels are integers 0..{num_labels - 1}: fix the data or create the model with "
            "more labels"
        )
    return tokenizer(example["text"])["input_ids"], label


def _language_model(example: dict, tokenizer, where: str, chat: bool) -> tuple[list[int], list[int]]:
    if isinstance(example.get("prompt"), str) and isinstance(example.get("completion"), str):
        if chat:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": example["prompt"]}], add_generation_prompt=True, tokenize=False
            )
        else:
            prompt = example["prompt"]
        prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        if not completion:
            raise TrainingError(f"{where} has an empty completion: nothing to learn from it")
        return prompt_ids + completion, [IGNORE] * len(prompt_ids) + completion
    if isinstance(example.get("text"), str) and example["text"]:
        ids = tokenizer(example["text"])["input_ids"]
        return ids, list(ids)
    raise TrainingError(
        f'{where} needs "text" (a non-empty string) or "prompt" and "completion"; it has keys {sorted(example)}'
    )


def batches(
    examples: list[Example],
    batch_size: int,
    task: str,
    pad_id: int,
    *,
    generator: torch.Generator | None,
    skip: int = 0,
) -> Iterator[tuple[dict[str, torch.Tensor], list[str | None]]]:
    """(model inputs, adapter per row) for each batch, shuffled by `generator` (None: in order),
    right-padded; the first `skip` batches are passed over (resuming mid-epoch)."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else list(range(len(examples)))
    for start in range(skip * batch_size, len(order), batch_size):
        chosen = [examples[k] for k in order[start : start + batch_size]]
        width = max(len(e.ids) for e in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long) if task == CAUSAL_LM else None
        for row, e in enumerate(chosen):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            mask[row, : len(e.ids)] = 1
            if labels is not None:
                labels[row, : len(e.ids)] = torch.tensor(e.labels)
        if labels is None:
            labels = torch.tensor([e.labels for e in chosen])
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}, [e.adapter for e in chosen]


def count_batches(examples: list[Example], batch_size: int) -> int:
    return -(-len(examples) // batch_size)
