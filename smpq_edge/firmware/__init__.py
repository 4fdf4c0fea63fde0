"""The firmware stage: C sources for a board (``render``, from a ``spec`` of the .tflite, its
``kernels``, the board's ``ports`` and the ``templates``), and their self-check on QEMU or a
flashed board (``validate``)."""
