"""The model as TFLite sees it: the traced graph, op kinds, fake quantisation, the cost model."""
