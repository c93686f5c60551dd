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
the band or at either end. Where it crosses the band (one rung below it, the next above: MetaWorld's pick-place
scored 0.17 with 5 demos and 0.61 with 10) it may bisect between the two (``refine`` more SFT trainings): the
demo count halfway, or, between neighbouring counts, the stronger count at half the steps (window-open: 0.25 with
one demo, 0.88 with two). Then it keeps the best-scoring rung tried at or below the band's top (the top is a rule,
the bottom a wish).
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


def between(weaker: Rung, stronger: Rung, min_steps: int = 1) -> Rung | None:
    """A rung to try between two that straddle the band, or None: the demo count halfway when the counts are more
    than one apart; the stronger count at half its steps (not under ``min_steps``) when they are neighbours; the
    steps halfway at one count."""
    (d1, s1), (d2, s2) = weaker, stronger
    if d2 - d1 > 1:
        return (d1 + d2) // 2, s2
    if d2 - d1 == 1:
        return (d2, s2 // 2) if s2 // 2 >= min_steps else None
    if d1 == d2 and abs(s2 - s1) > 1:
        return d1, (s1 + s2) // 2
    return None


def calibrate(
    score: Callable[[Rung], float], ladder: list[Rung], start: Rung, band: tuple[float, float], refine: int = 0
) -> tuple[Rung, float, list[tuple[int, int, float]]]:
    """Walk ``ladder`` from ``start`` until ``score(rung)`` lies in ``band`` (low, high); where two neighbouring
    rungs straddle the band, try up to ``refine`` rungs between them (``between``). Returns the chosen rung, its
    score and the trail ``[(demos, steps, score), ...]`` in the order tried."""
    low, high = band
    tried: dict[Rung, float] = {}
    trail: list[tuple[int, int, float]] = []

    def run(rung: Rung) -> float:
        tried[rung] = s = score(rung)
        trail.append((*rung, s))
        return s

    i = ladder.index(start)
    while True:
        s = run(ladder[i])
        if low <= s <= high:
            return ladder[i], s, trail
        j = i - 1 if s > high else i + 1
        if not 0 <= j < len(ladder):  # still too good at the weakest rung, or too weak at the strongest: the
            return ladder[i], s, trail  # caller reports it
        if ladder[j] in tried:  # the band lies between these two rungs
            break
        i = j
    weaker, stronger = sorted((ladder[i], ladder[j]), key=ladder.index)
    for _ in range(refine):
        mid = between(weaker, stronger, min(steps for _, steps in ladder))
        if mid is None or mid in tried:
            break
        s = run(mid)
        if low <= s <= high:
            return mid, s, trail
        weaker, stronger = (weaker, mid) if s > high else (mid, stronger)
    best = max((r for r in tried if tried[r] <= high), key=tried.__getitem__)
    return best, tried[best], trail
