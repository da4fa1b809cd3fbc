"""The top of the package is the API: lazy names, the graph function, deprecations, no surprises."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

import wiremap
from wiremap.errors import WiremapError

PROMPT = "The cat sees the moon."
HEAVY = ("lightning", "wandb", "transformers", "torch")


def test_import_wiremap_stays_light():
    code = (
        "import sys, wiremap; wiremap.__version__; dir(wiremap); "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_listed():
    for name in wiremap.__all__:
        assert getattr(wiremap, name) is not None, name
    assert {"ReplacementModel", "Graph", "attribute_graph", "fit", "serve"} <= set(dir(wiremap))
    for name in ("ActivationCache", "build_cache", "load_transcoders", "save_transcoders"):
        assert name in wiremap.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wiremap.nope  # noqa: B018


def test_graph_function_name_does_not_collide_with_the_subpackage():
    import wiremap.attribution.attribute as module

    assert wiremap.attribute_graph is module.attribute
    assert wiremap.attribution.__name__ == "wiremap.attribution"  # the subpackage keeps its name


OLD_PATHS = (
    "import warnings; warnings.simplefilter('always'); "
    "import wiremap.attribution.prune as new, wiremap.attribution.subgraph as new_sub; "
    "from wiremap.attribute.prune import prune_graph; "
    "import wiremap.attribute.viewer.subgraph as old_sub; "
    "from wiremap.attribute.attribute import attribute; "
    "from wiremap.models.linearise import linearise, Linearised; "
    "from wiremap.models.frozen import freeze, FrozenModel; "
    "import wiremap; "
    "assert prune_graph is new.prune_graph and old_sub is new_sub; "
    "assert attribute is wiremap.attribute_graph; "
    "assert linearise is freeze and Linearised is FrozenModel; print('ok')"
)


def test_old_import_paths_still_work_with_a_deprecation_warning():
    out = subprocess.run(
        [sys.executable, "-c", OLD_PATHS], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "ok"
    assert "wiremap.attribute was renamed wiremap.attribution" in out.stderr
    assert "wiremap.models.linearise is renamed wiremap.models.frozen" in out.stderr
    with pytest.raises(subprocess.CalledProcessError):  # a name that never existed stays missing
        subprocess.run(
            [sys.executable, "-c", "import wiremap.attribute.nope"],
            capture_output=True,
            check=True,
        )


def test_linearised_is_a_deprecated_name_of_frozen(tiny_model_dir):
    rm = make_rm(tiny_model_dir)
    ids = rm.tokenizer("a b c", return_tensors="pt").input_ids
    with pytest.warns(DeprecationWarning, match="renamed ReplacementModel.frozen"):
        context = rm.linearised(ids)
    with context as lin:
        assert type(lin).__name__ == "FrozenModel"


@pytest.mark.parametrize(
    "name,module",
    [
        ("capture", "wiremap.models.hooks"),
        ("replace_mlp_out", "wiremap.models.hooks"),
        ("get_adapter", "wiremap.models.adapters"),
    ],
)
def test_low_level_hooks_warn_but_still_work(name, module):
    from importlib import import_module

    with pytest.warns(DeprecationWarning, match=f"{module} import {name}"):
        value = getattr(wiremap, name)
    assert value is getattr(import_module(module), name)
    assert name not in wiremap.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wiremap.ReplacementModel  # noqa: B018 (the public names do not warn)


def make_rm(tiny_model_dir):
    model, tokenizer = wiremap.load_model(str(tiny_model_dir("llama", n_layers=2)))
    tc = wiremap.build_transcoder("plt", 2, 32, 32, activation="relu")
    return wiremap.ReplacementModel(model, tokenizer, tc)


def test_attribute_graph_prints_nothing_unless_asked(tiny_model_dir, capfd):
    rm = make_rm(tiny_model_dir)
    capfd.readouterr()
    wiremap.attribute_graph(PROMPT, rm, max_feature_nodes=4)
    assert capfd.readouterr() == ("", "")
    wiremap.attribute_graph(PROMPT, rm, max_feature_nodes=4, verbose=True)
    assert "active features" in capfd.readouterr().err


def test_attribute_graph_puts_the_callers_model_back(tiny_model_dir):
    rm = make_rm(tiny_model_dir)
    before = {name: t.clone() for name, t in rm.state_dict().items()}
    params = list(rm.parameters())
    graph = wiremap.attribute_graph(PROMPT, rm, max_feature_nodes=4, dtype=torch.float64)
    assert graph.settings["dtype"] == "float64"  # it ran in the dtype asked for
    assert list(rm.parameters()) == params
    for name, t in rm.state_dict().items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    with pytest.raises(WiremapError, match="would round"):
        wiremap.attribute_graph(PROMPT, rm, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in rm.parameters())


def test_serve_in_the_background(tmp_path):
    (tmp_path / "g.json").write_text("{}")
    server = wiremap.serve(tmp_path, port=0, block=False, allow_hosts=["mybox.lan"])
    try:
        host, port = server.server_address[:2]
        with urllib.request.urlopen(f"http://{host}:{port}/api/list", timeout=10) as r:
            assert r.status == 200
            assert isinstance(json.loads(r.read()), (list, dict))
        for name, status in [("mybox.lan", 200), ("other.lan", 403)]:
            req = urllib.request.Request(f"http://{host}:{port}/api/list", headers={"Host": name})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert r.status == status
            except urllib.error.HTTPError as err:
                assert err.code == status
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(WiremapError, match="not a folder"):
        wiremap.serve(Path(tmp_path) / "missing", block=False)
