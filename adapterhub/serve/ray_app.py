"""The multi-tenant server as a Ray Serve application (`adapterhub serve --ray`, extra `ray`).

    client --HTTP--> Ray's proxy --> Ingress (the same FastAPI app as `adapterhub serve`, app.py)
                                       | RayBackend: adapter name -> version, multiplexed model id
                                       v
                     EngineReplica x N: one backbone, its slot pool and an Engine (engine.py) each

An adapter's version ("name@k") is Ray's multiplexed model id, so Ray sends a request to a replica
that already holds that adapter when one does, and otherwise to one that loads it: the replica's
multiplexed loader is `Engine.add_adapter` (local directories, Hub ids), and Ray's per-replica model
limit is the replica's slot count (`--max-adapters`), so Ray's LRU unloads (`Engine.remove_adapter`,
without waiting: the slot is freed when the adapter's last request in flight ends) before the
Backbone would need to evict. A load that finds every slot still held by such requests waits for
one up to SLOT_WAIT, then answers 503 (retry).

The ingress keeps the adapter registry (one ingress replica). POST /v1/adapters loads the adapter on
one replica to check it (422 if it cannot), then registers a new version: requests already running
keep the old version's weights; replicas let the old version go through Ray's LRU. DELETE stops new
requests at once and returns when the requests it forwarded for that adapter have finished (or, after
`delete_timeout`, with how many still run).
A replica that dies fails its requests in flight with 503 (retry); Ray starts a new one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve

from ..errors import AdapterError, NoFreeSlot
from .api import ChatRequest, CompletionRequest
from .backend import adapter_json, generate
from .errors import ApiError
from .metrics import Metrics
from .startup import EngineSettings, free_port, ready
from .tenancy import Keys, Sources

APP_NAME = "adapterhub"
SLOT_WAIT = 30.0  # seconds a replica's loader waits for a slot held by adapters finishing their requests


@dataclass(frozen=True)
class _Version:
    source: str
    revision: str | None
    model_id: str


def _unwrap(error: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrapper."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class _Loaded:
    """What the multiplexed loader returns: Ray calls __del__ when its LRU unloads the adapter."""

    def __init__(self, engine, name: str):
        self.engine, self.name, self.loaded = engine, name, True

    def __del__(self):  # Ray calls it on unload (in a thread); Python again at collection: once is enough
        if self.loaded:
            self.loaded = False
            with contextlib.suppress(LookupError):  # already removed
                self.engine.remove_adapter(self.name, timeout=0)  # a finalizer never waits


def replica_class(settings: EngineSettings):
    """The replica deployment's class; its multiplexed model limit is the engine's slot count."""

    class EngineReplica:
        def __init__(self, settings: EngineSettings):
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("ADAPTERHUB_REPLICA_THREADS", "1"))))
            self.engine = settings.build().start()
            self.replica = f"{serve.get_replica_context().replica_id.unique_id}:{os.getpid()}"
            self._sources: dict[str, tuple[str, str | None]] = {}

        @serve.multiplexed(max_num_models_per_replica=settings.max_adapters)
        async def _adapter(self, model_id: str) -> _Loaded:
            source, revision = self._sources[model_id]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SLOT_WAIT
            try:
                while True:
                    try:
                        await asyncio.to_thread(self.engine.add_adapter, model_id, source, revision)
                        break
                    except NoFreeSlot as error:  # an unloaded adapter still finishing its requests holds it
                        if loop.time() > deadline:
                            raise ApiError(503, str(error)) from None
                        await asyncio.sleep(0.05)
            except (AdapterError, OSError) as error:
                raise ApiError(
                    422, f"adapter {model_id.rsplit('@', 1)[0]!r} was not loaded: {error}", "source"
                ) from None
            return _Loaded(self.engine, model_id)

        async def load(self, source: str, revision: str | None) -> dict:
            """Loads the request's multiplexed adapter here; its description."""
            model_id = serve.get_multiplexed_model_id()
            self._sources[model_id] = (source, revision)
            await self._adapter(model_id)
            info = self.engine.adapters().get(model_id)
            return {**adapter_json(model_id.rsplit("@", 1)[0], source, info), "replica": self.replica}

        async def generate(
            self, body: CompletionRequest | ChatRequest, source: str | None, revision: str | None
        ) -> AsyncIterator:
            model_id = serve.get_multiplexed_model_id() or None
            for attempt in range(2):  # Ray's LRU may unload it between the load and the submission: once more
                if model_id is not None:
                    self._sources[model_id] = (source, revision)
                    await self._adapter(model_id)
                events = generate(self.engine, model_id, body, self.replica)
                try:
                    start = await anext(events)
                    break
                except ApiError as error:
                    if error.status != 404 or attempt:
                        raise
            yield start
            async for item in events:
                yield item

        def health(self) -> dict:
            return {
                "replica": self.replica,
                "running_rows": self.engine.running_rows(),
                "queue_depth": self.engine.queue_depth(),
            }

    return EngineReplica


