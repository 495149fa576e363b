"""The multi-tenant server as a Ray Serve application (`adapterhub serve --ray`, extra `ray`).

    client --HTTP--> Ray's proxy --> Ingress x M (the same FastAPI app as `adapterhub serve`, app.py)
                                       | RayBackend: name -> version from the registry, multiplexed model id
                                       v                          ^ long poll
                     EngineReplica x N: one backbone, its slot pool and an Engine (engine.py) each
                                                                  ^ long poll
                     registry: a detached named actor, its state in Ray's GCS key-value store (ray_registry.py)

An adapter's version ("name@k") is Ray's multiplexed model id, so Ray sends a request to a replica
that already holds that adapter when one does, and otherwise to one that loads it: the replica's
multiplexed loader is `Engine.add_adapter` (local directories, Hub ids), and Ray's per-replica model
limit is the replica's slot count (`--max-adapters`), so Ray's LRU unloads (`Engine.remove_adapter`,
without waiting: the slot is freed when the adapter's last request in flight ends) before the
Backbone would need to evict. A load that finds every slot still held by such requests waits for
one up to the engine's `load_wait` (--load-wait), then answers 503 (retry).

The registry (name -> version: source, revision, number) lives in a store that outlives the ingress
(ray_registry.py): so the ingress can run as several replicas (`ingress_replicas`), and adapters POSTed at
runtime survive an ingress (and the store actor) restarting. Each ingress and each replica follows the
store with a long poll: a change reaches all of them within one actor call (milliseconds); an ingress
whose copy the store has not confirmed for STALE_AFTER (10 s) refreshes it before routing, and a name it
does not know is looked up in the store before it answers 404, so a name POSTed through another ingress
is found at once.

POST /v1/adapters takes a new version number from the store, loads the adapter on one replica to check
it (422 if it cannot), then registers it: requests already running keep the old version's weights. Every
replica drops a replaced or deleted version as soon as its copy of the registry shows it
(`Engine.remove_adapter(model id, timeout=0)`: the slot frees when the version's requests there end) and
takes it out of Ray's multiplexed cache, and refuses to load a dead version again (`StaleVersion`: the
ingress refreshes its copy and retries with the live version, or answers 404). DELETE stops new requests
at once and returns when the requests that this ingress forwarded for that adapter have finished (or,
after `delete_timeout`, with how many still run); requests forwarded by other ingresses finish on the old
weights, which their replicas free afterwards.
A replica that dies fails its requests in flight with 503 (retry); Ray starts a new one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

from ray import serve

from ..backbone import Composition
from ..errors import AdapterError, NoFreeSlot
from .api import ChatRequest, CompletionRequest
from .backend import adapter_json, generate, source_label
from .errors import ApiError
from .metrics import Metrics
from .ray_registry import Conflict, RemoteStore, StaleVersion, Store, Version, View, is_dead, split
from .startup import EngineSettings, free_port, ready
from .tenancy import Keys, Sources

APP_NAME = "adapterhub"
INGRESS_HEALTH_PERIOD = 2.0  # seconds between Serve's checks of an ingress (the front door: replaced fast)
REFRESH_TIMEOUT = 2.0  # seconds an ingress or a replica waits for the store before going on with its own copy
log = logging.getLogger("adapterhub.serve.ray")


def _unwrap(error: BaseException) -> BaseException:
    """The exception a replica (or the store) raised, out of Ray's wrapper."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _unknown(name: str) -> str:
    return f"no adapter named {name!r}; GET /v1/models lists the models your key may use"


def _unreachable(error: BaseException) -> ApiError:
    return ApiError(503, f"the adapter registry did not answer ({type(error).__name__}); retry")


class _Loaded:
    """What the multiplexed loader returns: Ray calls __del__ when its LRU unloads the adapter."""

    def __init__(self, engine, name: str):
        self.engine, self.name, self.loaded = engine, name, True

    def __del__(self):  # Ray calls it on unload (in a thread); Python again at collection: once is enough
        if self.loaded:
            self.loaded = False
            with contextlib.suppress(LookupError):  # already removed
                self.engine.remove_adapter(self.name, timeout=0)  # a finalizer never waits


