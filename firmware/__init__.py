"""Firmware templates (``common/`` and ``ports/<name>/``); installed as ``smpq_edge.firmware_templates``."""
