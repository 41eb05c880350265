import json
import os
import stat

import pytest

from ge_utils.io import atomic_open, atomic_write_json, atomic_write_text


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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_file_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "out.csv", "a,b\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.csv").stat().st_mode) == 0o666 & ~umask


def test_existing_file_keeps_its_mode(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    target.chmod(0o640)
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_content_digest_follows_the_content_not_the_path(tmp_path, monkeypatch):
    import ge_utils.io as io_mod
    from ge_utils.io import content_digest

    f = tmp_path / "data.jsonl"
    f.write_text("a\n")
    first = content_digest(f)
    f.write_text("b\n")
    assert content_digest(f) != first  # same path, same size, new content: a new digest
    f.write_text("a\n")
    assert content_digest(f) == first
    other = tmp_path / "copy.jsonl"
    other.write_text("a\n")
    assert content_digest(other) == first

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("notes")
    (folder / ".lock").write_text("x")
    digest = content_digest(folder, ["*.json"], recursive=False)
    (folder / "README.md").write_text("other notes")  # not matched: the same digest
    (folder / ".lock").write_text("y")
    assert content_digest(folder, ["*.json"], recursive=False) == digest
    (folder / "model.safetensors").write_bytes(b"w")
    assert content_digest(folder, ["*.json", "*.safetensors"], recursive=False) != digest

    def no_reading(*args, **kwargs):
        raise AssertionError("an unchanged file was hashed again")

    monkeypatch.setattr(io_mod, "open", no_reading, raising=False)
    assert content_digest(f) == first  # memoized by the file's stat


def test_a_write_removes_the_temporary_files_of_killed_writers(tmp_path):
    """A writer killed outright leaves its hidden temporary file; the next write of the same
    path removes it when its process is dead, and keeps a live writer's and another host's."""
    import subprocess
    import sys

    from ge_utils.io import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    target = tmp_path / "result.json"
    orphan = tmp_path / f".result.json.{int(dead.stdout)}@{_HOST}.k1ll3d.part"
    live = tmp_path / f".result.json.{os.getpid()}@{_HOST}.w0rk1ng.part"
    elsewhere = tmp_path / f".result.json.{int(dead.stdout)}@another.host.r3mote.part"
    other_file = tmp_path / f".result.json.old.{int(dead.stdout)}@{_HOST}.n0tm1ne.part"
    for f in (orphan, live, elsewhere, other_file):
        f.write_text("half")
    atomic_write_json(target, {"a": 1})
    assert not orphan.exists()
    assert live.exists() and elsewhere.exists() and other_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".part") == sorted(
        p.name for p in (live, elsewhere, other_file))
    with atomic_open(target) as fh:  # a write's own temporary file has the name parsed above
        fh.write("{}")
        (own,) = set(tmp_path.glob(".result.json.*.part")) - {live, elsewhere, other_file}
        assert own.name.startswith(f".result.json.{os.getpid()}@{_HOST}.")
