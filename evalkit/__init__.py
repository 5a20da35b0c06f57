"""evalkit: show what trained models have learned.

Extract features from models and layers, embed them with t-SNE, UMAP and PCA, score every
embedding and raw feature set, and write one self-contained HTML report plus metrics.json.

The stages are plain functions in their own modules (``evalkit.config``, ``evalkit.data``,
``evalkit.extract``, ``evalkit.neighbors``, ``evalkit.embed``, ``evalkit.score``,
``evalkit.report``, ``evalkit.check``); heavy libraries are imported inside them, so
``import evalkit`` stays instant.
"""
from evalkit.errors import EvalkitError

__version__ = "0.1.0"

__all__ = ["EvalkitError", "__version__", "run_report", "load_config"]


def __getattr__(name):  # lazy re-exports keep `import evalkit` light
    if name == "run_report":
        from evalkit.pipeline import run_report

        return run_report
    if name == "load_config":
        from evalkit.config import load_config

        return load_config
    raise AttributeError(f"module 'evalkit' has no attribute {name!r}")
