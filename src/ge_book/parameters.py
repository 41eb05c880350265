"""A notebook's declared parameters, the profiles of ``notebooks/profiles.yml`` and overrides.

Parameters are resolved in this order, later ones winning: the notebook's own parameters cell
(its values are the smoke profile, so nbval can run the source as is), the profile's values from
``notebooks/profiles.yml``, a YAML file (``-f``), then ``-p`` pairs. Every name and type is
checked against the parameters cell before anything runs.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import yaml

PROFILES = ("smoke", "default", "paper", "authors")


class RunnerError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


@dataclass
class NotebookSpec:
    """A source notebook, its declared parameters (name -> default value) and the notebooks it
    runs after when several run at once (``metadata.ge_book.after`` of the notebook: those
    whose cached training runs it reuses)."""

    name: str
    path: Path
    defaults: dict[str, Any]
    after: tuple[str, ...] = ()


def discover(notebooks_dir: Path) -> dict[str, Path]:
    """Source notebooks by name (file stem), sorted."""
    if not notebooks_dir.is_dir():
        raise RunnerError(f"notebooks folder {str(notebooks_dir)!r} does not exist")
    return {p.stem: p for p in sorted(notebooks_dir.glob("*.ipynb"))}


def declared_parameters(path: Path) -> dict[str, Any]:
    """Parameter names and default values of the cell tagged ``parameters``."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise RunnerError(f"{path.name}: expected one cell tagged 'parameters', found {len(cells)}")
    out: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign | ast.AnnAssign)):
            continue
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        if isinstance(target, ast.Name) and node.value is not None:
            try:
                out[target.id] = ast.literal_eval(node.value)
            except ValueError as exc:
                raise RunnerError(
                    f"{path.name}: parameter {target.id!r} must be a literal value"
                ) from exc
    if "profile" not in out:
        raise RunnerError(f"{path.name}: the parameters cell must declare 'profile'")
    return out


def load_spec(name: str, notebooks_dir: Path) -> NotebookSpec:
    available = discover(notebooks_dir)
    if name.endswith(".ipynb"):
        name = Path(name).stem
    if name not in available:
        known = ", ".join(available) or "none"
        raise RunnerError(f"unknown notebook {name!r}; available: {known}")
    path = available[name]
    after = nbformat.read(path, as_version=4).metadata.get("ge_book", {}).get("after", [])
    if not isinstance(after, list) or any(a not in available or a == name for a in after):
        raise RunnerError(
            f"{name}: metadata ge_book.after must list other notebooks of {str(notebooks_dir)!r}, "
            f"got {after!r}"
        )
    return NotebookSpec(name, path, declared_parameters(path), tuple(after))


def load_profiles(notebooks_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    path = notebooks_dir / "profiles.yml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise RunnerError(f"{path}: expected a mapping notebook -> profile -> parameters")
    return data


# Parameters whose value names something (a model, a data set, a device, a dtype, an
# optimizer): an empty string there is never a valid value.
NON_EMPTY = frozenset({"model", "dataset", "device", "dtype", "optimizer"})


def type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def coerce(default: Any, value: Any) -> Any:
    """``value`` as a parameter whose default is ``default`` takes it: a string that ``float()``
    parses becomes that float where the default is a float (PyYAML reads ``1e-5`` as a string:
    YAML 1.1 wants a dot, ``1.0e-5``); anything else is returned unchanged."""
    if isinstance(default, float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def compatible(default: Any, value: Any) -> bool:
    """Whether ``value`` may replace a parameter whose default is ``default``: anything where the
    default is None, None only there, an int for a float, otherwise the default's type (bools
    and numbers never mix)."""
    if default is None:
        return True
    if value is None:
        return False
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def resolve_parameters(
    spec: NotebookSpec,
    profile: str,
    profiles: dict[str, dict[str, dict[str, Any]]],
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """Merge defaults < profile < overrides, checking every name and type (:func:`coerce`, then
    :func:`compatible`; an empty string is refused for the parameters of :data:`NON_EMPTY`)."""
    if profile not in PROFILES:
        raise RunnerError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    allowed = ", ".join(sorted(spec.defaults))
    profile_values = (profiles.get(spec.name) or {}).get(profile) or {}
    merged = dict(spec.defaults)
    for source, values in (("profiles.yml", profile_values), ("overrides", overrides)):
        for key, value in values.items():
            if key not in spec.defaults:
                raise RunnerError(
                    f"{spec.name}: unknown parameter {key!r} (from {source}); allowed: {allowed}"
                )
            value = coerce(spec.defaults[key], value)
            if not compatible(spec.defaults[key], value):
                got = "null" if value is None else f"{type_name(value)} {value!r}"
                raise RunnerError(
                    f"{spec.name}: parameter {key!r} expects {type_name(spec.defaults[key])}, "
                    f"got {got} (from {source})"
                )
            if key in NON_EMPTY and isinstance(value, str) and not value.strip():
                raise RunnerError(
                    f"{spec.name}: parameter {key!r} must be a non-empty string, got {value!r} "
                    f"(from {source})"
                )
            merged[key] = value
    if overrides.get("profile", profile) != profile:
        raise RunnerError(f"{spec.name}: use --profile, not -p profile")
    merged["profile"] = profile
    return merged


def parse_overrides(pairs: list[list[str]] | None, yaml_file: str | None) -> dict[str, Any]:
    """``-f`` YAML values, then ``-p NAME VALUE`` pairs (values parsed as YAML scalars; an empty
    VALUE is the empty string, ``null`` is None)."""
    out: dict[str, Any] = {}
    if yaml_file:
        path = Path(yaml_file)
        if not path.is_file():
            raise RunnerError(f"parameters file {yaml_file!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise RunnerError(f"parameters file {yaml_file!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise RunnerError(f"parameters file {yaml_file!r} must hold a mapping name: value")
        out.update(data)
    for name, raw in pairs or []:
        if not raw.strip():
            out[name] = raw
            continue
        try:
            out[name] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[name] = raw
    return out
