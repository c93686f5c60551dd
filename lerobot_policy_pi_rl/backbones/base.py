"""The backbone seam shared by every velocity field PI-RL drives."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Prefix:
    """What a backbone computes once per decision and reuses for all K denoise steps.

    ``features`` is the pooled observation (VLM prefix) representation the prefix critic reads;
    ``cache`` is backbone-specific (the MLP keeps ``features``; pi0 keeps its KV cache and masks).
    """

    features: Tensor  # [B, prefix_dim]
    cache: Any = None

    def detach(self) -> Prefix:
        return Prefix(self.features.detach(), self.cache)

    def select(self, rows: Tensor) -> Prefix:
        """The prefixes of batch rows ``rows``."""
        cache = self.cache.select(rows) if hasattr(self.cache, "select") else self.cache
        return Prefix(self.features.index_select(0, rows), cache)

    def tensors(self) -> list[Tensor]:
        """``[features, *cache tensors]``: the prefix as plain tensors (a graph's outputs)."""
        return [self.features, *(self.cache.tensors() if self.cache is not None else [])]

    def rebuild(self, tensors: list[Tensor]) -> Prefix:
        """A prefix like this one made of ``tensors`` (laid out as ``tensors()`` gives them)."""
        cache = None if self.cache is None else self.cache.rebuild(tensors[1:])
        return Prefix(tensors[0], cache)

    @staticmethod
    def cat(prefixes: list[Prefix]) -> Prefix:
        """Prefixes of consecutive batches as one (a cache must offer ``cat`` or be None)."""
        caches = [p.cache for p in prefixes]
        cache = None if caches[0] is None else type(caches[0]).cat(caches)
        return Prefix(torch.cat([p.features for p in prefixes]), cache)


class FlowBackbone(nn.Module, abc.ABC):
    """A flow-matching velocity field v(x_t, t | observation).

    Attributes a subclass sets: ``prefix_dim`` (width of ``Prefix.features``) and ``expert_dim``
    (per-action-token width of the expert features returned by ``denoise_step``).
    """

    prefix_dim: int
    expert_dim: int

    @abc.abstractmethod
    def embed_prefix(self, batch: dict[str, Tensor]) -> Prefix:
        """Encode the (preprocessed, normalised) observation once per decision."""

    @abc.abstractmethod
    def denoise_step(self, prefix: Prefix, x_t: Tensor, t: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Velocity ``[N, H, D]`` and expert features ``[N, H, expert_dim]`` at (x_t, t).

        ``rows[n]`` is the batch row of the prefix that input ``n`` belongs to.
        """

    @abc.abstractmethod
    def prefix_parameters(self) -> list[nn.Parameter]:
        """Parameters of the observation encoder (the VLM side, frozen during RL by default)."""

    @abc.abstractmethod
    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters of the velocity network (the action expert)."""
