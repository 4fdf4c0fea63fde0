"""Example models, loadable by name (``--model resnet8``); installed as ``smpq_edge.examples``."""
