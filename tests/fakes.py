"""Fake NVML for tests: the part of pynvml that wan_opt.hardware calls, over a list of made-up cards."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

MIB = 2**20


@dataclass
class FakeCard:
    name: str | bytes
    mib: int
    capability: tuple[int, int]
    uuid: str
    migs: list[tuple[str, int] | None] | None = None  # None: not MIG-capable; a None slot is empty
    used_mib: int = 0  # held by other processes


class FakeNVML:
    """The part of pynvml that wan_opt.hardware calls; handles are ("gpu", i) or ("mig", i, slot)."""

    class NVMLError(Exception):
        pass

    def __init__(self, cards, init_error=False):
        self.cards, self.init_error, self.open = cards, init_error, False

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError("Driver Not Loaded")
        self.open = True

    def nvmlShutdown(self):
        self.open = False

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetName(self, handle):
        return self.cards[handle[1]].name

    def nvmlDeviceGetMemoryInfo(self, handle):
        card = self.cards[handle[1]]
        mib = card.mib if handle[0] == "gpu" else card.migs[handle[2]][1]
        used = card.used_mib if handle[0] == "gpu" else 0
        return SimpleNamespace(total=mib * MIB, free=(mib - used) * MIB, used=used * MIB)

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return self.cards[handle[1]].capability

    def nvmlDeviceGetUUID(self, handle):
        card = self.cards[handle[1]]
        return card.uuid if handle[0] == "gpu" else card.migs[handle[2]][0]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        if self.cards[handle[1]].migs is None:
            raise self.NVMLError("Not Supported")
        return len(self.cards[handle[1]].migs)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, slot):
        if self.cards[handle[1]].migs[slot] is None:
            raise self.NVMLError("Not Found")
        return ("mig", handle[1], slot)


def from_environment() -> FakeNVML:
    """A FakeNVML from WAN_OPT_FAKE_NVML, a JSON list of [name, MiB, [major, minor], uuid] (for subprocesses)."""
    cards = [FakeCard(name, mib, tuple(cap), uuid) for name, mib, cap, uuid in json.loads(os.environ["WAN_OPT_FAKE_NVML"])]
    return FakeNVML(cards)