# Where @serve.multiplexed keeps a replica's model cache (Ray's internals: if a Ray release moves it, a dropped
# version leaves the engine but stays in Ray's cache until its LRU; the replica's health() shows the cache).
MULTIPLEX_WRAPPER = "__serve_multiplex_wrapper"


def replica_class(settings: EngineSettings):
    """The replica deployment's class; its multiplexed model limit is the engine's slot count."""

    class EngineReplica:
        async def __init__(self, settings: EngineSettings):
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("ADAPTERHUB_REPLICA_THREADS", "1"))))
            self.engine = settings.build().start()
            context = serve.get_replica_context()
            self.replica = f"{context.replica_id.unique_id}:{os.getpid()}"
            self._sources: dict[str, Version] = {}  # model id -> what to load it from
            self.registry = View(RemoteStore(context.app_name), on_change=self._drop_dead)
            self.registry.start()
            self._tasks: set[asyncio.Task] = set()

        # ---- versions the registry no longer serves --------------------------------------
        def _multiplexed(self) -> dict:
            """Ray's multiplexed cache here (model id -> _Loaded); empty before the first load."""
            models = getattr(getattr(self, MULTIPLEX_WRAPPER, None), "models", None)
            return models if isinstance(models, dict) else {}

        def _drop_dead(self) -> None:
            """After each registry update: drops the versions it shows replaced or deleted, from Ray's cache
            here, from the engine on a thread (whose locks a step or a load may hold a moment)."""
            for model_id in [m for m in (*self._multiplexed(), *self._sources) if self.registry.is_dead(m)]:
                self._forget(model_id)
            asyncio.get_running_loop().run_in_executor(None, self._unload_dead)

        def _forget(self, model_id: str) -> None:
            # Out of Ray's cache, so that it neither counts against the model limit nor draws requests (no
            # await comes between a check and a change there, so this cannot interleave with a load).
            loaded = self._multiplexed().pop(model_id, None)
            if loaded is not None:
                loaded.loaded = False  # its __del__ (at collection) does nothing: _unload_dead does the engine's part
                getattr(self, MULTIPLEX_WRAPPER)._push_multiplexed_replica_info = True  # Ray's router learns it
            self._sources.pop(model_id, None)

        def _unload_dead(self) -> None:
            """Out of the engine without waiting: a slot frees when its version's requests here end."""
            try:
                dead = [m for m in self.engine.adapters() if self.registry.is_dead(m)]
                for model_id in dead:
                    with contextlib.suppress(LookupError):  # gone meanwhile
                        self.engine.remove_adapter(model_id, timeout=0)
                if dead:
                    log.info("replica %s dropped replaced or deleted versions %s", self.replica, dead)
            except Exception:
                log.exception("replica %s: dropping dead versions failed", self.replica)

        async def _is_dead(self, model_id: str) -> bool:
            """Asks the store (this replica's copy may be a moment behind the ingress that sent the request)."""
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    current = await self.registry.store.get(split(model_id)[0])
            except Exception:  # the store restarting: this replica's copy decides
                return self.registry.is_dead(model_id)
            return is_dead(current, model_id)

        # ---- loading -----------------------------------------------------------------------
        @serve.multiplexed(max_num_models_per_replica=settings.max_adapters)
        async def _adapter(self, model_id: str) -> _Loaded:
            version = self._sources.get(model_id)
            if version is None or await self._is_dead(model_id):
                self._sources.pop(model_id, None)
                raise StaleVersion(f"{model_id} was replaced or deleted")
            try:  # waits up to the engine's load_wait for a slot held by unloaded adapters' requests
                await asyncio.to_thread(
                    self.engine.add_adapter, model_id, version.source, version.revision, root=version.root
                )
            except NoFreeSlot as error:
                wait = self.engine.limits.load_wait
                raise ApiError(503, f"{error} (waited {wait:g} s for one)", retry_after=5) from None
            except (AdapterError, OSError) as error:
                raise ApiError(422, f"adapter {version.name!r} was not loaded: {error}", "source") from None
            if self.registry.is_dead(model_id):  # replaced or deleted while it loaded
                self._forget(model_id)
                await asyncio.to_thread(self._unload_dead)
                raise StaleVersion(f"{model_id} was replaced or deleted")
            if version.seeded and version.digest is None:  # the first read of an --adapter version
                digest = self.engine.listing()[model_id][1]
                task = asyncio.get_running_loop().create_task(self.registry.store.note_digest(model_id, digest))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return _Loaded(self.engine, model_id)

        async def load(self, version: Version) -> dict:
            """Loads `version` here (the request's multiplexed model id); its description."""
            self._sources[version.model_id] = version
            await self._adapter(version.model_id)
            _, digest, info = self.engine.listing()[version.model_id]
            return {**adapter_json(version.name, version.label, digest, info), "replica": self.replica}

        async def generate(
            self, body: CompletionRequest | ChatRequest, version: Version | None, tenant: str = ""
        ) -> AsyncIterator:
            model_id = version and version.model_id
            for attempt in range(2):  # Ray's LRU may unload it between the load and the submission: once more
                if version is not None:
                    self._sources[model_id] = version
                    await self._adapter(model_id)
                events = generate(self.engine, model_id, body, self.replica, tenant)
                try:
                    start = await anext(events)
                    break
                except ApiError as error:
                    if error.status != 404 or version is None:
                        raise
                    if self.registry.is_dead(model_id):  # dropped as replaced or deleted meanwhile
                        raise StaleVersion(f"{model_id} was replaced or deleted") from None
                    if attempt:
                        raise ApiError(503, f"adapter {version.name!r} was unloaded here meanwhile; retry") from None
            yield start
            async for item in events:
                yield item

        def tokenizer(self) -> tuple:
            """The engine's tokenizer and context length, for the ingress's tokenizer routes (vllm_api)."""
            return self.engine.tokenizer, self.engine.context

        def health(self) -> dict:
            """This replica: its rows, queue, the versions its engine holds and those in Ray's cache."""
            return {
                "replica": self.replica,
                "running_rows": self.engine.running_rows(),
                "queue_depth": self.engine.queue_depth(),
                "adapters": sorted(self.engine.adapters()),
                "multiplexed": sorted(self._multiplexed()),
                "registry_epoch": self.registry.epoch,
            }

    return EngineReplica


