"""Attribution speed and memory on a random 8-layer model with 4096-feature TopK PLTs.

    python bench/attribute.py                 # all cases, each in a fresh process
    python bench/attribute.py --case uncapped # one case
    python bench/attribute.py --threads 1     # one intra-op thread (a loaded machine)

Model: tiny Llama config, 8 layers, d_model 256 (random weights); transcoders: PLT,
F = 4096 per layer, TopK k = 32 (random). Cases: a 32-token prompt uncapped and with
max_feature_nodes=2000, and a 1,024-token prompt with a feature budget.
Memory is the process's peak resident set size (`resource.getrusage(...).ru_maxrss`),
reported as the peak during attribution minus the resident size before it; every case
runs in its own process so peaks do not carry over. The load average is printed because
the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "uncapped": dict(n_tokens=32, budget=None, batch_size=256),
    "budget2000": dict(n_tokens=32, budget=2000, batch_size=256),
    "long": dict(n_tokens=1024, budget=256, batch_size=64),
}


def _rss_mb() -> float:
    """Current resident set size (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(root: Path):
    import torch

    from wiremap.models.loading import load_model
    from wiremap.models.replacement import ReplacementModel
    from wiremap.models.tiny import build_tiny_model
    from wiremap.models.transcoders import build_transcoder

    path = root / "llama8x256"
    if not (path / "config.json").exists():
        build_tiny_model("llama", path, n_layers=8, d_model=256, max_position_embeddings=2048)
    model, tokenizer = load_model(str(path))
    torch.manual_seed(0)
    tc = build_transcoder("plt", 8, 256, 4096, activation="topk", k=32)
    return ReplacementModel(model, tokenizer, tc)


def _prompt(rm, n_tokens: int) -> str:
    from wiremap.models.tiny import sample_corpus

    text = " ".join(sample_corpus(400, seed=1))
    ids = rm.tokenizer(text, add_special_tokens=False).input_ids[: n_tokens - 1]
    return rm.tokenizer.decode(ids)


def run_case(name: str, root: Path, threads: int | None) -> None:
    import torch

    from wiremap.attribute.attribute import attribute

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rm = _setup(root)
    spec = CASES[name]
    prompt = _prompt(rm, spec["n_tokens"])
    attribute(_prompt(rm, 8), rm, verbose=False)  # warm-up (allocator, first-call overheads)
    before = _rss_mb()
    start = time.perf_counter()
    graph = attribute(
        prompt, rm, max_feature_nodes=spec["budget"], batch_size=spec["batch_size"], verbose=False
    )
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    s = graph.settings
    print(
        f"{name:>10}: {graph.n_pos} tokens, budget={spec['budget']}, batch={spec['batch_size']}, "
        f"{s['n_active_features']} active features, {graph.n_features} feature nodes, "
        f"{s['n_backward_passes']} backward passes, {seconds:.2f} s, "
        f"peak RSS +{max(peak - before, 0):.0f} MiB (baseline {before:.0f} MiB), "
        f"threads={torch.get_num_threads()}, load={os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=list(CASES), help="run one case in this process")
    parser.add_argument("--root", default=None, help="folder for the model (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="wiremap-bench-"))
    if args.case:
        run_case(args.case, root, args.threads)
        return
    extra = ["--threads", str(args.threads)] if args.threads else []
    for name in CASES:
        cmd = [sys.executable, __file__, "--case", name, "--root", str(root), *extra]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
