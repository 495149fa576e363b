"""Prompt tuning in PEFT's format: learned virtual-token embeddings put in front of each row's input.

PEFT runs one adapter per batch: inputs_embeds = cat(prompt (n, dim), embed(ids)) and the attention
mask gains n ones. Here rows may carry prompts of different lengths, or none, in one batch, so the
batch gains N = the longest prompt's length and each row is padded to it, with the attention mask,
position ids (counted over unmasked positions), token type ids and labels (-100) following suit:

    causal LM  row i:  [pad (N - n_i) | prompt_i (n_i) | tokens (T)]   its token outputs: the last T
    encoder    row i:  [prompt_i (n_i) | tokens (T) | pad (N - n_i)]   position 0 stays the first token,
                                                                        as the pooler expects
so every row's outputs equal running that row alone. In generate(), later steps extend the mask,
positions and cache positions by the same N.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from ..formats import CONFIG_FILE, PROMPT_PREFIX, Adapter, check_config, read_peft, write_peft
from ..plugins.contract import AdapterType, ModuleSlots, Route
from ..plugins.hookspecs import hookimpl

KEY = "prompt_embeddings"
KNOWN_KEYS = frozenset(
    [
        "auto_mapping",
        "base_model_name_or_path",
        "inference_mode",
        "modules_to_save",
        "num_attention_heads",
        "num_layers",
        "num_transformer_submodules",
        "num_virtual_tokens",
        "peft_type",
        "peft_version",
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "revision",
        "task_type",
        "token_dim",
        "tokenizer_kwargs",
        "tokenizer_name_or_path",
    ]
)
SCHEMA = {
    "type": "object",
    "required": ["num_virtual_tokens"],
    "properties": {
        "num_virtual_tokens": {"type": "integer", "minimum": 1},
        "token_dim": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1}]},
        "num_transformer_submodules": {
            "anyOf": [{"type": "null"}, {"const": 1}],
            "description": "2 (encoder-decoder models) is not supported",
        },
        "modules_to_save": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "string"}}]},
    },
}
_FEATURE = "virtual_tokens="  # route feature "virtual_tokens=n": a row of the batch has an n-token prompt


class PromptSlots(ModuleSlots):
    """Per-slot prompts (slots, max_tokens, dim) of one model, put in front of its inputs."""

    def __init__(self, model: nn.Module, slots: int, max_tokens: int):
        super().__init__()
        embedding = model.get_input_embeddings()
        self._model = [model]  # a list: the model is our parent, not our child
        self.causal = _reads_last_position(model)
        # RoBERTa-family embeddings number positions from padding_idx + 1; BERT's and Llama's from 0.
        self.first_position = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", -1) + 1
        kw = dict(device=embedding.weight.device)
        self.register_buffer(
            "prompts",
            torch.zeros(slots, max_tokens, embedding.weight.size(1), dtype=embedding.weight.dtype, **kw),
            persistent=False,
        )
        self.register_buffer("lengths", torch.zeros(slots, dtype=torch.int64, **kw), persistent=False)
        self._prefix: tuple[Route, torch.Tensor, bool] | None = None  # (batch, (B, N) prefix mask, padded)

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        n = 0 if tensors is None else tensors[KEY].size(0)
        if n:
            self.prompts[slot, :n].copy_(tensors[KEY])
        self.lengths[slot] = n

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        n = int(self.lengths[slot])
        return {KEY: self.prompts[slot, :n].clone()} if n else None

    def virtual_tokens(self, slot: int) -> torch.Tensor | None:
        n = int(self.lengths[slot])
        return self.prompts[slot, :n] if n else None

    def before(self, module: nn.Module, args: tuple, kwargs: dict, route: Route) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        ids, embeds = kwargs.pop("input_ids", None), kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(ids)  # (B, T, dim)
        B, T = embeds.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it "cache"
        cached = 0 if cache is None else cache.get_seq_length()
        if cached and (self._prefix is None or self._prefix[0] is not route):
            raise AdapterError(
                "a prompt-tuning batch continued from a cache that another batch made; run all "
                "steps of one generation inside one Backbone.use block"
            )
        mask = kwargs.get("attention_mask")
        if mask is None:  # the caller's tokens only; the cache also holds the prompt block
            mask = torch.ones(
                B, cached + T - (self._prefix[1].size(1) if cached else 0), dtype=torch.long, device=embeds.device
            )
        if cached:  # a later generation step: the prompt is in the cache already
            prefix = self._prefix[1]
            kwargs["inputs_embeds"] = embeds
        else:
            index = route.rows(B, B, embeds.device)  # (B,)
            N = max(int(f.removeprefix(_FEATURE)) for f in route.features if f.startswith(_FEATURE))
            n = torch.where(index < 0, 0, self.lengths[index.clamp(min=0)])  # (B,)
            k = torch.arange(N, device=embeds.device)  # (N,)
            k = k - (N - n[:, None]) if self.causal else k.expand(B, N)  # (B, N) place in own prompt
            present = (k >= 0) & (k < n[:, None])  # (B, N)
            prompts = self.prompts[index.clamp(min=0)[:, None], k.clamp(0, self.prompts.size(1) - 1)]  # (B, N, dim)
            prompts = prompts.to(embeds.dtype) * present[..., None]
            prefix = present.to(mask.dtype)
            padded = bool((n < N).any())  # rows of other types, the base or shorter prompts
            self._prefix = (route, prefix, padded)
            order = self._order(n, N, T) if not self.causal else None
            kwargs["inputs_embeds"] = _arrange(torch.cat((prompts, embeds), 1), order)
            for key, fill in (("token_type_ids", 0), ("labels", -100)):
                value = kwargs.get(key)
                if value is not None and value.dim() == 2 and value.size(1) == T:  # per token, not per sequence
                    value = torch.cat((torch.full((B, N), fill, dtype=value.dtype, device=value.device), value), 1)
                    if key == "labels" and self.causal:  # a row without prompt predicts no first token, as alone
                        value[:, N] = torch.where(n == 0, fill, value[:, N])
                    kwargs[key] = _arrange(value, order)
            mask = _arrange(torch.cat((prefix, mask), 1), order)
            prefix = None
        if prefix is not None:
            mask = torch.cat((prefix, mask), 1)
        kwargs["attention_mask"] = mask
        L = kwargs["inputs_embeds"].size(1)
        if self._prefix[2] or cached:  # positions counted over each row's own tokens
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -L:] + self.first_position
        else:  # no row padded: the model numbers positions itself, as under PEFT (RoBERTa starts past padding_idx)
            kwargs.pop("position_ids", None)
        if kwargs.get("cache_position") is not None:  # generate() counts positions without the prompt
            shift = self._prefix[1].size(1) if cached else 0
            kwargs["cache_position"] = (
                torch.arange(L, device=mask.device) if not cached else kwargs["cache_position"] + shift
            )
        return args, kwargs

    @staticmethod
    def _order(n: torch.Tensor, N: int, T: int) -> torch.Tensor:
        """(B, N+T) gather order turning [prompt block (N) | tokens (T)] into [prompt | tokens | pad]."""
        j = torch.arange(N + T, device=n.device).expand(n.size(0), -1)  # (B, N+T) target position
        nn_ = n[:, None]
        return torch.where(j < nn_, j, torch.where(j < nn_ + T, j - nn_ + N, j - T))


def _reads_last_position(model: nn.Module) -> bool:
    """Decoders (causal LMs, and their sequence classifiers, which read the last position) get their
    padding on the left; encoders (whose poolers read position 0) on the right."""
    from transformers.models.auto import modeling_auto

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return bool(model.can_generate()) or (
        model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _arrange(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, ...) with each row's positions taken in `order` (B, L); x itself when None."""
    if order is None:
        return x
    return x.gather(1, order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:]))


