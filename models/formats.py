"""The file formats `models.loaders` reads, by name.

Kept apart from the loaders so that the command line can offer them as choices without
importing pandas at start-up; `models.loaders.FORMATS` is built from this table.
"""

from __future__ import annotations

LOADER_FUNCTIONS = {
    "baby": "load_amazon_baby",
    "amazon2014": "load_amazon_2014",
    "amazon2023": "load_amazon_2023",
    "movielens": "load_movielens",
    "mmrec": "load_mmrec",
}
"""format name → name of its loader function in `models.loaders`."""

FORMAT_NAMES = tuple(sorted(LOADER_FUNCTIONS))
