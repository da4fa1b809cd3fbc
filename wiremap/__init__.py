"""wiremap: train transcoders on language models and trace circuits.

    import wiremap

    run = wiremap.fit("organism", max_steps=200)             # train; -> run.export, run.metrics
    model = wiremap.ReplacementModel.from_pretrained("wiremap/data/organism", run.export)
    graph = wiremap.attribute_graph("Fact: the capital of the state containing Dallas is", model)
    wiremap.write_graph_json(graph, "graphs/dallas.json")
    wiremap.serve("graphs/")                                  # the local viewer
    wiremap.show(graph)                                       # inline in Jupyter, no server

The graph-making function is `wiremap.attribute_graph` (`attribute` in
`wiremap.attribution.attribute`). The subpackage is `wiremap.attribution`, as in
circuit-tracer; until 0.1 it was `wiremap.attribute`, which still imports for this version
(each `wiremap.attribute.<module>` is the same module object, with a DeprecationWarning).
While that alias exists the name `wiremap.attribute` belongs to it, so the function keeps the
name `attribute_graph`.

Public names are imported lazily, so `import wiremap` stays light (no torch, Lightning,
wandb or transformers until a name that needs them is used). The low-level hooks
(`capture`, `replace_mlp_out`, `get_adapter`) live in `wiremap.models.hooks` and
`wiremap.models.adapters`; reaching them from `wiremap` still works in this version, with a
DeprecationWarning.
"""

from importlib import import_module

from wiremap.compat import moved_names

__version__ = "0.1.0"

# public name -> module that defines it (same name there)
_LAZY = {
    "WiremapError": "wiremap.errors",
    # models: language models, transcoders, the replacement model
    "load_model": "wiremap.models.loading",
    "build_transcoder": "wiremap.models.transcoders",
    "save_transcoders": "wiremap.models.formats",
    "load_transcoders": "wiremap.models.formats",
    "ReplacementModel": "wiremap.models.replacement",
    # training: the activation cache and fit
    "ActivationCache": "wiremap.cache",
    "CacheConfig": "wiremap.cache",
    "build_cache": "wiremap.cache",
    "fit": "wiremap.train.fit",
    "FitResult": "wiremap.train.fit",
    # attribution: graphs, targets, pruning, export, interventions, the viewer
    "Graph": "wiremap.attribution.graph",
    "logit_difference": "wiremap.attribution.targets",
    "top_tokens": "wiremap.attribution.targets",
    "prune_graph": "wiremap.attribution.prune",
    "graph_scores": "wiremap.attribution.prune",
    "write_graph_json": "wiremap.attribution.export",
    "summarize_paths": "wiremap.attribution.export",
    "feature_intervention": "wiremap.attribution.interventions",
    "scale_features": "wiremap.attribution.interventions",
    "generate_with_interventions": "wiremap.attribution.interventions",
    "serve": "wiremap.attribution.viewer",
    "show": "wiremap.attribution.inline",
    "GraphView": "wiremap.attribution.inline",
}
# public name -> (module, name there), where the two differ
_RENAMED = {
    "attribute_graph": ("wiremap.attribution.attribute", "attribute"),
}
# reachable from `wiremap` for one more version only
_DEPRECATED = {
    "capture": "wiremap.models.hooks",
    "replace_mlp_out": "wiremap.models.hooks",
    "get_adapter": "wiremap.models.adapters",
}


_deprecated_getattr, _ = moved_names(__name__, _DEPRECATED)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(import_module(module), attr)
    return _deprecated_getattr(name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_RENAMED])


__all__ = ["__version__", *_LAZY, *_RENAMED]
