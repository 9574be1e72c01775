"""The iotjx commands that deploy/ names (compose services, systemd units), and a check that each
exists in the CLI with the options used: `iotjx <command …> --help` must list every option."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def iotjx_invocations(argv: list[str]) -> list[list[str]]:
    """Every `iotjx …` command in an argv: the argv itself, or each one inside an `sh -c` script
    (plain, after `exec`, or in a `$(…)` substitution; up to the next `;`, `&`, `|`, `)` or redirection)."""
    if argv and argv[0] in ("sh", "/bin/sh", "bash") and len(argv) >= 3:
        out = []
        for match in re.finditer(r"(?<![\w/.$-])(?:/[\w/.-]*/)?iotjx\s+([^;&|)>]*)", argv[-1]):
            words = shlex.split(match.group(1))
            if words and words[-1].isdigit():                 # the fd of a redirection (`2>&1`)
                words = words[:-1]
            out.append(words)
        return out
    if argv and Path(argv[0]).name == "iotjx":
        return [argv[1:]]
    return []


def split_command(args: list[str]):
    """(sub-command path, option names, the click command) of an iotjx invocation: the leading words
    that name commands, then the `--options` given."""
    import typer.main

    from iotjx.cli import app

    command = typer.main.get_command(app)
    path: list[str] = []
    for word in args:
        commands = getattr(command, "commands", None)
        if commands is None or word not in commands:
            break
        path.append(word)
        command = commands[word]
    options = [w.split("=", 1)[0] for w in args[len(path):] if w.startswith("--")]
    return path, options, command


def check_invocation(args: list[str]) -> list[str]:
    """Problems with one invocation (empty: `iotjx <command> --help` answers, and the command takes
    every option it is given)."""
    from iotjx.cli import app

    path, options, command = split_command(args)
    if not path:
        return [f"iotjx {' '.join(args)}: no such command"]
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    if result.exit_code != 0:
        return [f"iotjx {' '.join(path)} --help exited {result.exit_code}: {result.output[-300:]}"]
    if hasattr(command, "commands") and not command.invoke_without_command:
        return [f"iotjx {' '.join(path)} is a group of commands, not one"]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    return [f"iotjx {' '.join(path)} has no option {o}" for o in options if o not in known]
