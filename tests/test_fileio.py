"""Atomic writes: complete or absent, with the permissions the user's umask gives any new file."""

import os

import pytest

from smpq_edge.common.fileio import write_bytes, write_json


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_bytes(tmp_path / "model.tflite", b"\x00" * 8)
        write_json(tmp_path / "sub" / "build.json", {"a": 1})
    finally:
        os.umask(previous)
    for path in (tmp_path / "model.tflite", tmp_path / "sub" / "build.json"):
        assert path.stat().st_mode & 0o777 == mode, path
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["build.json", "model.tflite", "sub"], "no temporary left"