_NO_COMPOSITIONS = (
    "the Ray Serve deployment does not combine adapters yet (each replica holds its own versions); "
    "serve compositions with `adapterhub serve` on one machine"
)


class RayBackend:
    """backend.py's interface over the replicas' deployment handle; lives in each ingress.

    `store`: the application's shared registry (a RemoteStore); without one, a registry of this process
    only (`Store`). `start` seeds it with `adapters` (--adapter, the config's; their files kept inside
    `sources.root_of(source)`) and takes a first copy."""

    def __init__(
        self,
        replicas,
        base_name: str,
        adapters: dict[str, str],
        delete_timeout: float = 60.0,
        *,
        store: Store | RemoteStore | None = None,
        ingress: str | None = None,
        sources: Sources | None = None,
    ):
        self.replicas, self.base_name, self.metrics = replicas, base_name, Metrics()
        self.delete_timeout = delete_timeout
        self.ingress = ingress or f"{socket.gethostname()}:{os.getpid()}"
        self.store = store if store is not None else Store()
        self.registry = View(self.store)
        self._seed: dict[str, tuple[str, str | None]] | None = {
            name: (source, sources.root_of(source) if sources is not None else None)
            for name, source in adapters.items()
        }
        self._in_flight: Counter[str] = Counter()  # adapter name -> requests this ingress forwarded, not finished
        self._idle = asyncio.Event()
        self.tokenizer, self.context = None, None  # the replicas', asked of one when a tokenizer route first needs them

    async def fetch_tokenizer(self) -> None:
        """Takes the tokenizer and context length from a replica (every replica serves the same base)."""
        try:
            self.tokenizer, self.context = await self.replicas.tokenizer.remote()
        except Exception as error:
            raise ApiError(503, f"no replica gave the tokenizer ({type(_unwrap(error)).__name__}); retry") from None

    async def start(self) -> None:
        """Seeds the store once, then takes a copy of it and follows it."""
        if self._seed is not None:
            await self.store.seed(self._seed)
            self._seed = None
        await self.registry.ready()

    async def _version(self, name: str, refresh: bool = False) -> Version:
        """The live version of `name`: from this ingress's copy, or the store's when the copy is old, does
        not know the name (it may have been POSTed through another ingress) or `refresh` asks."""
        await self.start()
        version = self.registry.live(name)
        if refresh or version is None or not self.registry.fresh():
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    await self.registry.refresh()
            except Exception as error:
                if version is None or refresh:
                    raise _unreachable(error) from None
                log.warning("adapter registry did not answer (%s); routing %r from this ingress's copy", error, name)
            version = self.registry.live(name)
        if version is None:
            raise ApiError(404, _unknown(name), "model")
        return version

    async def generate(
        self, adapter: str | Composition | None, body: CompletionRequest | ChatRequest, tenant: str = ""
    ) -> AsyncIterator:
        if isinstance(adapter, Composition):
            raise ApiError(501, _NO_COMPOSITIONS, "composition")
        version = None if adapter is None else await self._version(adapter)
        self._in_flight[adapter] += 1
        try:
            for attempt in range(2):
                handle = self.replicas.options(stream=True, multiplexed_model_id=version.model_id if version else "")
                try:
                    async for item in handle.generate.remote(body, version, tenant):
                        yield item
                    return
                except Exception as error:
                    error = _unwrap(error)
                    if isinstance(error, StaleVersion):  # replaced or deleted after this ingress looked
                        stale, version = version, await self._version(adapter, refresh=True)  # 404 if deleted
                        if attempt or version == stale:
                            message = f"adapter {adapter!r} changed while this request was routed; retry"
                            raise ApiError(503, message) from None
                        continue  # the live version, which this ingress had not seen yet
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

    async def compositions(self) -> dict[str, Composition]:
        return {}  # none can be registered: see add_composition

    async def add_composition(self, name: str, composition: Composition) -> None:
        raise ApiError(501, _NO_COMPOSITIONS)

    async def remove_composition(self, name: str) -> None:
        raise ApiError(404, f"no composition named {name!r}", "name")

    async def adapters(self) -> list[dict]:
        await self.start()
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                await self.registry.refresh()
        except Exception as error:
            log.warning("adapter registry did not answer (%s); listing this ingress's copy", error)
        return [
            {"id": v.name, "object": "adapter", "source": v.label, "revision": v.revision, "digest": v.digest}
            for v in sorted(self.registry.entries.values(), key=lambda v: v.name)
            if v.alive
        ]

    async def add_adapter(
        self, name: str, source: str, revision: str | None, label: str | None = None, root: str | None = None
    ) -> dict:
        """Loads `source` (a resolved directory or Hub id) under `name`, shown as `label` (what the POST
        gave; default: the directory's name), its files kept inside `root`."""
        label = label if label is not None else source_label(source)
        await self.start()
        try:
            version = Version(name, source, revision, await self.store.allocate(), label, root)
        except Exception as error:
            raise _unreachable(error) from None
        try:
            info = await self.replicas.options(multiplexed_model_id=version.model_id).load.remote(version)
        except Exception as error:
            error = _unwrap(error)
            if isinstance(error, ApiError):
                raise error from None
            raise ApiError(
                503, f"loading {name!r} failed on a replica ({type(error).__name__}: {error}); retry"
            ) from None
        try:
            self.registry.learn(await self.store.register(replace(version, digest=info["digest"])))
        except Exception as error:
            error = _unwrap(error)
            if isinstance(error, Conflict):
                raise ApiError(409, str(error), "name") from None
            raise _unreachable(error) from None
        return info

    async def remove_adapter(self, name: str) -> int:
        """Forgets `name`; waits up to `delete_timeout` for the requests this ingress forwarded for it, and
        returns how many still run."""
        await self.start()
        try:
            tombstone = await self.store.delete(name)
        except Exception as error:
            raise _unreachable(_unwrap(error)) from None
        if tombstone is None:
            raise ApiError(404, _unknown(name), "name")
        self.registry.learn(tombstone)
        deadline = asyncio.get_running_loop().time() + self.delete_timeout
        while self._in_flight[name] and (left := deadline - asyncio.get_running_loop().time()) > 0:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._idle.wait()
        return self._in_flight[name]

    async def health(self) -> dict:
        return {
            "status": "ok",
            "adapters": sum(v.alive for v in self.registry.entries.values()),
            "ingress": self.ingress,
            "registry_epoch": self.registry.epoch,
        }

    def shutdown(self) -> None:
        self.registry.stop()  # Ray Serve stops the replicas


