"""Random library ids for the cluster tests: every kind the server accepts, the awkward ones most."""

from __future__ import annotations

import random
import string

from verdant_trio.service.cluster.placement import KEY_PUNCTUATION
from verdant_trio.storage.names import check_id
from verdant_trio.sync.errors import VerdantError

SEED = 1313

ASCII_KEPT = string.ascii_letters + string.digits + KEY_PUNCTUATION
ASCII_DROPPED = "\"\\/<>&'+=`"
NON_ASCII = (
    "üéßÿ\u00a0\u00ad\u0100Ωж"  # Latin-1 (PyJWT: \u00XX, which jwt_payload_query turns into a byte)
    "日本語中文한국어עبر"  # other scripts, right-to-left included
    "\u2028\u2029\u200b\u200d\ufeff\u0301\ufffd"  # separators, invisible, combining
    "😀🎉\U0010fffd"  # astral: surrogate pairs in PyJWT's escapes
)
EDGE_IDS = (
    "plain-lib", "ü", "日本", "😀", "\\", '"', "/", "a/b", "ab", "x\\u0041", "\\u00fc",
    'a","lib":"b', "a\\", "\\\"", " ", "~", "~abc", "..", "lib", '"lib":"x"', "é" * 75,
)  # fmt: skip


def library_ids(count: int, seed: int = SEED) -> list[str]:
    """`count` distinct ids the server accepts: realistic ones, ASCII with every character
    some JSON writer escapes, mixed with non-ASCII, and non-ASCII only."""
    rng = random.Random(seed)
    ids: dict[str, None] = dict.fromkeys(EDGE_IDS)
    while len(ids) < count:
        style = rng.random()
        length = rng.randint(1, 40)
        if style < 0.25:
            text = "".join(rng.choices(string.ascii_lowercase + string.digits + "-_", k=length))
        elif style < 0.55:
            text = "".join(rng.choices(ASCII_KEPT + ASCII_DROPPED * 3, k=length))
        elif style < 0.9:
            text = "".join(rng.choices(ASCII_KEPT + ASCII_DROPPED + NON_ASCII * 2, k=length))
        else:
            text = "".join(rng.choices(NON_ASCII, k=length))
        while len(text.encode()) > 150:
            text = text[:-1]
        try:
            check_id(text, "library id")
        except VerdantError:
            continue
        ids[text] = None
    return list(ids)[:count]
