import json

import pytest

from ge_utils.io import atomic_open, atomic_write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write('{"half": ')
        raise RuntimeError("killed half-way")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_open_refuses_read_mode(tmp_path):
    with pytest.raises(ValueError, match="writing"), atomic_open(tmp_path / "x", "r"):
        pass
