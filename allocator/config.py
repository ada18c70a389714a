"""Allocator configuration from the ``CUTEGRAD_CUDA_ALLOC_CONF`` environment variable.

The syntax follows PyTorch's ``PYTORCH_CUDA_ALLOC_CONF``: comma-separated
``key:value`` pairs, e.g. ``max_split_size_mb:128,garbage_collection_threshold:0.8``.
Every key is described in docs/allocator.md. A malformed value or an unknown key
raises ``ValueError`` naming the key, because a silently ignored setting is a
memory bug that shows up hours later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV_VAR = "CUTEGRAD_CUDA_ALLOC_CONF"

MiB = 1 << 20
# Sizes at or above this start the power-of-two rounding intervals, one per
# doubling (PyTorch's kRoundUpPowerOfTwoStart / kRoundUpPowerOfTwoIntervals).
ROUNDUP_START = MiB
ROUNDUP_INTERVALS = 16
UNLIMITED = (1 << 63) - 1


@dataclass
class AllocatorConfig:
    # Blocks at or above this size are never split (and only serve requests
    # close to their size); UNLIMITED disables the rule.
    max_split_size: int = UNLIMITED
    # How far above the request an oversize cached block may be and still be used.
    max_non_split_rounding: int = 20 * MiB
    # Fraction of the memory cap above which aged cached blocks are released;
    # 0 disables collection. Only active with a memory fraction set.
    garbage_collection_threshold: float = 0.0
    # Divisions per power-of-two interval, index i covers [2^i MiB, 2^(i+1) MiB)
    # (index 0 also covers everything below 1 MiB); 0 or 1 means plain 512 B rounding.
    roundup_power2_divisions: list = field(default_factory=lambda: [0] * ROUNDUP_INTERVALS)

    def divisions_for(self, size: int) -> int:
        log_size = size.bit_length() - 1
        index = log_size - 20 if log_size > 20 else 0
        if index >= ROUNDUP_INTERVALS:
            index = ROUNDUP_INTERVALS - 1
        return self.roundup_power2_divisions[index]


def _error(key: str, value: str, why: str) -> ValueError:
    return ValueError(f"{ENV_VAR}: bad value {value!r} for key '{key}': {why}")


def _parse_float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise _error(key, value, "expected a number") from None


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _error(key, value, "expected an integer") from None


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _parse_divisions(key: str, value: str) -> list:
    def check(n: int, raw: str) -> int:
        if n != 0 and not (_is_power_of_two(n) and n >= 1):
            raise _error(key, raw, "divisions must be 0 or a power of two")
        return n

    if not value.startswith("["):
        n = check(_parse_int(key, value), value)
        return [n] * ROUNDUP_INTERVALS
    if not value.endswith("]"):
        raise _error(key, value, "list form must be [size_mb:divisions,...,>:divisions]")
    named = []          # (interval index, divisions) in increasing index order
    rest = None         # divisions for intervals after the last named one
    entries = [e for e in value[1:-1].split(",") if e.strip()]
    if not entries:
        raise _error(key, value, "empty list")
    for entry in entries:
        if entry.count(":") != 1:
            raise _error(key, entry, "each entry must be size_mb:divisions")
        left, right = (s.strip() for s in entry.split(":"))
        n = check(_parse_int(key, right), right)
        if left == ">":
            rest = n
            continue
        if rest is not None:
            raise _error(key, entry, "'>' must be the last entry")
        size_mb = _parse_int(key, left)
        if not _is_power_of_two(size_mb):
            raise _error(key, left, "interval start (MiB) must be a power of two")
        index = min(size_mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
        if named and index <= named[-1][0]:
            raise _error(key, left, "interval starts must increase")
        named.append((index, n))
    if not named:
        return [rest] * ROUNDUP_INTERVALS
    # Each named start applies up to the next one; sizes below the first named
    # start use its value, sizes past the last use '>' (or the last value).
    result = []
    j = 0
    for i in range(ROUNDUP_INTERVALS):
        while j + 1 < len(named) and named[j + 1][0] <= i:
            j += 1
        if i > named[-1][0] and rest is not None:
            result.append(rest)
        else:
            result.append(named[j][1])
    return result


def parse_config(text: str | None) -> AllocatorConfig:
    """Parse a ``CUTEGRAD_CUDA_ALLOC_CONF`` string; None or empty gives defaults."""
    cfg = AllocatorConfig()
    if not text:
        return cfg
    # Split on commas that are not inside a [...] list.
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    for item in items:
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"{ENV_VAR}: entry {item!r} has no ':' (expected key:value)")
        key, value = (s.strip() for s in item.split(":", 1))
        if key == "max_split_size_mb":
            mb = _parse_int(key, value)
            if mb <= 1:
                raise _error(key, value, "must be larger than 1 (MiB)")
            cfg.max_split_size = mb * MiB
        elif key == "max_non_split_rounding_mb":
            mb = _parse_int(key, value)
            if mb < 0:
                raise _error(key, value, "must not be negative")
            cfg.max_non_split_rounding = mb * MiB
        elif key == "garbage_collection_threshold":
            t = _parse_float(key, value)
            if not 0.0 < t < 1.0:
                raise _error(key, value, "must lie strictly between 0 and 1")
            cfg.garbage_collection_threshold = t
        elif key == "roundup_power2_divisions":
            cfg.roundup_power2_divisions = _parse_divisions(key, value)
        elif key == "expandable_segments":
            if value not in ("False", "false", "0"):
                raise _error(key, value, "cutegrad has no expandable segments; only False is accepted")
        elif key == "backend":
            if value != "native":
                raise _error(key, value, "only the 'native' caching allocator exists")
        else:
            raise ValueError(
                f"{ENV_VAR}: unknown key '{key}' (known: max_split_size_mb, "
                "max_non_split_rounding_mb, garbage_collection_threshold, "
                "roundup_power2_divisions, expandable_segments, backend)"
            )
    return cfg


def config_from_env() -> AllocatorConfig:
    return parse_config(os.environ.get(ENV_VAR))
