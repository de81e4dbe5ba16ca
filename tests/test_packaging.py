"""The distribution installs one import package, `rectune`: the card's folders (agent/, models/,
tools/, prompts/) are its subpackages, so generic names never reach site-packages."""

from __future__ import annotations

import json
import subprocess
import sys


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_generic_top_level_names_do_not_resolve_outside_the_checkout(tmp_path):
    for name in ("tools", "models", "agent", "prompts"):
        found = _python(f"import {name}", tmp_path)
        assert found.returncode != 0 and f"No module named '{name}'" in found.stderr, (name, found.stdout, found.stderr)


def test_the_subpackages_import_under_rectune_from_any_directory(tmp_path):
    found = _python("import rectune.tools.study, rectune.models.pipeline, rectune.agent.cli; "
                    "from importlib import resources; print(resources.files('rectune.prompts').joinpath('select.md').is_file())",
                    tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "True"


def test_every_tuner_the_cli_offers_is_registered_in_a_fresh_process(tmp_path):
    # The LLM registers itself from agent/: a command that checks --tuners must have loaded it,
    # whatever else the process happened to import first.
    found = _python("from rectune.agent.compare import compare; from rectune.tools.proposers import PROPOSERS; "
                    "import json; print(json.dumps(sorted(PROPOSERS)))", tmp_path)
    assert found.returncode == 0, found.stderr
    assert {"default", "llm", "local", "random", "tpe"} <= set(json.loads(found.stdout))