class RayBackend:
    """backend.py's interface over the replicas' deployment handle; lives in the ingress."""

    def __init__(self, replicas, base_name: str, adapters: dict[str, str], delete_timeout: float = 60.0):
        self.replicas, self.base_name, self.metrics = replicas, base_name, Metrics()
        self.delete_timeout = delete_timeout
        self._versions = itertools.count(1)
        self._registry = {name: _Version(source, None, f"{name}@0") for name, source in adapters.items()}
        self._in_flight: Counter[str] = Counter()  # adapter name -> requests forwarded and not finished
        self._idle = asyncio.Event()

    async def generate(self, adapter: str | None, body: CompletionRequest | ChatRequest) -> AsyncIterator:
        version = None
        if adapter is not None:
            version = self._registry.get(adapter)
            if version is None:
                raise ApiError(
                    404,
                    f"no adapter named {adapter!r}; available: {[self.base_name, *sorted(self._registry)]}",
                    "model",
                )
        handle = self.replicas.options(stream=True, multiplexed_model_id=version.model_id if version else "")
        self._in_flight[adapter] += 1
        try:
            async for item in handle.generate.remote(body, version and version.source, version and version.revision):
                yield item
        except Exception as error:
            error = _unwrap(error)
            if isinstance(error, ApiError):
                raise error from None
            raise ApiError(
                503,
                f"the replica serving {body.model!r} failed ({type(error).__name__}); Ray is "
                "replacing it: retry the request",
            ) from None
        finally:
            self._in_flight[adapter] -= 1
            self._idle.set()

    async def adapters(self) -> list[dict]:
        return [
            {"id": name, "object": "adapter", "source": v.source, "revision": v.revision}
            for name, v in sorted(self._registry.items())
        ]

    async def add_adapter(self, name: str, source: str, revision: str | None) -> dict:
        version = _Version(source, revision, f"{name}@{next(self._versions)}")
        try:
            info = await self.replicas.options(multiplexed_model_id=version.model_id).load.remote(source, revision)
        except Exception as error:
            error = _unwrap(error)
            if isinstance(error, ApiError):
                raise error from None
            raise ApiError(
                503, f"loading {name!r} failed on a replica ({type(error).__name__}: {error}); retry"
            ) from None
        self._registry[name] = version
        return info

    async def remove_adapter(self, name: str) -> int:
        """Forgets `name`; waits up to `delete_timeout` for the requests forwarded for it, and returns how
        many still run."""
        if self._registry.pop(name, None) is None:
            raise ApiError(404, f"no adapter named {name!r}; available: {sorted(self._registry)}", "name")
        deadline = asyncio.get_running_loop().time() + self.delete_timeout
        while self._in_flight[name] and (left := deadline - asyncio.get_running_loop().time()) > 0:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), left)
        return self._in_flight[name]

    async def health(self) -> dict:
        return {"status": "ok", "adapters": len(self._registry)}

    def shutdown(self) -> None:
        pass  # Ray Serve stops the replicas


@serve.ingress()
class Ingress:
    """The HTTP API (app.py) in front of the replicas."""

    def __init__(self, replicas, base_name: str, adapters: dict[str, str], keys: Keys | None, sources: Sources):
        self.backend = RayBackend(replicas, base_name, adapters)
        self.keys, self.sources = keys, sources

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.backend, keys=self.keys, sources=self.sources)


def application(
    settings: EngineSettings,
    adapters: dict[str, str],
    keys: Keys | None,
    sources: Sources,
    *,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
):
    """The Ray Serve application: `serve.run(application(...))`, or `serve build`-style configs
    pointing at `adapterhub.serve.ray_app:from_config` (docs/scale-out.md)."""
    replica = serve.deployment(
        replica_class(settings),
        name="EngineReplica",
        num_replicas=replicas,
        max_ongoing_requests=4 * settings.max_batch,
        ray_actor_options={
            "num_cpus": replica_cpus,
            "num_gpus": replica_gpus,
            "runtime_env": {"env_vars": {"ADAPTERHUB_REPLICA_THREADS": str(max(1, int(replica_cpus)))}},
        },
    )
    ingress = serve.deployment(
        Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    )
    return ingress.bind(replica.bind(settings), settings.base_name, adapters, keys, sources)


def from_config(args: dict):
    """An application builder for Ray Serve config files (`import_path: adapterhub.serve.ray_app:from_config`):
    `args` holds EngineSettings' fields, `adapters` {name: source}, `adapter_dir`, `allow_hub`,
    `api_key`, `replicas`, `replica_cpus`, `replica_gpus`."""
    from pathlib import Path

    fields = {k: args[k] for k in EngineSettings.__dataclass_fields__ if k in args}
    keys = Keys.from_option(args["api_key"]) if args.get("api_key") else None
    sources = Sources(Path(args["adapter_dir"]) if args.get("adapter_dir") else None, bool(args.get("allow_hub")))
    return application(
        EngineSettings(**fields),
        dict(args.get("adapters") or {}),
        keys,
        sources,
        replicas=int(args.get("replicas", 1)),
        replica_cpus=float(args.get("replica_cpus", 1.0)),
        replica_gpus=float(args.get("replica_gpus", 0.0)),
    )


def serve_cli(
    settings: EngineSettings, adapters: dict[str, str], keys: Keys | None, sources: Sources, args: argparse.Namespace
) -> int:
    """`adapterhub serve --ray`: the application on a local cluster (or `--address`), until SIGTERM."""
    import ray

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(args.replicas * args.replica_cpus)), include_dashboard=False)
    port = args.port or free_port(args.host)
    serve.start(http_options={"host": args.host, "port": port})
    app = application(
        settings,
        adapters,
        keys,
        sources,
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
    )
    handle = serve.run(app, name=APP_NAME, route_prefix="/")
    replicas = serve.get_deployment_handle("EngineReplica", app_name=APP_NAME)
    for name, source in adapters.items():  # checked before serving, as without Ray
        try:
            replicas.options(multiplexed_model_id=f"{name}@0").load.remote(source, None).result()
        except Exception as error:
            print(f"adapterhub serve: --adapter {name}={source}: {_unwrap(error)}", file=sys.stderr)
            serve.shutdown()
            return 2
    del handle
    ready(
        f"http://{args.host}:{port}/v1", settings.base_name, list(adapters), f"; Ray Serve, {args.replicas} replica(s)"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0
