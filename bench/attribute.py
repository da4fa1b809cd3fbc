"""Attribution speed and memory on random models; under load, against circuit-tracer.

    python bench/attribute.py                 # all cases, each in a fresh process
    python bench/attribute.py --case uncapped # one case
    python bench/attribute.py --threads 1     # one intra-op thread (a loaded machine)
    python bench/attribute.py --load 1        # idle vs 1 busy process, wiremap vs circuit-tracer
    python bench/attribute.py --load 2 --size large --repeats 3
    python bench/attribute.py --load 0 --size large --rounds 3 --ct-python PY  # interleaved

Model: tiny Llama config, 8 layers, d_model 256 (random weights); transcoders: PLT,
F = 4096 per layer, TopK k = 32 (random). Cases: a 32-token prompt uncapped and with
max_feature_nodes=2000, and a 1,024-token prompt with a feature budget.
Memory is the process's peak resident set size (`resource.getrusage(...).ru_maxrss`),
reported as the peak during attribution minus the resident size before it; every case
runs in its own process so peaks do not carry over. The load average is printed because
the machine is shared. With `--load`, `--rounds K` alternates K worker processes of each
tool (wiremap, circuit-tracer, wiremap, ...) and pools their timed calls, so a change in
the machine's load during the run hits both tools alike; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

CASES = {
    "uncapped": dict(n_tokens=32, budget=None, target_batch=256),
    "budget2000": dict(n_tokens=32, budget=2000, target_batch=256),
    "long": dict(n_tokens=1024, budget=256, target_batch=64),
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

    from wiremap.attribution.attribute import attribute

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
        prompt,
        rm,
        max_feature_nodes=spec["budget"],
        target_batch=spec["target_batch"],
        verbose=False,
    )
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    s = graph.settings
    print(
        f"{name:>10}: {graph.n_pos} tokens, budget={spec['budget']}, batch={spec['target_batch']}, "
        f"{s['n_active_features']} active features, {graph.n_features} feature nodes, "
        f"{s['n_backward_passes']} backward passes, {seconds:.2f} s, "
        f"peak RSS +{max(peak - before, 0):.0f} MiB (baseline {before:.0f} MiB), "
        f"threads={torch.get_num_threads()}, load={os.getloadavg()[0]:.1f}"
    )


# -- under load: wiremap and circuit-tracer, idle and beside N busy processes ------------
SIZES = {
    # the case of issue 16: 4 layers, random JumpReLU PLTs, ~3,800 active features, 12 tokens
    "tiny": dict(n_layers=4, d_model=64, d_transcoder=512, log_threshold=-1.6, n_tokens=12),
    "large": dict(n_layers=8, d_model=256, d_transcoder=4096, log_threshold=-1.0, n_tokens=32),
}
BURN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass\n"
REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT = 1800  # seconds for one tool's warm-up and timed calls


def _load_setup(root: Path, size: str) -> Path:
    """Model, JumpReLU transcoders (circuit-tracer's layout) and prompt under root/size."""
    import torch

    from wiremap.models.formats import save_transcoders
    from wiremap.models.loading import load_model
    from wiremap.models.tiny import build_tiny_model, sample_corpus
    from wiremap.models.transcoders import build_transcoder

    spec, out = SIZES[size], root / size
    if (out / "prompt.txt").exists():
        return out
    n_layers, d_model = spec["n_layers"], spec["d_model"]
    build_tiny_model("llama", out / "model", n_layers=n_layers, d_model=d_model)
    _, tokenizer = load_model(str(out / "model"))
    torch.manual_seed(0)
    tc = build_transcoder("plt", n_layers, d_model, spec["d_transcoder"], activation="jumprelu")
    with torch.no_grad():
        tc.activation.log_threshold.fill_(spec["log_threshold"])
    save_transcoders(tc, out / "transcoders")
    text = " ".join(sample_corpus(50, seed=1))
    ids = tokenizer(text, add_special_tokens=False).input_ids[: spec["n_tokens"] - 1]
    (out / "prompt.txt").write_text(tokenizer.decode(ids))
    return out


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    fn()  # warm-up: allocator and first-call costs
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def worker_ours(folder: Path, repeats: int) -> dict:
    from wiremap.attribution.attribute import attribute
    from wiremap.models.replacement import ReplacementModel

    model, tcs = str(folder / "model"), str(folder / "transcoders")
    rm = ReplacementModel.from_pretrained(model, tcs, check_model_name=False)
    prompt = (folder / "prompt.txt").read_text()
    times, g = _timed(lambda: attribute(prompt, rm, verbose=False), repeats)
    s = g.settings
    return dict(times=times, features=s["n_active_features"], batch=s["batch_size"],
                threads=s["threads"])  # fmt: skip


def worker_ct(folder: Path, repeats: int, batch: int) -> dict:
    import torch
    from attribute_real import circuit_tracer_model
    from circuit_tracer import attribute

    rm = circuit_tracer_model(str(folder / "model"), str(folder / "transcoders"))
    prompt = (folder / "prompt.txt").read_text()
    times, g = _timed(lambda: attribute(prompt, rm, batch_size=batch, verbose=False), repeats)
    return dict(times=times, features=len(g.active_features), threads=torch.get_num_threads())


def _worker(python: str, kind: str, folder: Path, repeats: int, batch: int = 0) -> dict:
    """Run one worker in a fresh process of `python`; its result, or the error it printed."""
    cmd = [python, __file__, "--worker", kind, "--root", str(folder), "--repeats", str(repeats)]
    cmd += ["--batch", str(batch)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return dict(error=f"no result within {WORKER_TIMEOUT} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return dict(error=(done.stderr.strip().splitlines() or ["no output"])[-1][:160])
    return json.loads(lines[-1])


@contextmanager
def busy_processes(n: int, seconds: float):
    """n single-threaded busy loops that stop by themselves after `seconds` (or on exit)."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN, str(seconds)]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)  # let them start spinning
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


CT_VENVS = tuple(p for p in os.environ.get("WIREMAP_CT_PYTHON", "").split(os.pathsep) if p)
"""Where to look for circuit-tracer besides this interpreter: `WIREMAP_CT_PYTHON` (interpreters
of its own environment, see bench/attribute_real.py: it pins transformers <= 4.57.3 and
nnsight 0.6)."""
CT_CHECK = "import circuit_tracer.replacement_model.replacement_model_nnsight"


def ct_python(given: str | None) -> str | None:
    """An interpreter whose circuit-tracer imports its nnsight backend: --ct-python or found."""
    candidates = [given] if given else [sys.executable, *CT_VENVS]
    for python in candidates:
        if python and Path(python).exists():
            check = subprocess.run([python, "-c", CT_CHECK], capture_output=True)
            if check.returncode == 0:
                return python
    return None


def run_load(args) -> None:
    root = Path(args.root or tempfile.mkdtemp(prefix="wiremap-bench-"))
    folder = _load_setup(root, args.size)
    ct = ct_python(args.ct_python)
    print(f"circuit-tracer: {ct or 'not found (give --ct-python PY)'}")
    rows = []
    for n in sorted({0, args.load}):
        with busy_processes(n, args.burn_seconds):
            load = os.getloadavg()[0]
            ours, theirs = {}, {}
            for _ in range(args.rounds):
                _pool(ours, _worker(sys.executable, "ours", folder, args.repeats))
                if ct:
                    batch = ours.get("batch", 512)
                    _pool(theirs, _worker(ct, "ct", folder, args.repeats, batch))
        rows.append((n, load, ours, theirs))
    _print_table(args.size, rows)


def _pool(into: dict, result: dict) -> None:
    """Add one worker's result to the pooled one: timed calls appended, the rest kept."""
    times = into.get("times", []) + result.get("times", [])
    into.update(result)
    if times:
        into["times"] = times
        into.pop("error", None)


def _median(r: dict) -> float | None:
    return statistics.median(r["times"]) if "times" in r else None


def _print_table(size: str, rows) -> None:
    spec = SIZES[size]
    print(f"\n{size}: {spec['n_layers']}-layer Llama d={spec['d_model']}, JumpReLU PLT "
          f"F={spec['d_transcoder']}, {spec['n_tokens']} tokens; {os.cpu_count()} CPUs; "
          "median of the timed calls")  # fmt: skip
    print(f"{'busy procs':>10} {'load 1m':>8} {'wiremap s':>10} {'thr':>4} {'features':>8} "
          f"{'c-t s':>8} {'thr':>4} {'features':>8} {'c-t/wiremap':>12}")  # fmt: skip
    for n, load, ours, theirs in rows:
        a, b = _median(ours), _median(theirs)
        ratio = f"{b / a:.1f}x" if a and b else "-"
        print(f"{n:>10} {load:>8.2f} {_s(a):>10} {ours.get('threads', '-'):>4} "
              f"{ours.get('features', '-'):>8} {_s(b):>8} {theirs.get('threads', '-'):>4} "
              f"{theirs.get('features', '-'):>8} {ratio:>12}")  # fmt: skip
        for who, r in (("wiremap", ours), ("circuit-tracer", theirs)):
            if "error" in r:
                print(f"{'':>10} {who} failed: {r['error']}")
    if len(rows) == 2:
        (_, _, o0, t0), (_, _, o1, t1) = rows
        for who, idle, busy in (("wiremap", o0, o1), ("circuit-tracer", t0, t1)):
            if _median(idle) and _median(busy):
                print(f"{who}: loaded / idle = {_median(busy) / _median(idle):.2f}x")


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=list(CASES), help="run one case in this process")
    parser.add_argument("--root", default=None, help="folder for the model (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--load", type=int, default=None, help="N busy processes: idle vs loaded")
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="model for --load")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per worker (--load)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="worker processes per tool, alternated (--load)"
    )
    parser.add_argument(
        "--burn-seconds", type=float, default=900, help="busy processes stop after this (s)"
    )
    parser.add_argument("--ct-python", default=None, help="interpreter with circuit-tracer")
    parser.add_argument("--worker", choices=["ours", "ct"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, run = Path(args.root), worker_ours if args.worker == "ours" else worker_ct
        extra = () if args.worker == "ours" else (args.batch,)
        print(json.dumps(run(folder, args.repeats, *extra)))
        return
    if args.load is not None:
        run_load(args)
        return
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