class PromptTuningType(AdapterType):
    name = "prompt_tuning"
    # packed stays False: virtual tokens lengthen each row; the server puts them in the sequence itself
    aliases = ("PROMPT_TUNING",)
    config_schema = SCHEMA
    description = "prompt tuning (PEFT format): learned virtual tokens, padded per row in mixed batches"

    def read(self, directory: Path, *, allow_pickle: bool = False) -> Adapter:
        files = read_peft(
            directory,
            peft_types=self.aliases,
            suffixes=(),
            schema=SCHEMA,
            known_keys=KNOWN_KEYS,
            shared=[KEY],
            prefix=PROMPT_PREFIX,
            allow_pickle=allow_pickle,
        )
        config, file = files.config, files.file
        if KEY not in files.shared:
            raise AdapterError(f"{file}: no {KEY!r} (n_virtual, dim); save the adapter again with PEFT")
        prompt = files.shared[KEY]
        n, dim = config["num_virtual_tokens"], config.get("token_dim")
        if prompt.ndim != 2 or prompt.size(0) != n or (dim is not None and prompt.size(1) != dim):
            raise AdapterError(
                f"{file}: {KEY} has shape {tuple(prompt.shape)}, but {CONFIG_FILE} gives "
                f"num_virtual_tokens={n}, token_dim={dim}; save the adapter again"
            )
        return Adapter(
            type=self.name,
            config=config,
            modules={"": {KEY: prompt}},
            modules_to_save=files.modules_to_save,
            source=str(directory),
        )

    def write(self, adapter: Adapter, directory: Path) -> None:
        prompt = adapter.modules[""][KEY]
        config = {
            **adapter.config,
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": prompt.size(0),
            "token_dim": prompt.size(1),
            "num_transformer_submodules": 1,
            "modules_to_save": sorted(adapter.modules_to_save) or None,
        }
        write_peft(directory, config, {}, adapter.modules_to_save, extra={KEY: prompt}, prefix=PROMPT_PREFIX)

    def features(self, adapter: Adapter) -> frozenset[str]:
        return frozenset({f"{_FEATURE}{self.rank(adapter)}"})

    def rank(self, adapter: Adapter) -> int:
        return adapter.modules[""][KEY].size(0)  # virtual tokens: the slot width

    def check(self, adapter: Adapter, model: nn.Module) -> None:
        if set(adapter.modules) != {""}:
            raise AdapterError(
                f"{adapter.source}: a prompt-tuning adapter adapts the whole model (module ''), "
                f"not {sorted(adapter.modules)}"
            )
        embedding = model.get_input_embeddings()
        dim = adapter.modules[""][KEY].size(1)
        if embedding is None or embedding.weight.size(1) != dim:
            raise AdapterError(
                f"{adapter.source}: {KEY} has dim {dim}, but {type(model).__name__}'s input embeddings "
                f"have {None if embedding is None else embedding.weight.size(1)}; was the adapter "
                "trained on another base model?"
            )

    def allocate(self, module: nn.Module, path: str, slots: int, max_rank: int) -> PromptSlots:
        if path != "" or not hasattr(module, "get_input_embeddings"):
            raise AdapterError(f"prompt tuning attaches to the whole transformers model, not {path!r}")
        return PromptSlots(module, slots, max_rank)

    def init(self, model: nn.Module, config: dict) -> Adapter:
        """PEFT's prompt_tuning_init="RANDOM": an nn.Embedding's default init, N(0, 1)."""
        config = {"peft_type": "PROMPT_TUNING", **config}
        check_config(config, SCHEMA, "init config")
        weight = model.get_input_embeddings().weight
        prompt = torch.randn(config["num_virtual_tokens"], weight.size(1), dtype=weight.dtype)
        return Adapter(type=self.name, config=config, modules={"": {KEY: prompt}}, source="init")


@hookimpl
def adapter_types() -> list[AdapterType]:
    return [PromptTuningType()]
