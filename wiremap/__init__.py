"""wiremap: train transcoders on language models and trace circuits.

    from wiremap import ReplacementModel, write_graph_json
    from wiremap.attribute.attribute import attribute

    model = ReplacementModel.from_pretrained("gpt2", "runs/gpt2-plt/transcoders")
    graph = attribute("The capital of France is", model)
    write_graph_json(graph, "graphs/france.json")

(`attribute` itself lives in `wiremap.attribute.attribute`: the name `wiremap.attribute` is
the subpackage.) Public names are imported lazily so that `import wiremap` stays light
(no Lightning, wandb or transformers until they are needed).
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "WiremapError": "wiremap.errors",
    "load_model": "wiremap.models.loading",
    "get_adapter": "wiremap.models.adapters",
    "capture": "wiremap.models.hooks",
    "replace_mlp_out": "wiremap.models.hooks",
    "build_transcoder": "wiremap.models.transcoders",
    "save_transcoders": "wiremap.models.io",
    "load_transcoders": "wiremap.models.io",
    "ReplacementModel": "wiremap.models.replacement",
    "ActivationCache": "wiremap.train.cache",
    "CacheConfig": "wiremap.train.cache",
    "build_cache": "wiremap.train.cache",
    "Graph": "wiremap.attribute.graph",
    "prune_graph": "wiremap.attribute.prune",
    "graph_scores": "wiremap.attribute.prune",
    "write_graph_json": "wiremap.attribute.export",
    "summarize_paths": "wiremap.attribute.export",
    "feature_intervention": "wiremap.attribute.interventions",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wiremap' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
