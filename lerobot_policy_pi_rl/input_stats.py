"""State inputs whose normalisation statistics come from too few demonstrations.

A policy normalises its state inputs with the demonstrations' statistics, e.g. (x - mean) / std. With a few
demos, a dimension can barely vary: an object's orientation that no demo disturbed has a std of 1e-3 or
less. Once RL moves that object, the normalised input sits hundreds of standard deviations out, the network
extrapolates wildly, and PPO's first updates show it as a large approx KL. Two defences, both here:

* the pre-processor clamps normalised state inputs to +-``state_clip`` (``ClampStateProcessorStep`` in
  ``processor_pi_rl``);
* a near-constant dimension is reported with a warning when SFT starts and whenever a policy is loaded, so
  the user can record more varied demos or leave the dimension out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from lerobot.configs.types import FeatureType, NormalizationMode

log = logging.getLogger(__name__)

# a dimension is near-constant when its spread is below this fraction of max(1, |centre|)
NEAR_CONSTANT_REL = 1e-2
# the input feature types whose normalised values are clamped and checked
STATE_TYPES = (FeatureType.STATE, FeatureType.ENV)


@dataclass(frozen=True)
class NearConstantDim:
    key: str
    index: int
    centre: float
    spread: float  # std for MEAN_STD, half the range for MIN_MAX, half the 1-99 % quantile range for QUANTILES


def state_keys(config) -> list[str]:
    """The policy's input features that are clamped and checked: state and environment state."""
    return sorted(k for k, ft in (config.input_features or {}).items() if ft.type in STATE_TYPES)


def _centre_and_spread(stats: dict, mode: NormalizationMode) -> tuple[np.ndarray, np.ndarray] | None:
    def get(name):
        return None if name not in stats else np.asarray(stats[name], dtype=np.float64).reshape(-1)

    if mode == NormalizationMode.MEAN_STD and get("mean") is not None and get("std") is not None:
        return get("mean"), get("std")
    if mode == NormalizationMode.MIN_MAX and get("min") is not None and get("max") is not None:
        return (get("max") + get("min")) / 2, (get("max") - get("min")) / 2
    if mode == NormalizationMode.QUANTILES and get("q01") is not None and get("q99") is not None:
        return (get("q99") + get("q01")) / 2, (get("q99") - get("q01")) / 2
    return None


def near_constant_dims(config, stats: dict[str, dict]) -> list[NearConstantDim]:
    """Every state dimension whose spread in ``stats`` is below NEAR_CONSTANT_REL * max(1, |centre|)."""
    found = []
    for key in state_keys(config):
        ft = config.input_features[key]
        mode = config.normalization_mapping.get(ft.type.value, NormalizationMode.IDENTITY)
        got = _centre_and_spread(stats.get(key, {}), NormalizationMode(mode))
        if got is None:
            continue
        centre, spread = got
        for i in np.flatnonzero(spread < NEAR_CONSTANT_REL * np.maximum(1.0, np.abs(centre))):
            found.append(NearConstantDim(key, int(i), float(centre[i]), float(spread[i])))
    return found


def warn_near_constant(config, stats: dict[str, dict], where: str) -> list[NearConstantDim]:
    """Log one warning naming the near-constant state dimensions (none: no warning); returns them."""
    dims = near_constant_dims(config, stats)
    if dims:
        listed = ", ".join(f"{d.key}[{d.index}] (centre {d.centre:.4g}, spread {d.spread:.2g})" for d in dims[:8])
        more = f" and {len(dims) - 8} more" if len(dims) > 8 else ""
        clip = getattr(config, "state_clip", None)
        guard = (
            f"normalised inputs are clamped to +-{clip:g} (policy.state_clip)"
            if clip
            else "policy.state_clip is off, so nothing bounds them"
        )
        log.warning(
            "%s: %d state dimension(s) barely vary in the normalisation statistics: %s%s. If RL moves them, their "
            "normalised values reach hundreds of standard deviations; %s. Record demos that vary them, or leave "
            "them out of the observation.",
            where,
            len(dims),
            listed,
            more,
            guard,
        )
    return dims


def normalizer_stats(preprocessor) -> dict[str, dict]:
    """The statistics of a pre-processor's normalisation step, as plain arrays ({} when it has none)."""
    from lerobot.processor import NormalizerProcessorStep

    for step in getattr(preprocessor, "steps", []):
        if isinstance(step, NormalizerProcessorStep) and step.stats:
            return {
                k: {n: np.asarray(v.cpu() if hasattr(v, "cpu") else v) for n, v in s.items()}
                for k, s in step.stats.items()
            }
    return {}
