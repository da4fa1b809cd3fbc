"""Attribution on the real model: time, backward passes and peak memory; circuit-tracer if present.

    python bench/attribute_real.py --transcoders <PLT exported for SmolLM2>     # all cases
    python bench/attribute_real.py --transcoders T --case 128x1000               # one case
    python bench/attribute_real.py --transcoders T --long 1024                    # + a long prompt

Model: SmolLM2-135M-Instruct (the GGUF of the `real` extra, dequantised to float32), or
--model. Cases: prompts of 8 and 128 tokens (BOS included; cut from wiremap_out/prose.txt,
which `wiremap real --prose wiremap_out/prose.txt` writes, or --text) with feature budgets
of 1k, 4k and 8k; `--long N` adds an N-token prompt whose budget and batch size the
memory planner chooses (bounded memory on 1,000+ tokens).
Each case runs in a fresh process: peak memory is the process's peak resident size minus
its size before the attribution (`ru_maxrss`), and on a GPU `torch.cuda.max_memory_allocated`.

circuit-tracer: when `import circuit_tracer` works in this interpreter, the same prompt,
model and transcoders (the export is in its layout) run through its `attribute` with the
same budget and batch size, in the same process after ours, and the ratio is printed.
Install it into a separate environment, not the project's (circuit-tracer 0.5.0 pins
transformers <= 4.57.3 and needs nnsight 0.6 with cloudpickle 3.0):
    python -m venv --system-site-packages ct
    ct/bin/python -m pip install circuit-tracer==0.5.0 "nnsight>=0.6,<0.7" "cloudpickle<3.1"
    ct/bin/python bench/attribute_real.py --model <hf4 folder> --transcoders T
transformers 4 cannot read the tokenizer config that transformers 5 wrote into the
dequantised folder (`TokenizersBackend`): `_for_transformers4` makes a linked copy that it
reads; pass that folder as --model so both tools load the same weights.
The machine may be shared: the load average is printed with each case.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BUDGETS = (1000, 4000, 8000)
LENGTHS = (8, 128)
CASES = [f"{n}x{b}" for n in LENGTHS for b in BUDGETS]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_model() -> str:
    from wiremap.real import smollm2_gguf

    return str(smollm2_gguf())


def prompt_of(tokenizer, text_file: str, n_tokens: int) -> str:
    """A prompt of `n_tokens` tokens with BOS: the start of the prose, cut on tokens."""
    text = Path(text_file).read_text(encoding="utf-8")[: 40 * n_tokens + 1000]
    ids = tokenizer(text, add_special_tokens=False).input_ids[: n_tokens - 1]
    return tokenizer.decode(ids)


def circuit_tracer_note() -> str | None:
    """None when circuit-tracer can be imported here, else how to install it."""
    try:
        import circuit_tracer  # noqa: F401
    except ImportError:
        return (
            "circuit-tracer is not installed in this interpreter; for the comparison: "
            "python -m venv --system-site-packages ct && ct/bin/python -m pip install "
            "circuit-tracer==0.5.0 'nnsight>=0.6,<0.7' 'cloudpickle<3.1' && "
            "ct/bin/python bench/attribute_real.py ... (see this file's docstring)"
        )
    return None


def run_ours(rm, prompt: str, budget: int | None, batch: int | None) -> dict:
    import torch

    from wiremap.attribution.attribute import attribute

    attribute("Hello", rm, verbose=False, max_feature_nodes=10)  # first-call allocations
    before = _rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    g = attribute(prompt, rm, verbose=False, max_feature_nodes=budget, target_batch=batch)
    seconds = time.perf_counter() - start
    s = g.settings
    return dict(
        seconds=seconds,
        passes=s["n_backward_passes"],
        active=s["n_active_features"],
        kept=g.n_features,
        n_pos=g.n_pos,
        batch=s["batch_size"],
        peak_mb=max(_peak() - before, 0) / 2**20,
        gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0,
        top=g.logit_strings[int(g.logit_probs.argmax())],
        estimate_mb=s["memory"]["needed_bytes"] / 2**20,
    )


def circuit_tracer_model(model_path: str, transcoders: str):
    """circuit-tracer's ReplacementModel (nnsight backend) on the same weights and transcoders.

    The model is the dequantised `save_pretrained` folder `load_model` made from the GGUF;
    the transcoders are our export (circuit-tracer's layout), with TopK put back as their
    activation (its loader would read TopK layers as ReLU).
    """
    import torch
    import yaml
    from circuit_tracer import ReplacementModel
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    from wiremap.models.loading import dequantised_folder, gguf_file

    gguf = gguf_file(Path(model_path))
    folder = _for_transformers4(dequantised_folder(gguf) if gguf is not None else Path(model_path))
    cfg = yaml.safe_load((Path(transcoders) / "config.yaml").read_text())
    paths = {i: str(Path(transcoders) / f"layer_{i}.safetensors") for i in range(cfg["n_layers"])}
    cpu = torch.device("cpu")
    tset = load_transcoder_set(
        paths, "wiremap", cfg["feature_input_hook"], cfg["feature_output_hook"], device=cpu,
        lazy_encoder=False, lazy_decoder=False,
    )  # fmt: skip
    if cfg.get("activation") == "topk":
        for layer in range(cfg["n_layers"]):
            tset[layer].activation_function = TopK(int(cfg["k"]))
    return ReplacementModel.from_pretrained_and_transcoders(
        folder, tset, backend="nnsight", device=cpu, dtype=torch.float32
    )


def _for_transformers4(folder: Path) -> str:
    """`folder` as transformers 4 (circuit-tracer pins it) reads it: a linked copy whose
    tokenizer config names the fast tokenizer class instead of v5's `TokenizersBackend`."""
    import json
    import tempfile

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if cfg.get("tokenizer_class") != "TokenizersBackend":
        return str(folder)
    out = Path(tempfile.mkdtemp(prefix="wiremap-hf4-"))
    for f in folder.iterdir():
        (out / f.name).symlink_to(f)
    (out / "tokenizer_config.json").unlink()
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(out)


def run_circuit_tracer(model_path: str, transcoders: str, prompt: str, budget, batch) -> float:
    """Seconds of circuit-tracer's `attribute` with the same budget and batch size."""
    from circuit_tracer import attribute

    rm = circuit_tracer_model(model_path, transcoders)
    attribute("Hello", rm, max_feature_nodes=10, batch_size=batch)  # first-call allocations
    start = time.perf_counter()
    attribute(prompt, rm, max_feature_nodes=budget, batch_size=batch)
    return time.perf_counter() - start


def run_case(args, case: str) -> None:
    from wiremap.models.replacement import ReplacementModel

    n_tok, _, budget = case.partition("x")
    budget = None if budget == "auto" else int(budget)
    rm = ReplacementModel.from_pretrained(
        args.model, args.transcoders, device=args.device, check_model_name=False
    )
    prompt = prompt_of(rm.tokenizer, args.text, int(n_tok))
    r = run_ours(rm, prompt, budget, args.batch_size)
    line = (
        f"{r['n_pos']:>5} tokens  budget {budget or 'auto':>5}  batch {r['batch']:>3}  "
        f"{r['active']:>7} active  {r['kept']:>5} kept  {r['passes']:>4} passes  "
        f"{r['seconds']:>7.1f} s  peak +{r['peak_mb']:>6.0f} MiB (planned {r['estimate_mb']:.0f})"
        + (f"  gpu {r['gpu_mb']:.0f} MiB" if r["gpu_mb"] else "")
        + f"  top {r['top']!r}  load {os.getloadavg()[0]:.1f}"
    )
    if circuit_tracer_note() is None and budget is not None:
        try:
            ct = run_circuit_tracer(args.model, args.transcoders, prompt, budget, r["batch"])
            line += f"  | circuit-tracer {ct:.1f} s, ratio {ct / r['seconds']:.2f}x"
        except Exception as err:  # report why it could not run, keep our numbers
            line += f"  | circuit-tracer failed: {type(err).__name__}: {str(err)[:200]}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model (default: the SmolLM2 GGUF)")
    parser.add_argument("--transcoders", required=True, help="exported transcoders for it")
    parser.add_argument("--text", default="wiremap_out/prose.txt", help="prose to cut prompts from")
    parser.add_argument("--case", default=None, help="one case, e.g. 128x4000 or 1024xauto")
    parser.add_argument("--long", type=int, default=None, help="also an N-token prompt")
    parser.add_argument("--batch-size", type=int, default=None, help="default: planned")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    args.model = args.model or default_model()
    if args.case:
        run_case(args, args.case)
        return
    note = circuit_tracer_note()
    if note:
        print(note)
    cases = CASES + ([f"{args.long}xauto"] if args.long else [])
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--model", args.model]
        cmd += ["--transcoders", args.transcoders, "--text", args.text, "--device", args.device]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
