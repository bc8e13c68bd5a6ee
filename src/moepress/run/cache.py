"""A disk cache of per-layer calibration statistics, shared by runs (issue 11 item 1): the store.

This module is the storage (`StatsCache`: files, atomic writes, eviction); the keys, the code
versions and the per-layer views the pipeline and the methods use are in `cache_keys.py`.

Why: a grid over ratios or methods (`moepress bench`) computes the same statistics again and
again (frequencies, REAP saliencies, Grams, expert-output features): they depend on the layer's
inputs and weights, not on the ratio. `StatsCache` keeps them on disk, keyed by what they depend
on, so a later run reuses what matches and computes only the rest.

Keys (`LayerKeys`) make reuse exact, never approximate. A statistic of MoE layer i is identified by

    hash(statistic name, its code version, the identity of layer i's INPUTS, layer i's weights)

where the identity of the inputs is a running hash: the calibration token ids, the batching
(batch size, data-parallel world size, device type: they change floating-point sums), the model
config and the weights in front of layer 0 (embeddings), then for each earlier decoder layer the
hash of the weights it had WHEN IT PROPAGATED the hidden states. Under `propagate="original"`
those are the source weights, so every layer's statistics are shared by every ratio and method;
under `"compressed"` (the default, sequential) only layers up to the first compressed one match a
different ratio, and an identical rerun matches everywhere. The code version of a statistic is
the hash of the source files that compute it (its own module, `calib/stats.py`, the `arch`
package) and the moepress/torch versions, so editing a statistic never reuses a stale value.

Only values every data-parallel rank shares are cached (all registered statistics but the
per-rank, per-batch "routing", which is `cacheable=False`). Rank 0 decides hit or miss and
writes; on a hit every rank reads the file (torch.load with weights_only=True).

Storage: one file per entry, written atomically (temporary file + os.replace); least recently
used entries are evicted beyond a size cap (env MOEPRESS_STATS_CACHE_GB, default 20 GB; an entry
larger than the cap is not stored, said once). The directory defaults to
`$MOEPRESS_STATS_CACHE` or `<user cache>/stats` (`resources.cache_dir`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..calib.stats import MISSING

#: Bumped when the key scheme or the file format changes.
CACHE_FORMAT = "1"
DEFAULT_GB = 20.0


def default_directory() -> Path:
    """`$MOEPRESS_STATS_CACHE` if set, else `<moepress cache>/stats`."""
    root = os.environ.get("MOEPRESS_STATS_CACHE")
    if root:
        return Path(root).expanduser()
    from ..resources import cache_dir

    return cache_dir() / "stats"


def default_max_bytes() -> int:
    """The size cap: `$MOEPRESS_STATS_CACHE_GB` gigabytes (default 20)."""
    try:
        gb = float(os.environ.get("MOEPRESS_STATS_CACHE_GB", DEFAULT_GB))
    except ValueError:
        gb = DEFAULT_GB
    return int(gb * 1e9)


def resolve(stats_cache, log: Callable[[str], None] | None = None) -> "StatsCache | None":
    """A `StatsCache` from the API argument: True / "auto" = the default directory, a path = that
    directory, False / None = no cache, or a `StatsCache` as is."""
    if isinstance(stats_cache, StatsCache):
        return stats_cache
    if stats_cache is None or stats_cache is False:
        return None
    directory = default_directory() if stats_cache is True or stats_cache == "auto" else Path(stats_cache)
    return StatsCache(directory, log=log)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _nbytes(value) -> int:
    """Bytes of the tensors in `value` (what torch.save will write, less its small framing)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class StatsCache:
    """Statistic values on disk under `directory`, keyed by hex digests (see the module docstring).

    Values: tensors, numbers, or dicts/lists/tuples of them (saved from the CPU). Counters `hits`,
    `misses`, `stored` go into moepress.json (`describe`)."""

    def __init__(self, directory: str | Path, max_bytes: int | None = None, log: Callable[[str], None] | None = None):
        self.directory = Path(directory).expanduser()
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self.log = log or (lambda message: None)
        self.hits = self.misses = self.stored = 0
        self.too_large_said = self.write_error_said = False
        self.inputs_propagated: bool | None = None  # set by the pipeline: False = every statistic came from here

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pt"

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str, device: torch.device | None = None):
        """The value under `key` (tensors on `device`), or `MISSING`. Counts a hit or a miss."""
        path = self._path(key)
        try:
            value = torch.load(path, map_location=device or "cpu", weights_only=True)
        except (FileNotFoundError, OSError, RuntimeError, EOFError, ValueError):
            self.misses += 1
            return MISSING
        try:
            os.utime(path)  # least recently used = oldest mtime
        except OSError:
            pass
        self.hits += 1
        return value

    def put(self, key: str, value) -> bool:
        """Store `value` atomically; returns whether it was stored (not when larger than the cap)."""
        if _nbytes(value) > self.max_bytes:  # known too large before serialising (a 13 GB Gram is not written)
            self._say_too_large(_nbytes(value))
            return False
        value = _to_cpu(value)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.directory)
        except OSError as exc:  # a read-only or full cache never fails the compression itself
            self._say_write_error(exc)
            return False
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(value, fh)
            size = os.path.getsize(tmp)
            if size > self.max_bytes:
                self._say_too_large(size)
                os.unlink(tmp)
                return False
            self._evict(self.max_bytes - size)
            target = self._path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if not isinstance(exc, OSError):
                raise
            self._say_write_error(exc)
            return False
        self.stored += 1
        return True

    def _say_write_error(self, exc: OSError) -> None:
        if not self.write_error_said:
            self.log(f"statistics cache: cannot write to {self.directory} ({exc}); continuing without storing")
            self.write_error_said = True

    def _say_too_large(self, size: int) -> None:
        if not self.too_large_said:
            self.log(f"statistics cache: an entry of {size / 1e9:.2f} GB exceeds the cap of "
                     f"{self.max_bytes / 1e9:.2f} GB (MOEPRESS_STATS_CACHE_GB) and is not stored")
            self.too_large_said = True

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for path in self.directory.glob("??/*.pt"):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((st.st_mtime, st.st_size, path))
        return out

    def _evict(self, budget: int) -> None:
        """Remove the least recently used entries until the rest takes at most `budget` bytes."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= budget:
                break
            try:
                path.unlink()
            except OSError:
                continue
            total -= size

    def describe(self) -> dict:
        out = {"dir": str(self.directory), "hits": self.hits, "misses": self.misses, "stored": self.stored}
        if self.inputs_propagated is not None:
            out["inputs_propagated"] = self.inputs_propagated
        return out


# ---------------------------------------------------------------------------------------------- hashing
