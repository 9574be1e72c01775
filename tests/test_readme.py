"""The README stays true: its first commands, and every setting in its table."""

from __future__ import annotations

import re
from pathlib import Path

from iotjx.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_first_commands_are_demo_and_tests():
    block = re.search(r"```\n(.*?)```", README, re.S).group(1).splitlines()
    assert block[0].startswith("./run.sh demo") and block[1].startswith("./run.sh test")


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"`IOTJX_{name.upper()}`" in README, name


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "./run.sh test" in ci
