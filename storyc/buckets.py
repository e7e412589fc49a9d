"""Aspect-ratio buckets (train.buckets): sizes of about the training resolution's area, and which one an
image goes to. Light (no torch): validation and the cache pass share it.

Like the SDXL trainers' buckets: sides are multiples of 64 (32 below 512 px, so tiny test runs have buckets too),
the area stays at or below the resolution's, the aspect ratio is between 1:2 and 2:1; an image goes to the
bucket whose aspect ratio is nearest its own (on a log scale, so 2:1 and 1:2 are equally far from 1:1).
"""
from __future__ import annotations

import math


def bucket_sizes(width: int, height: int) -> list[tuple[int, int]]:
    area = width * height
    step = 64 if min(width, height) >= 512 else 32
    out = set()
    for w in range(step, 4 * max(width, height) + 1, step):
        h = (area // w) // step * step
        if h >= step and 0.5 <= w / h <= 2.0:
            out |= {(w, h), (h, w)}  # portrait and landscape alike
    return sorted(out)


def assign(image_w: int, image_h: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of an image: nearest aspect ratio; among equals, the larger area."""
    r = math.log(image_w / image_h)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - r), -s[0] * s[1]))
