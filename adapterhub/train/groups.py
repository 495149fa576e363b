"""A model's parameters as layer groups from the input to the output, as ULMFiT splits them:
[embeddings and everything before the blocks], [block 0], ..., [block n-1], [final norm and head]."""

from __future__ import annotations

from torch import nn

from .errors import TrainingError


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter groups from the input (index 0) to the output (last); the blocks are those of the
    model's largest nn.ModuleList. Tied parameters appear once, in the first group that uses them."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise TrainingError(
            f"{type(model).__name__} has no nn.ModuleList of blocks, so it has no layer groups to "
            "unfreeze or give learning rates; use FullFineTuning or FeatureExtraction"
        )
    _, blocks = max(lists, key=lambda item: len(item[1]))
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    before, middle, after = [], [[] for _ in blocks], []
    seen_block = False
    for p in model.parameters():  # tied parameters once
        if id(p) in block_of:
            middle[block_of[id(p)]].append(p)
            seen_block = True
        else:
            (after if seen_block else before).append(p)
    return [g for g in (before, *middle, after) if g]
