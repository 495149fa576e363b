"""The adapter registry of `adapterhub serve --ray`, shared by every ingress and engine replica.

The store is one detached named Ray actor per application (`Store`, named "<app>-registry" in the Ray
namespace "adapterhub"): adapter name -> `Version` (source, revision, version number, alive), a version
counter that only grows, and an epoch that counts changes. Every change is written to Ray's GCS
key-value store (`ray.experimental.internal_kv`, namespace "adapterhub", keys "<app>-registry/...")
before it is acknowledged, and a new incarnation of the actor reads it back: when Ray restarts the
actor (max_restarts=-1) or when someone creates it again after it was killed for good (`connect` uses
get_if_exists). The GCS is the one place every node reaches and that outlives actors and nodes (and,
with GCS fault tolerance on KubeRay, the head node); a file would live on one node only. The actor in
front of it serializes the changes (the counter, replace-only-if-newer, seeding) and tells watchers.

Versions: a POST takes a number from the counter (`allocate`) before it loads, and `register`s it after;
a registration replaces the live version only if its number is higher (a slower, older concurrent POST of
the same name loses: HTTP 409). DELETE leaves a tombstone (the last number, alive=False), so a version
number never comes back. The multiplexed model id `name@k` of a version below a name's current number,
or equal to a deleted one, is dead (`is_dead`): replicas drop it and refuse to load it again.

Seeding (`--adapter` / the config's `adapters`): a name the store has never had is registered as version 0
(`name@0`); a name whose live version came from a seed with another source (the config changed) gets a new
version; a name replaced by a POST or deleted since it was seeded is left alone, so a restarted ingress
never rolls back a runtime change.

Readers (`View`): each ingress and each engine replica keeps a copy, followed by a long poll (`watch`,
POLL seconds at most, answered as soon as the epoch moves, with only the entries changed since). A change
reaches every follower within one actor call (milliseconds); a view not confirmed for STALE_AFTER seconds
is refreshed before an ingress routes a request with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

log = logging.getLogger("adapterhub.serve.ray")

NAMESPACE = "adapterhub"  # the store actor's Ray namespace and its GCS key-value namespace
POLL = 5.0  # seconds a watch waits for a change before answering "nothing new"
STALE_AFTER = 2 * POLL  # an ingress refreshes a view not confirmed by the store for this long before using it
CALL_TIMEOUT = 10.0  # seconds for one call to the store (a watch: POLL more)


@dataclass(frozen=True)
class Version:
    """One adapter name's current version in the registry."""

    name: str
    source: str  # what replicas load: a directory on the server, or a Hub id
    revision: str | None
    number: int  # its multiplexed model id is f"{name}@{number}"
    label: str = ""  # how listings show the source: as the POST gave it; a --adapter directory by its name
    root: str | None = None  # the directory its files must stay inside at every load (Backbone.load's root=)
    digest: str | None = None  # its content's sha256, once a replica has loaded it
    alive: bool = True  # False: deleted (a tombstone, so that no older or equal number comes back)
    seeded: bool = False  # registered from --adapter / the config, not by POST
    epoch: int = 0  # the store's epoch when this was written

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.number}"


def split(model_id: str) -> tuple[str, int]:
    name, _, number = model_id.rpartition("@")
    return name, int(number)


def is_dead(current: Version | None, model_id: str) -> bool:
    """Whether `model_id` is a replaced or deleted version, given its name's `current` registration (a
    number above it is a POST still loading, not dead)."""
    if current is None:
        return False
    number = split(model_id)[1]
    return number < current.number or (number == current.number and not current.alive)


def registry_name(app_name: str) -> str:
    return f"{app_name}-registry"


class Conflict(Exception):
    """A registration older than the name's current version (a newer POST of the same name won)."""


class StaleVersion(Exception):
    """A replica was asked for a replaced or deleted version: the ingress refreshes its view and retries."""

    def __reduce__(self):  # crosses process boundaries (Ray) whole
        return StaleVersion, self.args


