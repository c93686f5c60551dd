"""Few-shot SFT calibrated to a starting success band.

A benchmark of RL fine-tuning starts from an SFT policy that leaves room to learn: the paper's protocol (and issue
17) has few-shot SFT at or below 60% deterministic success. How many demonstrations give that depends on the task:
on MetaWorld five scripted demos give 100% on drawer-open and 3% on peg-insert-side. So the amount of SFT data is
searched per task along a ladder, weakest first:

    (1 demo, min_steps) ... (1 demo, steps / 2), (1 demo, steps), (2 demos, steps), ... (max_demos, steps),
    (max_demos, 2 steps) ... (max_demos, max_steps)

Fewer demonstrations come first; only at one demonstration are SFT steps halved (an undertrained policy is the
last resort: it is what behaviour cloning gives with too little training, not with too little data). Only at
``max_demos`` are they doubled, for a task that more data alone does not lift into the band (MetaWorld's
peg-insert-side scored 0.04 with 40 demos at 1000 steps, and 0.43 with 20 demos at 2500). The search
starts at the configured rung and walks down while SFT scores above the band and up while below it; it stops in
the band, at either end, or where it crosses the band (then it keeps the rung below: the band's top is a rule,
its bottom a wish).
"""

from __future__ import annotations

from collections.abc import Callable

Rung = tuple[int, int]  # (demonstrations, SFT steps)


def sft_ladder(num_demos: int, steps: int, max_demos: int, min_steps: int, max_steps: int | None = None) -> list[Rung]:
    """The rungs from weakest to strongest: one demo at halved steps (down to ``min_steps``), then demo counts 1, 2,
    ``num_demos`` and its doublings up to ``max_demos``, all at ``steps``, then ``max_demos`` at doubled steps (up to
    ``max_steps``; None: ``steps``)."""
    max_steps = steps if max_steps is None else max_steps
    if not 1 <= num_demos <= max_demos or not 1 <= min_steps <= steps <= max_steps:
        raise ValueError(
            f"num_demos, max_demos, min_sft_steps, sft_steps, max_sft_steps: need 1 <= num_demos ({num_demos}) <= "
            f"max_demos ({max_demos}) and 1 <= min_sft_steps ({min_steps}) <= sft_steps ({steps}) <= max_sft_steps "
            f"({max_steps})"
        )
    short, s = [], steps // 2
    while s >= min_steps:
        short.append((1, s))
        s //= 2
    demos, d = {1, 2, num_demos, max_demos}, num_demos
    while d * 2 <= max_demos:
        d *= 2
        demos.add(d)
    longer, s = [], steps * 2
    while s <= max_steps:
        longer.append((max_demos, s))
        s *= 2
    return short[::-1] + [(n, steps) for n in sorted(x for x in demos if x <= max_demos)] + longer


def calibrate(
    score: Callable[[Rung], float], ladder: list[Rung], start: Rung, band: tuple[float, float]
) -> tuple[Rung, float, list[tuple[int, int, float]]]:
    """Walk ``ladder`` from ``start`` until ``score(rung)`` lies in ``band`` (low, high). Returns the chosen rung,
    its score and the trail ``[(demos, steps, score), ...]`` in the order tried."""
    low, high = band
    i = ladder.index(start)
    tried: dict[int, float] = {}
    trail: list[tuple[int, int, float]] = []
    while True:
        tried[i] = s = score(ladder[i])
        trail.append((*ladder[i], s))
        if low <= s <= high:
            return ladder[i], s, trail
        if s > high:
            if i == 0:  # the weakest rung still scores above the band: keep it, the caller reports it
                return ladder[i], s, trail
            if i - 1 in tried:  # crossed the band from below: the rung under it is at or below the top
                return ladder[i - 1], tried[i - 1], trail
            i -= 1
        else:
            if i == len(ladder) - 1 or i + 1 in tried:  # the strongest rung, or the band lies between two rungs
                return ladder[i], s, trail
            i += 1
