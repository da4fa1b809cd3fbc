"""What an interrupted `wiremap features` had finished, so that the same command continues.

    progress = CardProgress(out, fingerprint(cfg, cache))
    stats = progress.stats() or progress.save_stats(scan_cache(cache, tc, cfg))
    entry = progress.layer(i) or progress.done_layer(i, write_layer(out, i, cards))
    progress.finish()                      # after index.json: the two files below go

Two hidden files in the output folder: `.scan.safetensors` (the pass's per-layer statistics,
written once the pass is over) and `.progress.json` (the fingerprint of the settings, cache
and transcoders, and the index entry of every layer file written). Both are replaced
atomically; a rerun with other settings, another cache or other transcoders starts over.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wiremap.fileio import atomic_path, atomic_write

SCAN, PROGRESS = ".scan.safetensors", ".progress.json"
_PARTS = ("top.keys", "top.rows", "top.values", "sample.keys", "sample.rows", "sample.values")


def fingerprint(cfg, cache) -> str:
    """A digest of what the cards depend on: settings, the cache's shards, the transcoders."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress", "device")}
    tc = Path(cfg.transcoders)
    sums = tc / "checksums.json"
    weights = (sums if sums.is_file() else tc / "config.yaml").read_bytes()
    parts = [json.dumps(settings, sort_keys=True), *(e["sha256"] for e in cache.manifest["shards"])]
    return hashlib.sha256("|".join(parts).encode() + weights).hexdigest()


class CardProgress:
    def __init__(self, out: Path, digest: str):
        self.out, self.digest = Path(out), digest
        self.state = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            state = json.loads((self.out / PROGRESS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        if state.get("fingerprint") != self.digest:
            return {"fingerprint": self.digest, "scanned": False, "layers": {}}
        return state

    def _write(self) -> None:
        atomic_write(self.out / PROGRESS, json.dumps(self.state, indent=1))

    def stats(self):
        """The saved statistics of a finished pass with these settings, or None."""
        from safetensors.torch import load_file

        from wiremap.attribution.features import LayerStats

        if not self.state["scanned"] or not (self.out / SCAN).is_file():
            return None
        t = load_file(str(self.out / SCAN))
        stats = []
        for i in range(self.state["n_layers"]):
            (n_features, top_k), n_samples = (
                t[f"{i}.top.keys"].shape,
                t[f"{i}.sample.keys"].shape[1],
            )
            s = LayerStats(n_features, top_k, n_samples, generator=None)  # the pass is over
            for part in _PARTS:
                holder, name = part.split(".")
                setattr(getattr(s, holder), name, t[f"{i}.{part}"])
            s.n_active, s.hist = t[f"{i}.n_active"], t[f"{i}.hist"]
            stats.append(s)
        return stats

    def save_stats(self, stats: list) -> list:
        from safetensors.torch import save_file

        tensors = {}
        for i, s in enumerate(stats):
            for part in _PARTS:
                holder, name = part.split(".")
                tensors[f"{i}.{part}"] = getattr(getattr(s, holder), name).contiguous()
            tensors[f"{i}.n_active"], tensors[f"{i}.hist"] = s.n_active, s.hist
        with atomic_path(self.out / SCAN) as tmp:
            save_file(tensors, str(tmp))
        self.state.update(scanned=True, n_layers=len(stats), layers={})
        self._write()
        return stats

    def layer(self, i: int) -> dict | None:
        entry = self.state["layers"].get(str(i))
        return entry if entry is not None and (self.out / entry["file"]).is_file() else None

    def done_layer(self, i: int, entry: dict) -> dict:
        self.state["layers"][str(i)] = entry
        self._write()
        return entry

    def finish(self) -> None:
        for name in (SCAN, PROGRESS):
            (self.out / name).unlink(missing_ok=True)
