"""What both sides of weight sync agree on: the ticket, the error, the version rule, and the
sender (trainer rank 0) and receiver (the engine's vLLM workers) every transport implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

from switchkd.rollout.errors import SwitchkdError

TRANSPORTS = ("shm", "collective")


class WeightSyncError(SwitchkdError, RuntimeError):
    """A weight version was refused or could not be transferred; the engine keeps its weights."""


@dataclass(frozen=True)
class SyncTicket:
    """What the engine needs to receive ``version`` (plain values: crosses Ray as a dict)."""
    version: int
    transport: str
    path: str | None = None       # shm: the version directory

    def to_dict(self) -> dict:
        return asdict(self)


def check_newer(version: int, current: int) -> None:
    """WeightSyncError unless ``version`` is newer than the ``current`` one the engine serves."""
    if version <= current:
        raise WeightSyncError(f"weight version {version} refused: the engine already serves version {current}")


class WeightSender(ABC):
    """Trainer rank 0's side of a transport."""

    @abstractmethod
    def send(self, state: dict[str, torch.Tensor], version: int) -> SyncTicket:
        """Send ``state`` as weight version ``version``; returns the ticket the engine receives it with."""


class WeightReceiver(ABC):
    """An engine worker's side of a transport."""

    @abstractmethod
    def receive(self, ticket: SyncTicket, current_version: int) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """The version and (name, tensor) pairs ``ticket`` announces; WeightSyncError (the engine keeps
        its weights) unless that version is newer than ``current_version``."""
