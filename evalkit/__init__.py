"""evalkit: show what trained models have learned.

Extract features from models and layers, embed them with t-SNE, UMAP and PCA, score every
embedding and raw feature set, and write one self-contained HTML report plus metrics.json.

The Python API takes what you have in memory::

    import evalkit
    feats = evalkit.extract_features(model, test_loader, layers=["penultimate"])
    result = evalkit.evaluate({"cnn": feats})      # labels come from the (x, y) batches
    result                                          # in Jupyter: summary, pictures, checks
    result.save("reports/out/mine")                 # the run folder `evalkit report` writes

- :func:`extract_features` (model, DataLoader or Dataset -> :class:`Features`),
- :func:`evaluate` (arrays -> :class:`Result`, nothing written),
- :func:`evaluate_models` (several in-memory models -> :class:`Result`),
- :func:`load_config` and :func:`run_report`: what ``evalkit report CONFIG`` runs.

The registries :data:`METRICS` and :data:`METHODS` list every score and embedding method.
Heavy libraries are imported inside the stages that need them, so ``import evalkit`` stays
instant.
"""
from evalkit.errors import EvalkitError

__version__ = "0.1.0"

__all__ = ["extract_features", "evaluate", "evaluate_models", "Features", "Result", "load_config", "run_report",
           "METRICS", "METHODS", "EvalkitError", "__version__"]

_LAZY = {
    "extract_features": "evalkit.api", "evaluate": "evalkit.api", "evaluate_models": "evalkit.api",
    "Features": "evalkit.api", "Result": "evalkit.results", "load_config": "evalkit.config",
    "run_report": "evalkit.pipeline",
}


def __getattr__(name):  # lazy re-exports keep `import evalkit` light
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("METRICS", "METHODS"):
        from evalkit import registry

        return registry.metrics() if name == "METRICS" else registry.methods()
    raise AttributeError(f"module 'evalkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
