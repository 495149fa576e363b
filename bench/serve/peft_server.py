"""The PEFT baseline server: the same HTTP API as `adapterhub serve` (adapterhub.serve.app.create_app),
behind an engine that does what one would do with PEFT alone: every adapter loaded up front into one
PeftModel (`load_adapter`), and ONE request at a time on a worker thread: `set_adapter(name)`, prefill,
then greedy (or sampled) decoding with a KV cache until max_tokens, end of sequence or a stop string.

    python -m bench.serve.peft_server --adapter a00=DIR --adapter a01=DIR ... --port 0

prints `peft baseline: ready on http://127.0.0.1:PORT/v1` once it accepts requests. The load
generator cannot tell it from ours: same routes, same request and response bodies, same streaming.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from pathlib import Path

import torch
from transformers import DynamicCache

from adapterhub.backbone import AdapterInfo
from adapterhub.serve.engine import Failed, Finished, Request, Token, end_of_sequence
from adapterhub.serve.errors import RequestError, UnknownAdapter
from adapterhub.serve.metrics import Metrics
from adapterhub.serve.sampling import Sampling, TextStream, next_tokens

READY = "peft baseline: ready on"
log = logging.getLogger("bench.serve.peft")


class PeftEngine:
    """What LocalBackend (and so create_app) needs from an Engine, over a PeftModel serving one request
    at a time."""

    def __init__(self, peft_model, tokenizer, *, base_name: str, sources: dict[str, str]):
        self.model, self.tokenizer, self.base_name, self._sources = peft_model, tokenizer, base_name, sources
        self.metrics = Metrics()  # no watch(): its gauges read a Backbone, which this engine does not have
        config = peft_model.get_base_model().config
        self.context = int(config.max_position_embeddings)
        self.eos = end_of_sequence(peft_model.get_base_model(), tokenizer)
        self._lock = threading.Condition()
        self._model_lock = threading.Lock()  # generation, loads and deletions take turns on the PeftModel
        self._queue: deque[Request] = deque()
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="peft-baseline", daemon=True)

    def start(self) -> PeftEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join()

    # ---- what app.py asks ----------------------------------------------------------------
    def adapters(self) -> dict[str, AdapterInfo]:
        infos = {}
        for slot, name in enumerate(self._sources):
            config = self.model.peft_config[name]
            layers = [m for m in self.model.modules() if hasattr(m, "lora_A") and name in m.lora_A]
            nbytes = sum(
                p.numel() * p.element_size()
                for m in layers
                for p in (*m.lora_A[name].parameters(), *m.lora_B[name].parameters())
            )
            infos[name] = AdapterInfo(
                name=name,
                type="lora",
                source=self._sources[name],
                slot=slot,
                rank=config.r,
                modules=len(layers),
                nbytes=nbytes,
                pinned=False,
                config=config.to_dict(),
            )
        return infos

    def source_of(self, name: str) -> str:
        if name not in self._sources:
            raise UnknownAdapter(f"no adapter named {name!r}")
        return self._sources[name]

    def add_adapter(self, name: str, source: str, revision: str | None = None) -> AdapterInfo:
        """PEFT's load_adapter (a name in use is replaced: deleted, then loaded again)."""
        with self._model_lock:
            if name in self._sources:
                self.model.delete_adapter(name)
                del self._sources[name]
            self.model.load_adapter(
                source, adapter_name=name, low_cpu_mem_usage=True, **({"revision": revision} if revision else {})
            )
            self._sources[name] = source
        return self.adapters()[name]

    def remove_adapter(self, name: str, timeout: float | None = None) -> int:
        """PEFT's delete_adapter, between two requests: none is left in flight."""
        with self._model_lock:
            self.source_of(name)
            del self._sources[name]
            self.model.delete_adapter(name)
        return 0

    def queue_depth(self) -> int:
        return len(self._queue)

    def running_rows(self) -> int:
        return int(self._busy)

    def submit(self, adapter: str | None, prompt: list[int], sampling: Sampling, on_event) -> Request:
        if adapter is not None and adapter not in self._sources:
            raise UnknownAdapter(f"no adapter named {adapter!r}; available: {[self.base_name, *self._sources]}")
        if not prompt:
            raise RequestError("the prompt is empty")
        if len(prompt) + sampling.max_tokens > self.context:
            raise RequestError(
                f"prompt of {len(prompt)} tokens + max_tokens {sampling.max_tokens} > context {self.context}"
            )
        if sampling.n != 1:
            raise RequestError("the PEFT baseline generates one choice per request (n=1)")
        request = Request(adapter, adapter, list(prompt), sampling, on_event, unfinished=1)
        with self._lock:
            self._queue.append(request)
            self._lock.notify_all()
        return request

    # ---- the worker thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                request = self._queue.popleft()
                self._busy = True
            try:
                if not request.cancelled:
                    with self._model_lock:
                        self._generate(request)
            except Exception as error:
                log.exception("a request failed")
                request.on_event(Failed(500, f"generation failed: {type(error).__name__}: {error}"))
            finally:
                self._busy = False

    def _generate(self, request: Request) -> None:
        sampling = request.sampling
        if request.adapter is None:
            routing = self.model.disable_adapter()
        else:
            self.model.set_adapter(request.adapter)
            routing = contextlib.nullcontext()
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        stream = TextStream(self.tokenizer, sampling.stop)
        self.metrics.queue_seconds.observe(time.perf_counter() - request.submitted)
        self.metrics.prompt_tokens.inc(len(request.prompt))
        with routing, torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([request.prompt]), cache=DynamicCache(), use_cache=True, logits_to_keep=1
            )
            count = 0
            while not request.cancelled:
                token = int(
                    next_tokens(out.logits[:, -1].float(), [sampling.temperature], [sampling.top_p], [generator])[0]
                )
                count += 1
                self.metrics.tokens(1)
                if token in self.eos and not sampling.ignore_eos:
                    return self._finish(request, "stop", stream.add(None), count)
                piece = stream.add(token)
                if stream.stopped:
                    return self._finish(request, "stop", piece, count)
                if count >= sampling.max_tokens:
                    return self._finish(request, "length", piece + stream.add(None), count)
                if piece:
                    request.on_event(Token(0, piece))
                out = self.model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)

    def _finish(self, request: Request, reason: str, piece: str, count: int) -> None:
        if piece:
            request.on_event(Token(0, piece))
        request.on_event(Finished(0, reason, count))
        self.metrics.request_seconds.observe(time.perf_counter() - request.submitted)


