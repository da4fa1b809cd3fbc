"""How well trained transcoders stand in for the MLPs: CE recovered, KL, next-token agreement.

    wiremap demo                              # trains wiremap_out/demo/{clt,plt} on the organism
    python bench/replacement.py               # evaluates both on held-out organism text
    python bench/replacement.py --transcoders runs/x/transcoders --model path/to/model \\
        --text notes.txt

Every MLP output is replaced by the transcoders' reconstruction (closed loop: each layer reads
what the spliced model computes), exactly as the training callback does. CE recovered =
(CE with MLPs zero-ablated − spliced CE) / (zero-ablated CE − original CE).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def organism_text(n_docs: int, seed: int) -> list[str]:
    from wiremap.train.organism import build_corpus

    return build_corpus(n_docs=n_docs, seed=seed).documents


def contexts(tokenizer, texts: list[str], context_length: int, n: int) -> torch.Tensor:
    from wiremap.cache.text import boundary_tokens, pack_contexts, tokenize

    bos, eos = boundary_tokens(tokenizer)
    rows = pack_contexts(tokenize(texts, tokenizer), context_length, bos, eos)
    return torch.tensor([row for row, _ in zip(rows, range(n), strict=False)])


def evaluate(model_path: str, tc_path: Path, ids: torch.Tensor) -> dict[str, float]:
    from wiremap.models.formats import load_transcoders
    from wiremap.models.loading import load_model
    from wiremap.train.callbacks import replacement_metrics

    lm, _ = load_model(model_path)
    tc = load_transcoders(tc_path)
    ones = torch.ones(tc.n_layers)  # exported transcoders work on raw activations
    with torch.no_grad():
        return replacement_metrics(lm, tc, ones, ones, ids)


def main() -> None:
    from wiremap.models.organism import organism_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(organism_path()))
    p.add_argument("--transcoders", nargs="*", default=None, help="default: the demo's CLT, PLT")
    p.add_argument("--text", default=None, help="a .txt file (default: fresh organism text)")
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=1, help="organism text seed (demo trains on 0)")
    args = p.parse_args()
    torch.set_num_threads(1)
    folders = args.transcoders or [f"wiremap_out/demo/{a}" for a in ("clt", "plt")]
    texts = (
        Path(args.text).read_text().splitlines()
        if args.text
        else organism_text(4 * args.contexts, args.seed)
    )
    from wiremap.models.loading import load_model

    _, tokenizer = load_model(args.model)
    ids = contexts(tokenizer, texts, args.context_length, args.contexts)
    print(f"{ids.shape[0]} contexts x {ids.shape[1]} tokens of held-out text; model {args.model}")
    for folder in folders:
        m = evaluate(args.model, Path(folder), ids)
        print(
            f"{folder}: CE original {m['ce_original']:.4f}, spliced {m['ce_spliced']:.4f}, "
            f"MLPs zeroed {m['ce_zero_ablated']:.4f} -> CE recovered {m['ce_recovered']:.3f}; "
            f"KL {m['kl']:.4f}, next-token agreement {m['agreement']:.3f}"
        )


if __name__ == "__main__":
    main()
