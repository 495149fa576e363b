"""Which adapter lives in which preallocated slot, and which slot to give up next.

The slot tensors themselves live in ModuleSlots children of the adapted modules (a type's, and
HeadSlots for modules_to_save heads); this table only assigns slot numbers. A slot is busy while a
batch that routes to it is in flight (`acquire`/`release`), pinned while its adapter is pinned, and
otherwise evictable in least-recently-used order. All methods are called under the Backbone's lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class SlotTable:
    capacity: int
    slot_of: dict[str, int] = field(default_factory=dict)  # resident name -> slot
    pinned: set[str] = field(default_factory=set)
    in_flight: dict[int, int] = field(default_factory=dict)  # slot -> batches using it
    retired: set[int] = field(default_factory=set)  # slots replaced by a swap, freed when no batch uses them
    _recency: OrderedDict[str, None] = field(default_factory=OrderedDict)  # least recent first

    def free_slots(self) -> list[int]:
        used = set(self.slot_of.values()) | self.retired
        return [s for s in range(self.capacity) if s not in used]

    def touch(self, name: str) -> None:
        self._recency[name] = None
        self._recency.move_to_end(name)

    def eviction_candidate(self, exclude: str | None = None) -> str | None:
        """The least recently used adapter that is neither pinned, in flight nor `exclude`."""
        for name in self._recency:
            if name != exclude and name not in self.pinned and not self.in_flight.get(self.slot_of[name]):
                return name
        return None

    def assign(self, name: str, slot: int) -> None:
        self.slot_of[name] = slot
        self.touch(name)

    def remove(self, name: str) -> int:
        """Forgets `name`; its slot is freed now, or retired until its batches finish."""
        slot = self.slot_of.pop(name)
        self._recency.pop(name, None)
        self.pinned.discard(name)
        if self.in_flight.get(slot):
            self.retired.add(slot)
        return slot

    def acquire(self, slots: list[int]) -> None:
        for s in slots:
            self.in_flight[s] = self.in_flight.get(s, 0) + 1

    def release(self, slots: list[int]) -> None:
        for s in slots:
            self.in_flight[s] -= 1
            if not self.in_flight[s]:
                del self.in_flight[s]
                self.retired.discard(s)