def load(adapters: list[tuple[str, str]]):
    """(PeftModel with every adapter loaded, tokenizer) on the embedded SmolLM2, fp32, CPU."""
    from peft import PeftModel

    from adapterhub.default_model import load_default

    base, tokenizer = load_default()
    (first, source), rest = adapters[0], adapters[1:]
    model = PeftModel.from_pretrained(base, source, adapter_name=first, low_cpu_mem_usage=True).eval()
    for name, source in rest:
        model.load_adapter(source, adapter_name=name, low_cpu_mem_usage=True)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from adapterhub.serve.app import create_app
    from adapterhub.serve.backend import LocalBackend
    from adapterhub.serve.tenancy import Sources

    parser = argparse.ArgumentParser(prog="python -m bench.serve.peft_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument(
        "--adapter-dir", dest="adapter_dir", type=Path, help="POST /v1/adapters may load directories under this one"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", dest="log_level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    adapters = [tuple(item.split("=", 1)) for item in args.adapter]
    start = time.perf_counter()
    model, tokenizer = load(adapters)
    engine = PeftEngine(model, tokenizer, base_name="SmolLM2-135M-Instruct", sources=dict(adapters)).start()
    app = create_app(LocalBackend(engine), sources=Sources(args.adapter_dir))
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    print(
        f"{READY} http://{args.host}:{sock.getsockname()[1]}/v1 ({len(adapters)} adapters loaded in "
        f"{time.perf_counter() - start:.1f} s; {torch.get_num_threads()} torch threads)",
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
