"""How an encoder's token outputs become one vector per input, as the model's sentence-transformers
config says (the embedding server's, embed_engine.py).

`modules.json` lists Transformer, then Pooling (`1_Pooling/config.json`: mean or CLS; max,
mean-sqrt-len, weighted mean and last token are refused by name) and optionally Normalize (L2); an
input longer than `sentence_bert_config.json`'s max_seq_length is refused, where sentence-transformers
would truncate it. A model without modules.json: mean over the tokens, not normalized.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_ST = "sentence_transformers.models."
_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclass(frozen=True)
class SentenceConfig:
    """How token outputs become one vector, and how text is prepared, per sentence-transformers' files."""

    pooling: str = "mean"  # "mean" over the attended tokens, or "cls": the first token's output
    normalize: bool = False  # L2-normalize the pooled vector
    max_seq_length: int | None = None  # sentence_bert_config.json's: longer inputs are refused
    lowercase: bool = False  # sentence_bert_config.json's do_lower_case

    @classmethod
    def read(cls, base: str) -> SentenceConfig:
        """The config of `base` (a model directory or Hub id); the default without modules.json. A
        ValueError names a module or pooling mode this server does not run."""
        modules = _json(base, "modules.json")
        if modules is None:
            return cls()
        pooling, normalize = None, False
        for module in modules:
            kind = module.get("type", "").removeprefix(_ST)
            if kind == "Pooling":
                pooling = _pooling(base, module.get("path", ""))
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise ValueError(
                    f"{base}: modules.json's {module.get('type')!r} ({module.get('path')}) is not supported; the "
                    "embedding server runs Transformer, Pooling (mean or CLS) and Normalize"
                )
        if pooling is None:
            raise ValueError(f"{base}: modules.json has no Pooling module, so its embeddings are not defined here")
        settings = _json(base, "sentence_bert_config.json") or {}
        return cls(pooling, normalize, settings.get("max_seq_length"), bool(settings.get("do_lower_case")))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (rows, T, dim), mask (rows, T) of 1 at real tokens -> (rows, dim) fp32."""
        hidden = hidden.float()
        if self.pooling == "cls":
            vectors = hidden[:, 0]
        else:  # as sentence-transformers: the sum over attended tokens over their count
            weights = mask.to(hidden.device, torch.float32).unsqueeze(-1)  # (rows, T, 1)
            vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(vectors, p=2, dim=1) if self.normalize else vectors


def _json(base: str, name: str):
    """The JSON file `name` of a model directory or Hub repo, or None if it has none."""
    if os.path.isdir(base):
        path = Path(base) / name
        path = path if path.is_file() else None
    else:
        from transformers.utils import cached_file

        path = cached_file(base, name, _raise_exceptions_for_missing_entries=False)
    return None if path is None else json.loads(Path(path).read_text())


def _pooling(base: str, folder: str) -> str:
    config = _json(base, f"{folder}/config.json" if folder else "config.json") or {}
    modes = sorted(key for key, on in config.items() if key.startswith("pooling_mode") and on is True)
    if len(modes) != 1 or modes[0] not in _POOLINGS:
        raise ValueError(
            f"{base}: {folder}/config.json pools by {' + '.join(modes) or 'nothing'}; the embedding server "
            "pools by pooling_mode_mean_tokens or pooling_mode_cls_token alone"
        )
    return _POOLINGS[modes[0]]