@serve.ingress()
class Ingress:
    """The HTTP API (app.py) in front of the replicas."""

    async def __init__(self, replicas, base_name: str, adapters: dict[str, str], keys: Keys | None, sources: Sources):
        context = serve.get_replica_context()
        self.backend = RayBackend(
            replicas,
            base_name,
            adapters,
            store=RemoteStore(context.app_name),
            ingress=f"{context.replica_id.unique_id}:{os.getpid()}",
            sources=sources,
        )
        await self.backend.start()  # the registry seeded with --adapter / the config's adapters, and followed
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
    ingress_replicas: int = 1,
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
        Ingress,
        name="Ingress",
        num_replicas=ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
        health_check_period_s=INGRESS_HEALTH_PERIOD,
    )
    return ingress.bind(replica.bind(settings), settings.base_name, adapters, keys, sources)


def from_config(args: dict):
    """An application builder for Ray Serve config files (`import_path: adapterhub.serve.ray_app:from_config`):
    `args` holds EngineSettings' fields, `adapters` {name: source}, `adapter_dir`, `allow_hub`,
    `api_key`, `replicas`, `replica_cpus`, `replica_gpus`, `ingress_replicas`."""
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
        ingress_replicas=int(args.get("ingress_replicas", 1)),
    )


def serve_cli(
    settings: EngineSettings, adapters: dict[str, str], keys: Keys | None, sources: Sources, args: argparse.Namespace
) -> int:
    """`adapterhub serve --ray`: the application on a local cluster (or `--address`), until SIGTERM."""
    import ray

    from .ray_registry import connect

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(args.replicas * args.replica_cpus)), include_dashboard=False)
    port = args.port or free_port(args.host)
    ingress_replicas = getattr(args, "ingress_replicas", 1)
    serve.start(http_options={"host": args.host, "port": port})
    app = application(
        settings,
        adapters,
        keys,
        sources,
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        ingress_replicas=ingress_replicas,
    )
    handle = serve.run(app, name=APP_NAME, route_prefix="/")
    replicas = serve.get_deployment_handle("EngineReplica", app_name=APP_NAME)
    _, _, _, entries = ray.get(connect(APP_NAME).watch.remote(None, 0, 0))  # as the ingresses seeded it
    current = {entry.name: entry for entry in entries}
    for name, source in adapters.items():  # checked before serving, as without Ray
        version = current.get(name)
        if version is None or not version.alive:
            continue  # deleted at runtime before (the store of a cluster that outlived an earlier server)
        try:
            replicas.options(multiplexed_model_id=version.model_id).load.remote(version).result()
        except Exception as error:
            print(f"adapterhub serve: --adapter {name}={source}: {_unwrap(error)}", file=sys.stderr)
            serve.shutdown()
            return 2
    del handle
    ready(
        f"http://{args.host}:{port}/v1",
        settings.base_name,
        list(adapters),
        f"; Ray Serve, {args.replicas} replica(s), {ingress_replicas} ingress replica(s), "
        f"cluster {ray.get_runtime_context().gcs_address}",
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
