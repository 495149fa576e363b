"""`adapterhub serve`: the base model (default: the embedded SmolLM2-135M-Instruct), its adapters,
the engine and the HTTP app, on one port. `--task embed` serves an encoder's embeddings instead
(embeddings.py, embed_engine.py; docs/serving-embeddings.md).

    adapterhub serve --adapter upper=~/.cache/adapterhub/demo-adapters/upper --port 8000
    curl localhost:8000/v1/completions -d '{"model": "upper", "prompt": "Hello", "max_tokens": 8}'
    adapterhub serve --task embed --base sentence-transformers/all-MiniLM-L6-v2 --adapter legal=./legal-lora
    curl localhost:8000/v1/embeddings -d '{"model": "legal", "input": ["A sentence.", "Another one."]}'
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from pathlib import Path

import torch

from .admission import Limits
from .startup import EngineSettings, ready

STEP_TOKENS = {"generate": 512, "embed": 8192}  # --max-step-tokens' default per --task


def add_parser(commands) -> None:
    parser = commands.add_parser("serve", help="the OpenAI-compatible multi-tenant server (extra: serve)")
    parser.add_argument(
        "--task",
        default="generate",
        choices=["generate", "embed"],
        help="generate: completions and chat on a causal LM; embed: /v1/embeddings on an encoder (AutoModel), "
        "pooled as its sentence-transformers config says (default: mean, not normalized)",
    )
    parser.add_argument(
        "--base",
        default="smollm2",
        help='"smollm2" (the embedded SmolLM2-135M-Instruct), a model directory or a Hub id; it needs a tokenizer, '
        "and a chat template for /v1/chat/completions",
    )
    parser.add_argument(
        "--served-model-name",
        dest="served_model_name",
        help="the base model's name in the API (default: the base's directory or repo name)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="an adapter to load at start (a directory or Hub id); repeat for more",
    )
    parser.add_argument(
        "--adapter-dir", dest="adapter_dir", type=Path, help="POST /v1/adapters may load directories under this one"
    )
    parser.add_argument(
        "--allow-hub",
        dest="allow_hub",
        action="store_true",
        help="POST /v1/adapters may load Hugging Face Hub repo ids",
    )
    parser.add_argument(
        "--max-adapters",
        dest="max_adapters",
        type=int,
        default=16,
        help="adapter slots (resident at once); the others wait in the host cache",
    )
    parser.add_argument(
        "--max-rank",
        dest="max_rank",
        type=int,
        default=16,
        help="the widest adapter served, of any type: LoRA rank, LoHa's r*r, bottleneck width",
    )
    parser.add_argument(
        "--max-batch", dest="max_batch", type=int, default=64, help="rows in flight (--task embed: rows per forward)"
    )
    parser.add_argument(
        "--max-step-tokens",
        dest="max_step_tokens",
        type=int,
        help="tokens per forward: one per running row first, prompt chunks in the rest (>= --max-batch; default "
        f"{STEP_TOKENS['generate']}); --task embed: padded tokens per forward (default {STEP_TOKENS['embed']})",
    )
    parser.add_argument(
        "--kv-cache-bytes",
        dest="kv_cache_bytes",
        type=_size,
        help="memory for the paged KV cache, e.g. 4GiB (default: room for --max-batch full contexts, "
        "at most a quarter of free memory)",
    )
    parser.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="never reuse the K/V of a prompt prefix (reuse is only ever within one adapter version)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the steps through torch.compile (inductor, dynamic shapes): minutes of compiling at the "
        "first steps of each mix of adapter types, then no recompiles as routings change",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    parser.add_argument(
        "--api-key",
        dest="api_key",
        help="a keys file (JSON or TOML: keys -> allowed models, see adapterhub/serve/tenancy.py) "
        "or one key allowed everything",
    )
    parser.add_argument(
        "--max-queue",
        dest="max_queue",
        type=_positive(int),
        default=Limits.max_queue,
        help="requests that may wait to join the batch; beyond it (or a key's fair share of it) 429 with Retry-After",
    )
    parser.add_argument(
        "--max-queue-tokens",
        dest="max_queue_tokens",
        type=_positive(int),
        help="prompt tokens that may wait to join the batch (default: 8 x the KV cache's tokens)",
    )
    parser.add_argument(
        "--request-timeout",
        dest="request_timeout",
        type=_positive(float),
        help="seconds a request may take from submission to its last token; then it stops and gets 504 "
        "(default: no deadline)",
    )
    parser.add_argument(
        "--load-wait",
        dest="load_wait",
        type=_positive(float),
        default=Limits.load_wait,
        help="seconds POST /v1/adapters waits for a slot while every slot serves requests, then 503",
    )
    parser.add_argument(
        "--drain-timeout",
        dest="drain_timeout",
        type=_positive(float),
        default=30.0,
        help="on SIGTERM/SIGINT: seconds the requests in flight may take to finish before they are failed (503)",
    )
    parser.add_argument(
        "--max-body-bytes",
        dest="max_body_bytes",
        type=_size,
        default=8 * 2**20,
        help="the largest request body (413 past it), e.g. 8MiB",
    )
    parser.add_argument(
        "--metrics-port",
        dest="metrics_port",
        type=int,
        help="serve /metrics on this port (on --host, no key) instead of behind the admin key on the API's port",
    )
    parser.add_argument("--log-level", dest="log_level", default="warning")
    parser.add_argument(
        "--ray", action="store_true", help="run as a Ray Serve application (extra: ray): adapterhub/serve/ray_app.py"
    )
    parser.add_argument("--replicas", type=int, default=1, help="with --ray: engine replicas, each a whole model")
    parser.add_argument(
        "--ingress-replicas",
        dest="ingress_replicas",
        type=_positive(int),
        default=1,
        help="with --ray: HTTP ingress replicas (they share the adapter registry)",
    )
    parser.add_argument(
        "--replica-cpus",
        dest="replica_cpus",
        type=float,
        default=1.0,
        help="with --ray: CPUs each replica reserves (its torch threads)",
    )
    parser.add_argument(
        "--replica-gpus", dest="replica_gpus", type=float, default=0.0, help="with --ray: GPUs each replica reserves"
    )
    parser.add_argument(
        "--address", help="with --ray: an existing cluster ('auto', ray://...); default: start one here"
    )


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive {kind.__name__}")
        return value

    return parse


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """Bytes from '4GiB', '512MB', '1000000'."""
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number) :].upper()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 4GiB, 512MB or 1000000") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size")
    return int(value)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as missing:
        print(
            f"adapterhub serve needs the extra 'serve' ({missing.name} is missing): pip install 'adapterhub[serve]'",
            file=sys.stderr,
        )
        return 2
    from ..errors import AdapterError
    from .backend import LocalBackend, source_label
    from .embeddings import EmbedBackend
    from .tenancy import Keys, Sources

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    refused = _refused_with_embed(args)
    if refused:
        print(f"adapterhub serve: {refused}", file=sys.stderr)
        return 2
    sources = Sources(args.adapter_dir, args.allow_hub)
    adapters = {}
    for item in args.adapter:
        name, _, source = item.partition("=")
        if not name or not source:
            print(f"adapterhub serve: --adapter {item!r}: expected NAME=SOURCE", file=sys.stderr)
            return 2
        try:
            adapters[name] = sources.resolve_cli(source)  # its files checked against their root
        except AdapterError as error:
            print(f"adapterhub serve: --adapter {item}: {error}", file=sys.stderr)
            return 2
    try:
        keys = Keys.from_option(args.api_key) if args.api_key else None
    except ValueError as error:
        print(f"adapterhub serve: --api-key: {error}", file=sys.stderr)
        return 2
    settings = EngineSettings(
        args.base,
        args.served_model_name,
        args.dtype,
        args.device,
        args.max_adapters,
        args.max_rank,
        args.max_batch,
        args.max_step_tokens or STEP_TOKENS[args.task],
        args.kv_cache_bytes,
        args.prefix_cache,
        "inductor" if args.compile else None,
        Limits(args.max_queue, args.max_queue_tokens, args.request_timeout, args.load_wait),
    )
    if args.ray:
        from . import ray_app

        return ray_app.serve_cli(settings, adapters, keys, sources, args)
    try:
        engine = settings.build_embed() if args.task == "embed" else settings.build()
    except (ValueError, TypeError) as error:  # a bad setting, a model the engine cannot serve
        print(f"adapterhub serve: {error}", file=sys.stderr)
        return 2
    for adapter, source in adapters.items():
        try:
            engine.add_adapter(adapter, source, label=source_label(source), root=sources.root_of(source))
        except AdapterError as error:
            print(f"adapterhub serve: --adapter {adapter}={source}: {error}", file=sys.stderr)
            return 2
    app = create_app(
        (EmbedBackend if args.task == "embed" else LocalBackend)(engine.start()),
        keys=keys,
        sources=sources,
        metrics_route=args.metrics_port is None,
        max_body=args.max_body_bytes,
    )
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.host, registry=engine.metrics.registry)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    task = "; embeddings" if args.task == "embed" else ""
    ready(f"http://{args.host}:{sock.getsockname()[1]}/v1", engine.base_name, list(adapters), task)
    # SIGTERM/SIGINT: uvicorn stops accepting; the engine lets the requests in flight finish for up to
    # --drain-timeout, then answers the rest 503, which their routes send before uvicorn's own (later)
    # deadline would cut the connections.
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout + 10)
    _draining_server()(config, engine, args.drain_timeout).run(sockets=[sock])
    return 0


def _refused_with_embed(args: argparse.Namespace) -> str | None:
    """Why options of text generation cannot go with --task embed, or None."""
    if args.task != "embed":
        return None
    if args.ray:
        return "--ray serves --task generate only; run one `adapterhub serve --task embed` per machine instead"
    given = [
        option
        for option, used in (
            ("--compile", args.compile),
            ("--kv-cache-bytes", args.kv_cache_bytes is not None),
            ("--no-prefix-cache", not args.prefix_cache),
        )
        if used
    ]
    return f"{', '.join(given)}: only for --task generate (an encoder has no KV cache)" if given else None


def _draining_server():
    """uvicorn's Server class that, at the first exit signal, also starts the engine's drain."""
    import uvicorn

    class Draining(uvicorn.Server):
        def __init__(self, config, engine, drain: float):
            super().__init__(config)
            self.engine, self.drain = engine, drain

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                threading.Thread(target=self.engine.stop, args=(self.drain,), name="adapterhub-drain").start()
            super().handle_exit(sig, frame)

    return Draining
