"""smpq_edge: Shapley-value mixed-precision quantisation of neural networks for TensorFlow Lite
Micro boards. ``smpq_edge.build(model, data, board=..., out=...)`` runs the whole pipeline; the
stages one by one are in ``smpq_edge.api``, which also documents the options."""


def __getattr__(name: str):
    # Lazily, so that `python -m smpq_edge` with a typo fails in a second, before torch is imported.
    if name == "build":
        from smpq_edge.api import build

        return build
    raise AttributeError(f"module 'smpq_edge' has no attribute {name!r}")