class Store:
    """The registry's state and its changes; the store actor (`connect`), or an ingress's own registry
    outside a Ray cluster (`RayBackend` built without a store). With `kv_prefix`, every change is in
    Ray's GCS key-value store before it is acknowledged, and the state is read back from there."""

    def __init__(self, kv_prefix: str | None = None):
        self._prefix = kv_prefix
        self._entries: dict[str, Version] = {}
        self._order: OrderedDict[str, None] = OrderedDict()  # names, least recently changed first
        self._counter = 0
        self._epoch = 0
        self._incarnation = uuid.uuid4().hex  # a new history: followers of another one reload everything
        self._changed = asyncio.Condition()
        if kv_prefix is not None:
            self._recover()

    # ---- persistence ---------------------------------------------------------------------
    def _recover(self) -> None:
        from ray.experimental import internal_kv as kv

        meta = kv._internal_kv_get(self._prefix + "meta", namespace=NAMESPACE)
        if meta is not None:
            saved = json.loads(meta)
            self._incarnation, self._counter, self._epoch = saved["incarnation"], saved["counter"], saved["epoch"]
        entries = []
        for key in kv._internal_kv_list(self._prefix + "adapter/", namespace=NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is not None:
                entries.append(Version(**json.loads(raw)))
        for entry in sorted(entries, key=lambda e: e.epoch):
            self._entries[entry.name] = entry
            self._order[entry.name] = None
        # an entry is written before the counters: a crash between the two leaves them behind it
        self._epoch = max([self._epoch, *(e.epoch for e in entries)])
        self._counter = max([self._counter, *(e.number for e in entries)])
        self._save_meta()
        log.info("adapter registry %s: %d names, epoch %d", self._prefix, len(entries), self._epoch)

    def _save_meta(self) -> None:
        if self._prefix is not None:
            from ray.experimental import internal_kv as kv

            meta = {"incarnation": self._incarnation, "counter": self._counter, "epoch": self._epoch}
            kv._internal_kv_put(self._prefix + "meta", json.dumps(meta), namespace=NAMESPACE)

    async def _write(self, entry: Version) -> Version:
        entry = replace(entry, epoch=self._epoch + 1)
        if self._prefix is not None:
            from ray.experimental import internal_kv as kv

            kv._internal_kv_put(self._prefix + "adapter/" + entry.name, json.dumps(asdict(entry)), namespace=NAMESPACE)
        self._epoch = entry.epoch
        self._counter = max(self._counter, entry.number)
        self._save_meta()
        self._entries[entry.name] = entry
        self._order[entry.name] = None
        self._order.move_to_end(entry.name)
        async with self._changed:
            self._changed.notify_all()
        return entry

    # ---- the interface (the actor's methods) ---------------------------------------------
    async def watch(self, incarnation: str | None, since: int, timeout: float) -> tuple[str, int, bool, list[Version]]:
        """(incarnation, epoch, whole, entries): the entries changed after epoch `since` of `incarnation`,
        or every entry (whole) for a follower of another history; waits up to `timeout` for a change."""
        if incarnation == self._incarnation and since == self._epoch and timeout > 0:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._changed.wait_for(lambda: self._epoch != since)
        if incarnation != self._incarnation:
            return self._incarnation, self._epoch, True, list(self._entries.values())
        changed = []
        for name in reversed(self._order):
            if self._entries[name].epoch <= since:
                break
            changed.append(self._entries[name])
        return self._incarnation, self._epoch, False, changed

    async def get(self, name: str) -> Version | None:
        return self._entries.get(name)

    async def allocate(self) -> int:
        """A version number never given before."""
        self._counter += 1
        self._save_meta()
        return self._counter

    async def register(self, version: Version) -> Version:
        """Makes `version` its name's live version; Conflict if the name is already at its number or above."""
        current = self._entries.get(version.name)
        if current is not None and version.number <= current.number:
            raise Conflict(
                f"adapter {version.name!r} was replaced by a newer POST while this one loaded; that one is served"
            )
        return await self._write(replace(version, alive=True, seeded=False))

    async def note_digest(self, model_id: str, digest: str) -> None:
        """A replica loaded `model_id` (a seeded version, whose content nobody had read yet): its digest."""
        name, number = split(model_id)
        current = self._entries.get(name)
        if current is not None and current.number == number and current.digest is None:
            await self._write(replace(current, digest=digest))

    async def delete(self, name: str) -> Version | None:
        """The tombstone left for `name`, or None if it is not live."""
        current = self._entries.get(name)
        if current is None or not current.alive:
            return None
        return await self._write(replace(current, alive=False))

    async def seed(self, adapters: dict[str, tuple[str, str | None]]) -> None:
        """Registers the --adapter / config adapters, name -> (source, root) (see the module docstring)."""
        from .backend import source_label

        for name, (source, root) in adapters.items():
            current = self._entries.get(name)
            if current is None:
                number = 0
            elif current.seeded and current.alive and current.source != source:
                number = await self.allocate()
            else:
                continue
            await self._write(Version(name, source, None, number, source_label(source), root, seeded=True))


def connect(app_name: str):
    """The application's store actor, created (or recreated, from the GCS) if it is not running."""
    import ray

    actor = ray.remote(Store).options(
        name=registry_name(app_name),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        max_concurrency=10_000,  # one long poll per ingress and replica
    )
    for attempt in range(3):
        try:
            return actor.remote(registry_name(app_name) + "/")
        except ValueError:  # created by another process between the lookup and the creation: get that one
            with contextlib.suppress(ValueError):
                return ray.get_actor(registry_name(app_name), namespace=NAMESPACE)
            if attempt == 2:
                raise


class RemoteStore:
    """Store's interface over the actor: reconnects (and so recreates the actor) after it died for good."""

    def __init__(self, app_name: str):
        self.app_name, self._actor = app_name, None

    async def _call(self, method: str, *args, timeout: float = CALL_TIMEOUT):
        from ray.exceptions import RayActorError

        if self._actor is None:
            self._actor = await asyncio.to_thread(connect, self.app_name)
        try:
            async with asyncio.timeout(timeout):
                return await getattr(self._actor, method).remote(*args)
        except RayActorError:
            self._actor = None  # restarting: the same handle would do; dead for good: a new actor
            raise

    async def watch(self, incarnation: str | None, since: int, timeout: float):
        return await self._call("watch", incarnation, since, timeout, timeout=timeout + CALL_TIMEOUT)

    async def get(self, name: str) -> Version | None:
        return await self._call("get", name)

    async def allocate(self) -> int:
        return await self._call("allocate")

    async def register(self, version: Version) -> Version:
        return await self._call("register", version)

    async def note_digest(self, model_id: str, digest: str) -> None:
        return await self._call("note_digest", model_id, digest)

    async def delete(self, name: str) -> Version | None:
        return await self._call("delete", name)

    async def seed(self, adapters: dict[str, tuple[str, str | None]]) -> None:
        return await self._call("seed", adapters)


class View:
    """A reader's copy of the registry, followed by a long poll on the store. `on_change` is called
    (in the event loop) after every update."""

    def __init__(self, store: Store | RemoteStore, on_change: Callable[[], None] | None = None):
        self.store, self.on_change = store, on_change
        self.entries: dict[str, Version] = {}
        self.incarnation: str | None = None
        self.epoch = 0
        self.synced = -math.inf  # time.monotonic() when the store last confirmed this copy
        self._task: asyncio.Task | None = None
        self._stopped = False

    async def ready(self) -> None:
        """A first copy (from the store now, if there is none yet) and the follower task running."""
        if self.incarnation is None:
            await self.refresh()
        self.start()

    def start(self) -> None:
        if not self._stopped and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._follow())

    def stop(self) -> None:
        """Stops following for good (the copy then changes only by `refresh` and `learn`)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    async def refresh(self) -> None:
        """Brings the copy up to date with the store now."""
        async with asyncio.timeout(CALL_TIMEOUT):
            changes = await self.store.watch(self.incarnation, self.epoch, 0)
        self._apply(*changes)

    async def _follow(self) -> None:
        pause = 0.1
        while True:
            try:
                self._apply(*await self.store.watch(self.incarnation, self.epoch, POLL))
                pause = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the store restarting or unreachable: keep the copy, try again
                log.warning("adapter registry: %s: %s; retrying in %.1f s", type(error).__name__, error, pause)
                await asyncio.sleep(pause)
                pause = min(2 * pause, POLL)

    def _apply(self, incarnation: str, epoch: int, whole: bool, entries: list[Version]) -> None:
        if incarnation == self.incarnation and epoch < self.epoch:
            return  # an answer overtaken by a newer one
        if whole:  # the first copy, or another history (a store restarted without its GCS data): all of it
            self.entries = {}
        for entry in entries:
            self.learn(entry, notify=False)
        self.incarnation, self.epoch, self.synced = incarnation, epoch, time.monotonic()
        if self.on_change is not None:
            self.on_change()

    def learn(self, entry: Version, notify: bool = True) -> None:
        """Takes a newer entry: what this process's own write returned (read-your-writes)."""
        current = self.entries.get(entry.name)
        if current is None or entry.epoch >= current.epoch:
            self.entries[entry.name] = entry
        if notify and self.on_change is not None:
            self.on_change()

    def fresh(self) -> bool:
        return time.monotonic() - self.synced < STALE_AFTER

    def live(self, name: str) -> Version | None:
        entry = self.entries.get(name)
        return entry if entry is not None and entry.alive else None

    def is_dead(self, model_id: str) -> bool:
        return is_dead(self.entries.get(split(model_id)[0]), model_id)
