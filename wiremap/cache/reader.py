"""Reading a cache: memory-mapped shards, random access by row, checked before use.

    cache = ActivationCache("wiremap_out/gpt2", verify=True)   # every sha256, up front
    x, y = cache.get(torch.arange(1024))     # [1024, n_layers, d_model] each, stored dtype
    cache.tokens(rows), cache.positions(rows), cache.norm_stats

Silent damage. Each shard's sha256 is in the manifest; a reader checks it the first time the
process opens the shard (one read at disk speed), so flipped bytes stop training with the
shard's name instead of feeding it garbage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from wiremap.cache.config import STORAGE_DTYPES
from wiremap.cache.manifest import MANIFEST, read_manifest
from wiremap.checksums import sha256_file, sha256_once
from wiremap.errors import WiremapError


class ActivationCache:
    """Read a cache written by `build_cache`: memory-mapped shards, random access by row.

    cache = ActivationCache("wiremap_out/cache", verify=True)
    x, y = cache.get(slice(0, 512))         # [512, L, d] input and output activations
    cache.tokens([3, 7]), cache.norm_stats["input"]["mean_norm"]
    """

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise WiremapError(
                f"the cache in {self.path} is incomplete ({self.manifest['n_tokens']} of "
                f"{self.manifest['n_tokens_requested']} tokens); rerun the same `wiremap cache` "
                "command to finish it"
            )
        sizes = torch.tensor([e["n_tokens"] for e in self.manifest["shards"]], dtype=torch.long)
        self._ends = sizes.cumsum(0)
        self._open: dict[int, dict[str, Tensor]] = {}
        self._ahead: threading.Thread | None = None  # hashes the next shard while this one is used
        self._check_sizes()
        if verify:
            self.verify()

    # -- description
    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def n_layers(self) -> int:
        return len(self.manifest["layers"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def input_hook(self) -> str:
        return self.manifest["hooks"]["input"]

    @property
    def output_hook(self) -> str:
        return self.manifest["hooks"]["output"]

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.manifest["dtype"]]

    @property
    def include_bos(self) -> bool:
        """Were the BOS positions cached too (position 0 of each context)?"""
        return bool(self.manifest["include_bos"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def norm_stats(self) -> dict:
        return self.manifest["norm_stats"]

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ActivationCache({str(self.path)!r}, model={m['model']!r}, n_tokens={self.n_tokens}, "
            f"layers={self.layers}, d_model={self.d_model}, dtype={m['dtype']})"
        )

    def __getstate__(self) -> dict:  # data-loader workers reopen the memory maps themselves
        return {**self.__dict__, "_open": {}, "_ahead": None}

    # -- checks
    def _check_sizes(self) -> None:
        for entry in self.manifest["shards"]:
            path = self.path / entry["file"]
            if not path.is_file():
                raise WiremapError(
                    f"shard {path} is missing; rebuild the cache with `wiremap cache`"
                )
            if path.stat().st_size != entry["bytes"]:
                raise WiremapError(
                    f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                    f"{entry['bytes']}: it is truncated or damaged; delete the folder and "
                    "rebuild the cache"
                )

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; WiremapError names the bad ones."""
        bad = [
            e["file"]
            for e in self.manifest["shards"]
            if sha256_file(self.path / e["file"]) != e["sha256"]
        ]
        if bad:
            raise WiremapError(
                f"checksum mismatch in {', '.join(bad)} of {self.path}: the files are corrupt; "
                "delete the folder and rebuild the cache"
            )

    def check_matches(self, **expected) -> None:
        """Raise WiremapError unless the manifest has these values (e.g. `model=`, `layers=`)."""
        wrong = {k: v for k, v in expected.items() if _manifest_value(self.manifest, k) != v}
        if wrong:
            detail = "; ".join(
                f"{k}: {_manifest_value(self.manifest, k)!r} in the cache, {v!r} asked"
                for k, v in wrong.items()
            )
            raise WiremapError(
                f"the cache in {self.path} does not match what is asked ({detail}); point at the "
                "right cache or build one with these settings"
            )

    # -- data
    def shard(self, i: int) -> dict[str, Tensor]:
        """Shard `i`'s tensors, memory-mapped (nothing is read until used)."""
        if i not in self._open:
            self._open[i] = self._load_shard(i)
            self._hash_ahead(i + 1)
        return self._open[i]

    def _hash_ahead(self, i: int) -> None:
        """Hash shard `i` in the background (hashlib releases the GIL), so that reads walking
        forwards find its checksum ready; a failure here is left for the real open to report."""
        if i >= self.n_shards or (self._ahead is not None and self._ahead.is_alive()):
            return
        path = self.path / self.manifest["shards"][i]["file"]
        self._ahead = threading.Thread(target=_quietly, args=(sha256_once, path), daemon=True)
        self._ahead.start()

    def _load_shard(self, i: int) -> dict[str, Tensor]:
        from safetensors import safe_open

        entry = self.manifest["shards"][i]
        path = self.path / entry["file"]
        self._check_sha256(path, entry["sha256"])
        try:
            with safe_open(str(path), "pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors' own errors: header or size is damaged
            raise WiremapError(
                f"shard {path} cannot be read ({err}); it is corrupt: delete the folder and "
                "rebuild the cache"
            ) from err
        self._check_shard(path, tensors, entry["n_tokens"])
        return tensors

    def _check_sha256(self, path: Path, want: str) -> None:
        """Once per shard and process, when it is first opened (a full read at disk speed)."""
        if sha256_once(path) != want:
            raise WiremapError(
                f"shard {path} is corrupt: its sha256 differs from the one in {MANIFEST}. "
                f"Delete {path.name} and rerun the same `wiremap cache` command: it resumes "
                "and recomputes that shard and the ones after it"
            )

    def _check_shard(self, path: Path, tensors: dict[str, Tensor], n: int) -> None:
        shape = (n, self.n_layers, self.d_model)
        expect = {
            self.input_hook: (shape, self.dtype),
            self.output_hook: (shape, self.dtype),
            "tokens": ((n,), torch.long),
            "positions": ((n,), torch.long),
        }
        for key, (want_shape, want_dtype) in expect.items():
            got = tensors.get(key)
            if got is None or tuple(got.shape) != want_shape or got.dtype != want_dtype:
                found = None if got is None else (tuple(got.shape), got.dtype)
                raise WiremapError(
                    f"shard {path} does not match the manifest ({key}: expected "
                    f"{want_shape} {want_dtype}, found {found}); rebuild the cache"
                )

    def _index(self, indices) -> tuple[Tensor, bool]:
        if isinstance(indices, int):
            idx = torch.tensor([indices + self.n_tokens if indices < 0 else indices])
            single = True
        elif isinstance(indices, slice):
            idx, single = torch.arange(*indices.indices(self.n_tokens)), False
        else:
            idx, single = torch.as_tensor(indices, dtype=torch.long).reshape(-1), False
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n_tokens):
            raise IndexError(f"row index out of range for a cache of {self.n_tokens} tokens")
        return idx, single

    def _gather(self, key: str, indices) -> Tensor:
        idx, single = self._index(indices)
        shard_of = torch.searchsorted(self._ends, idx, right=True)
        sample = self.shard(0)[key]
        out = torch.empty((len(idx), *sample.shape[1:]), dtype=sample.dtype)
        for s in shard_of.unique().tolist():
            mask = shard_of == s
            start = int(self._ends[s - 1]) if s else 0
            out[mask] = self.shard(s)[key][idx[mask] - start]
        return out[0] if single else out

    def get(self, indices) -> tuple[Tensor, Tensor]:
        """`(x, y)`: input and output activations `[n, L, d]` (or `[L, d]` for an int)."""
        return self._gather(self.input_hook, indices), self._gather(self.output_hook, indices)

    def tokens(self, indices) -> Tensor:
        return self._gather("tokens", indices)

    def positions(self, indices) -> Tensor:
        return self._gather("positions", indices)


def _quietly(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def _manifest_value(manifest: dict, key: str):
    if key in ("input_hook", "output_hook"):
        return manifest["hooks"][key.split("_")[0]]
    return manifest.get(key)
