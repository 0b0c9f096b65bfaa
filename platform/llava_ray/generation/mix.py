"""Which response types each image gets: every type, or a share of the pairs per type (``generate.mix``).

LLaVA-Instruct-158K is not three samples per image: it holds 58K conversations, 23K detailed
descriptions and 77K complex-reasoning samples, over about 81K COCO images (about two types per
image, never the same type twice). The paper does not say how images were picked per type.

Without ``generate.mix`` every image gets every type of ``generate.types`` (what the job always
did). With it, :func:`assign_types` decides, for a pool of N images (``generate.limit`` or all):

1. **How many pairs per type.** ``total = round(N x pairs_per_image)`` pairs (default one per
   image), split by the mix's shares with the largest-remainder method (ties go to the earlier
   type of ``conversation, detail, complex``), so the counts sum to ``total`` exactly and each
   is within one of its share.
2. **Which images.** The images are put in a seeded order: by ``sha256("{seed}:{image_id}")``, a
   key of the image alone, so the order does not depend on the annotation file's order. The
   types then take consecutive runs of that order, ``conversation`` first, wrapping around at
   the end. No run is longer than N (the config refuses a ``pairs_per_image`` that would need
   one), so no image gets a type twice, and every image gets ``floor(total / N)`` or
   ``ceil(total / N)`` types: with ``total >= N`` every image of the pool is used.

The result depends only on the seed, the pool's image ids, the shares and ``pairs_per_image``,
so a rerun of the same config asks for the same pairs, and the resume journal (keyed by
``{image_id}-{type}``) means none already answered is asked again. Changing any of the four
changes the assignment: journaled replies of pairs still assigned are reused, the others stay in
the journal unused (the report counts them).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

from llava_ray.config.generation import RESPONSE_TYPES


def type_counts(shares: Mapping[str, float], total: int) -> dict[str, int]:
    """``total`` split by ``shares`` (summing to 1) with the largest-remainder method; ties: earlier type."""
    exact = {name: share * total for name, share in shares.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    order = list(shares)
    by_remainder = sorted(order, key=lambda name: (-(exact[name] - counts[name]), order.index(name)))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def image_order(image_ids: Sequence[int], seed: int) -> list[int]:
    """``image_ids`` in the seeded order of the module docstring (each image's key depends on it alone)."""

    def key(image_id: int) -> tuple[bytes, int]:
        return hashlib.sha256(f"{seed}:{image_id}".encode()).digest(), image_id

    return sorted(image_ids, key=key)


def assign_types(
    image_ids: Sequence[int], shares: Mapping[str, float], pairs_per_image: float, seed: int
) -> dict[int, tuple[str, ...]]:
    """{image id: its response types, in ``RESPONSE_TYPES`` order} for every image of the pool.

    An image may get no type (when ``pairs_per_image < 1``); see the module docstring.
    """
    images = len(image_ids)
    counts = type_counts(shares, math.floor(images * pairs_per_image + 0.5))
    ordered = image_order(image_ids, seed)
    chosen: dict[int, set[str]] = {image_id: set() for image_id in image_ids}
    start = 0
    for name in RESPONSE_TYPES:
        # The config keeps each share x pairs_per_image <= 1; min() guards the rounding edge.
        count = min(counts.get(name, 0), images)
        for position in range(start, start + count):
            chosen[ordered[position % images]].add(name)
        start += count
    return {image_id: tuple(t for t in RESPONSE_TYPES if t in names) for image_id, names in chosen.items()}
