"""The rules of the adapter registry of `adapterhub serve --ray` (adapterhub/serve/ray_registry.py), on the
in-process `Store`: the same code the registry's Ray actor runs. tests/test_serve_ray.py runs the actor on
a real cluster: shared by two ingresses, followed by the replicas, restarted from Ray's GCS."""

from __future__ import annotations

import asyncio
import time

import pytest

from adapterhub.serve.ray_registry import Conflict, Store, Version, View, is_dead

CONFIG = {
    "a": ("/srv/adapters/a", "/srv/adapters"),
    "b": ("/srv/adapters/b", "/srv/adapters"),
    "c": ("org/c-lora", "org/c-lora"),
}


def test_seeding_registers_new_names_at_version_0_and_never_rolls_back_a_runtime_change():
    async def main():
        store = Store()
        await store.seed(CONFIG)
        a, b, c = [await store.get(name) for name in "abc"]
        assert [a.model_id, b.model_id, c.model_id] == ["a@0", "b@0", "c@0"]
        assert [a.label, c.label] == ["a", "org/c-lora"]  # a server directory by its name, a Hub id as is
        assert a.root == "/srv/adapters" and a.seeded and a.digest is None
        await store.note_digest("a@0", "sha-a")  # a replica read its files
        assert (await store.get("a")).digest == "sha-a"
        a = await store.get("a")
        posted = await store.register(Version("a", "/srv/adapters/x", None, await store.allocate(), "x"))
        await store.delete("b")
        await store.seed(CONFIG)  # an ingress (re)starting with the same --adapter list
        assert await store.get("a") == posted and not (await store.get("b")).alive and await store.get("c") == c
        await store.seed(
            {**CONFIG, "a": ("/srv/adapters/a2", "/srv/adapters"), "c": ("org/c-lora-v2", "org/c-lora-v2")}
        )  # a changed config
        assert await store.get("a") == posted  # replaced at runtime since: the POST stays
        changed = await store.get("c")  # untouched since it was seeded: the config's new source, a new version
        assert changed.source == "org/c-lora-v2" and changed.number > posted.number and is_dead(changed, "c@0")

    asyncio.run(main())


def test_versions_only_move_forward():
    async def main():
        store = Store()
        first, second = await store.allocate(), await store.allocate()
        live = await store.register(Version("a", "/s/2", None, second, "2"))
        with pytest.raises(Conflict):  # a POST that started earlier and finished later loses
            await store.register(Version("a", "/s/1", None, first, "1"))
        assert await store.get("a") == live
        assert is_dead(live, f"a@{first}") and not is_dead(live, f"a@{second}")
        assert not is_dead(live, f"a@{second + 1}")  # a POST still loading
        tombstone = await store.delete("a")
        assert is_dead(tombstone, f"a@{second}") and await store.delete("a") is None
        again = await store.register(Version("a", "/s/3", None, await store.allocate(), "3"))
        assert again.alive and again.number > second and is_dead(again, f"a@{second}")

    asyncio.run(main())


def test_a_view_follows_the_store_as_changes_happen():
    """A view's long poll answers at the change (well under its POLL of seconds), with only what changed."""

    async def main():
        store = Store()
        updates = []
        view = View(store, on_change=lambda: updates.append(view.epoch))
        await store.seed({"a": ("/s/a", "/s")})
        await view.ready()
        assert view.live("a").model_id == "a@0" and updates

        async def until(condition):
            started = time.monotonic()
            while not condition():
                assert time.monotonic() - started < 1, "the view did not follow the store within a second"
                await asyncio.sleep(0.001)

        await asyncio.sleep(0.05)  # the follower is waiting in its long poll
        await store.register(Version("b", "/s/b", None, await store.allocate(), "b"))
        await until(lambda: view.live("b") is not None)
        await store.delete("a")
        await until(lambda: view.live("a") is None)
        assert view.is_dead("a@0") and not view.is_dead("b@1") and view.epoch == 3
        _, epoch, whole, entries = await store.watch(view.incarnation, 2, 0)
        assert (epoch, whole, [e.name for e in entries]) == (3, False, ["a"])
        _, _, whole, entries = await store.watch("another history", 0, 0)
        assert whole and {e.name for e in entries} == {"a", "b"}
        view.stop()

    asyncio.run(main())


def test_a_view_never_goes_back():
    view = View(Store())
    old, new = Version("a", "/s/1", None, 1, epoch=3), Version("a", "/s/2", None, 2, epoch=5)
    view._apply("history", 5, True, [new])
    view._apply("history", 4, False, [old])  # an answer overtaken by a newer one
    view._apply("history", 3, True, [old])
    view.learn(old)
    assert view.live("a") == new and view.epoch == 5 and view.is_dead("a@1")
    view._apply("another history", 1, True, [old])  # a store restarted without its data: all of it
    assert view.live("a") == old and view.epoch == 1
