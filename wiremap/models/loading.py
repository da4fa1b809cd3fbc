"""Load any Hugging Face causal LM by hub name, local folder or GGUF file.

model, tokenizer = load_model("gpt2", dtype="float32", device="cpu")
model, tokenizer = load_model("/path/to/checkpoint")
model, tokenizer = load_model("/path/to/model.Q4_1.gguf")   # or a folder holding one .gguf

A GGUF file is dequantised by transformers (packages `gguf` and `accelerate`) to float32;
those dequantised weights are what wiremap analyses. The first load writes them, with the
tokenizer read from the same file, to `~/.cache/wiremap/gguf/` (`$XDG_CACHE_HOME` moves it)
so later loads take a second instead of a dequantisation; the folder is keyed by the file's
path, size and modification time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from wiremap.errors import WiremapError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise WiremapError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WiremapError("device 'cuda' was asked for but no CUDA GPU is visible; use cpu")
    return device


FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".json")


def _looks_like_path(name: str) -> bool:
    if name.lower().endswith(FILE_SUFFIXES):  # a file name, never a hub id
        return True
    return name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name)


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def check_model_source(name_or_path: str) -> None:
    """A clear error for a local path that does not exist (before transformers' own)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if gguf_file(path) is None and not (path / "config.json").exists():
            kind = "file" if path.is_file() else "folder without config.json or a .gguf file"
            raise WiremapError(
                f"{name_or_path!r} is a {kind}; --model takes a folder written by "
                "`save_pretrained`, a .gguf file (or a folder holding one), or a hub model name"
            )
        return
    if _looks_like_path(name_or_path):
        raise WiremapError(
            f"model path {name_or_path!r} does not exist; check the path. --model takes a "
            "folder written by `save_pretrained`, a .gguf file (or a folder holding one), or a "
            "hub model name such as 'gpt2'"
        )


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    revision: str | None = None,
    load_tokenizer: bool = True,
):
    """Load `(model, tokenizer)` in eval mode; the tokenizer is None if not asked for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name_or_path = model_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), revision=revision
        )
        tokenizer = (
            AutoTokenizer.from_pretrained(name_or_path, revision=revision)
            if load_tokenizer
            else None
        )
    except (OSError, ValueError) as err:
        raise WiremapError(
            f"could not load model {name_or_path!r}: {err}. Check the name or path; "
            "offline, give a local folder written by `save_pretrained`"
        ) from err
    model.to(resolve_device(device)).eval()
    return model, tokenizer


def model_source(name_or_path: str | Path) -> str | Path:
    """What transformers should load: the name or folder itself, or a GGUF's dequantised copy."""
    check_model_source(str(name_or_path))
    gguf = gguf_file(Path(name_or_path).expanduser())
    return dequantised_folder(gguf) if gguf is not None else name_or_path


def load_config(name_or_path: str, revision: str | None = None):
    """The model's transformers config without its weights (a GGUF file: its dequantised copy's).

    Commands check the architecture, layers and context length on it before loading the model.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_source(name_or_path), revision=revision)
    except (OSError, ValueError) as err:
        raise WiremapError(
            f"could not read the config of model {name_or_path!r}: {err}. Check the name or "
            "path; offline, give a local folder written by `save_pretrained` or a .gguf file"
        ) from err


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only `.gguf` in a folder."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise WiremapError(f"{str(path)!r} holds several .gguf files ({names}); name one")
    return found[0] if found else None


def gguf_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wiremap" / "gguf"


def dequantised_folder(gguf: Path) -> Path:
    """A `save_pretrained` folder of `gguf`'s dequantised weights and tokenizer (made once)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = gguf_cache_root() / f"{gguf.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    model, tokenizer = _read_gguf(gguf)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # The weights are plain float32 now; drop the GGUF marks that forbid saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: a folder with config.json is always whole
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if (folder / "config.json").exists():  # another process finished first
            return folder
        raise WiremapError(
            f"could not write the dequantised copy of {gguf.name} to {folder.parent}: {err}; "
            "free some disk or set XDG_CACHE_HOME to a writable folder"
        ) from err
    return folder


def _read_gguf(gguf: Path):
    """Dequantise a GGUF file with transformers; one WiremapError for every way it fails."""
    _require_gguf_packages(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = _gguf_architecture(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as err:  # transformers' GGUF path raises many types
        raise WiremapError(_dequantise_failure(gguf, arch, err)) from err
    return model, tokenizer


def _require_gguf_packages(gguf: Path) -> None:
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf as _gguf  # noqa: F401
    except ImportError as err:
        raise WiremapError(
            f"loading {gguf.name} needs the packages `gguf` and `accelerate`: "
            "pip install gguf accelerate (or pip install -e '.[real]')"
        ) from err


def _gguf_architecture(gguf: Path) -> str | None:
    """`general.architecture` from the header; a clear error for a corrupt or cut file."""
    from gguf import GGUFReader

    try:  # the reader checks the magic and maps every tensor: truncation shows here
        field = GGUFReader(gguf).fields.get("general.architecture")
        return None if field is None else str(field.contents())
    except Exception as err:  # numpy and the reader raise ValueError, IndexError, ...
        raise WiremapError(
            f"{str(gguf)!r} is not a readable GGUF file ({type(err).__name__}: "
            f"{str(err)[:200]}); it may be truncated or corrupt: download it again"
        ) from err


def _plain(arch: str) -> str:
    """transformers renames a few llama.cpp names (qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss)."""
    return arch.replace("_", "").replace("-", "")


def _dequantise_failure(gguf: Path, arch: str | None, err: Exception) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch is None or _plain(arch) not in {_plain(a) for a in known}:
        return (
            f"{gguf.name} holds a {arch or 'unnamed'!r} model (general.architecture); "
            f"transformers dequantises GGUF files of these architectures only: "
            f"{', '.join(known)}. Use a checkpoint folder of this model instead"
        )
    return (
        f"transformers could not dequantise {str(gguf)!r} ({type(err).__name__}: "
        f"{str(err)[:300]}); the file may be damaged: download it again, or use a "
        "checkpoint folder of this model"
    )


def model_max_length(model) -> int | None:
    """Longest context the model was built for, when its config says so."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
