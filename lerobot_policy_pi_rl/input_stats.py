"""State inputs whose normalisation statistics come from too few demonstrations.

A policy normalises its state inputs with the demonstrations' statistics, e.g. (x - mean) / std. With a few
demos, a dimension can barely vary: an object's orientation that no demo disturbed has a std of 1e-3 or
less. Once RL moves that object, the normalised input sits hundreds of standard deviations out, the network
extrapolates wildly, and PPO's first updates show it as a large approx KL. Two defences, both here:

* the pre-processor clamps normalised state inputs to +-``state_clip`` (``ClampStateProcessorStep`` in
  ``processor_pi_rl``);
* a near-constant dimension is reported with a warning when SFT starts and whenever a policy is loaded, so
  the user can record more varied demos or leave the dimension out.

The clamp bounds the damage but does not restore the information: with one demo, an object's start position
has a spread of 0, so at every other start it is clamped to +-``state_clip`` and the policy cannot tell where
the object is. Where demos are recorded in an env, the spread is also measured over the env's start states
(``start_state_stats``) and the statistics are widened to cover it (``widen_stats``): a dimension is never
normalised more narrowly than it varies across the situations the policy will start in.
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


def centre_and_spread(stats: dict, mode: NormalizationMode) -> tuple[np.ndarray, np.ndarray] | None:
    def get(name):
        return None if name not in stats else np.asarray(stats[name], dtype=np.float64).reshape(-1)

    if mode == NormalizationMode.MEAN_STD and get("mean") is not None and get("std") is not None:
        return get("mean"), get("std")
    if mode == NormalizationMode.MIN_MAX and get("min") is not None and get("max") is not None:
        return (get("max") + get("min")) / 2, (get("max") - get("min")) / 2
    if mode == NormalizationMode.QUANTILES and get("q01") is not None and get("q99") is not None:
        return (get("q99") + get("q01")) / 2, (get("q99") - get("q01")) / 2
    return None


def input_centre_and_spread(config, stats: dict[str, dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The centre and spread the policy's normalisation gives its input ``key`` (its feature type's mode in
    ``config.normalization_mapping``) from ``stats``; None when the mode or the statistics leave it as it is."""
    mode = config.normalization_mapping.get(config.input_features[key].type.value, NormalizationMode.IDENTITY)
    return centre_and_spread(stats.get(key, {}), NormalizationMode(mode))


def near_constant_dims(config, stats: dict[str, dict]) -> list[NearConstantDim]:
    """Every state dimension whose spread in ``stats`` is below NEAR_CONSTANT_REL * max(1, |centre|)."""
    found = []
    for key in state_keys(config):
        got = input_centre_and_spread(config, stats, key)
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


def start_state_stats(states: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot-style statistics (min, max, mean, std, q01..q99) of ``states`` [N, dim]: observations at the env's
    start states, one per reset."""
    x = np.asarray(states, dtype=np.float64).reshape(len(states), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    for q in (1, 10, 50, 90, 99):
        out[f"q{q:02d}"] = np.quantile(x, q / 100, axis=0)
    return out


def widen_stats(demo: dict, start: dict[str, np.ndarray]) -> tuple[dict, np.ndarray]:
    """``demo``'s statistics of one feature widened so that no dimension is narrower than in ``start``
    (``start_state_stats``): std = max of the two, min / max and the outer quantiles the union of the ranges.
    The centre (mean, q50) stays the demos': SFT learned around it. Returns (new stats, the dims whose std or
    min-max range grew by more than 0.1 %)."""
    new = {k: np.array(v, dtype=np.float64, copy=True) for k, v in demo.items()}

    def take(name: str, pick) -> None:
        if name in new and name in start:
            new[name] = pick(new[name].reshape(-1), start[name]).reshape(new[name].shape)

    take("std", np.maximum)
    for name in ("min", "q01", "q10"):
        take(name, np.minimum)
    for name in ("max", "q90", "q99"):
        take(name, np.maximum)

    def grew(before, after) -> np.ndarray:
        before, after = np.asarray(before, np.float64).reshape(-1), np.asarray(after, np.float64).reshape(-1)
        return after > before * (1 + 1e-3) + 1e-9

    widened = np.zeros(np.asarray(start["std"]).shape, dtype=bool)
    if "std" in demo:
        widened |= grew(demo["std"], new["std"])
    if "min" in demo and "max" in demo:
        widened |= grew(np.subtract(demo["max"], demo["min"]), new["max"] - new["min"])
    return new, np.flatnonzero(widened)
