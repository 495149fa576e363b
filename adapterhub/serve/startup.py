"""Starting a server: the settings one engine is built from (a process of `adapterhub serve`, or one
Ray replica; `build_embed`: an EmbedEngine on an encoder), the line that says it is ready, and a free
port to listen on."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .admission import Limits

if TYPE_CHECKING:
    from .embed_engine import EmbedEngine
    from .engine import Engine

READY = "adapterhub serve: ready on"  # the line printed once the server accepts requests (tests wait for it)


@dataclass(frozen=True)
class EngineSettings:
    """What one engine (a process of `adapterhub serve`, or one Ray replica) is built from."""

    base: str = "smollm2"
    served_model_name: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_adapters: int = 16
    max_rank: int = 16
    max_batch: int = 64
    max_step_tokens: int = 512
    kv_cache_bytes: int | None = None  # None: room for max_batch full contexts, at most 1/4 of free memory
    prefix_cache: bool = True
    compile: str | None = None  # a torch.compile backend for the steps ("inductor"); None: eager
    limits: Limits = field(default_factory=Limits)  # queue bounds, request deadline, how long loads wait for a slot

    @property
    def base_name(self) -> str:
        """The base model's name in the API."""
        return self.served_model_name or ("SmolLM2-135M-Instruct" if self.base == "smollm2" else Path(self.base).name)

    def build(self) -> Engine:
        """The base model (the embedded SmolLM2, a directory or a Hub id) in a Backbone, in an Engine (not started)."""
        from transformers import AutoModelForCausalLM

        from ..backbone import Backbone
        from .engine import Engine

        dtype = getattr(torch, self.dtype)
        if self.base == "smollm2":
            from ..default_model import load_default

            model, tokenizer = load_default(dtype)
        else:
            tokenizer = self._tokenizer("with a chat template for /v1/chat/completions")
            model = AutoModelForCausalLM.from_pretrained(self.base, dtype=dtype).eval()
        backbone = Backbone(model.to(self.device), max_adapters=self.max_adapters, max_rank=self.max_rank)
        return Engine(
            backbone,
            tokenizer,
            base_name=self.base_name,
            max_batch=self.max_batch,
            max_step_tokens=self.max_step_tokens,
            kv_cache_bytes=self.kv_cache_bytes,
            prefix_cache=self.prefix_cache,
            compile=self.compile,
            limits=self.limits,
        )

    def build_embed(self) -> EmbedEngine:
        """The encoder at `base` (`AutoModel`, a directory or Hub id) in a Backbone, in an EmbedEngine (not
        started), pooling as its sentence-transformers config says."""
        from transformers import AutoModel

        from ..backbone import Backbone
        from .embed_engine import EmbedEngine
        from .pooling import SentenceConfig

        if self.base == "smollm2":
            raise ValueError(
                "--task embed needs --base: an encoder's directory or Hub id "
                "(e.g. sentence-transformers/all-MiniLM-L6-v2)"
            )
        tokenizer = self._tokenizer("")
        config = SentenceConfig.read(self.base)
        model = AutoModel.from_pretrained(self.base, dtype=getattr(torch, self.dtype)).eval()
        if model.config.is_encoder_decoder:
            raise ValueError(f"--base {self.base} is an encoder-decoder model; --task embed serves encoders")
        backbone = Backbone(model.to(self.device), max_adapters=self.max_adapters, max_rank=self.max_rank)
        return EmbedEngine(
            backbone,
            tokenizer,
            config,
            base_name=self.base_name,
            max_rows=self.max_batch,
            max_tokens=self.max_step_tokens,
            limits=self.limits,
        )

    def _tokenizer(self, needs: str):
        """The base's tokenizer; a ValueError saying how to provide it (`needs`: what else it must have)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.base)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"--base {self.base}: no tokenizer could be loaded from it ({str(error).splitlines()[0]}); the "
                f"server tokenizes inputs itself: save the model's tokenizer beside it (tokenizer.save_pretrained)"
                f"{', ' + needs if needs else ''}"
            ) from None


def ready(url: str, base_name: str, adapters: list[str], extra: str = "") -> None:
    print(f"{READY} {url} (base {base_name}; adapters: {', '.join(adapters) or 'none yet'}{extra})", flush=True)


def free_port(host: str = "127.0.0.1", preferred: int = 0) -> int:
    """`preferred` if nothing listens there on `host`, else a port the system picks."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        if preferred:
            try:
                probe.bind((host, preferred))
                return preferred
            except OSError:
                pass
        probe.bind((host, 0))
        return probe.getsockname()[1]
