"""deploy/Dockerfile and its numba warm-up.  No Docker here: the image is not built; what its build
runs is run (the warm-up, into a fresh cache), and a second process shows that the cache then serves
every kernel the gateway starts with, without compiling."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

from ._cli import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_image_user_and_install():
    steps = instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = [args for word, args in steps if word == "RUN"]
    install = next(i for i, r in enumerate(runs) if "pip install ." in r)
    warm = next(i for i, r in enumerate(runs) if "warm_numba.py" in r)
    assert install < warm                                      # warmed against the installed sources
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "NUMBA_CACHE_DIR=/var/cache/iotjx/numba" in env


def test_every_package_is_copied_and_let_through():
    """The packages pyproject installs are the ones the image copies, and the .dockerignore beside the
    Dockerfile lets each through."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied = {args.split()[0].rstrip("/") for word, args in instructions() if word == "COPY" and "--" not in args.split()[0]}
    assert packages <= copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for name in packages | {"pyproject.toml", "README.md", "deploy/warm_numba.py"}:
        assert f"!{name}/" in ignore or f"!{name}" in ignore, name


def test_kernel_modules_are_every_module_with_cached_kernels():
    sys.path.insert(0, str(DEPLOY))
    try:
        import warm_numba
    finally:
        sys.path.remove(str(DEPLOY))
    declared = set()
    for package in ("decoders", "ingest", "analytics", "api", "iotjx", "simulators"):
        for path in (ROOT / package).rglob("*.py"):
            if re.search(r"njit\([^)]*cache=True", path.read_text()):
                declared.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert set(warm_numba.KERNEL_MODULES) == declared


def test_warm_up_fills_the_cache_and_a_new_process_compiles_nothing(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("NUMBA_DISABLE_JIT", None)
    built = subprocess.run([sys.executable, str(DEPLOY / "warm_numba.py")], env=env, capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert built.returncode == 0, built.stderr
    indexes = list((tmp_path / "numba").rglob("*.nbi"))
    # every module with cached kernels has its entries (file names are <module>.<function>-<line>...)
    modules = {p.name.split(".")[0] for p in indexes}
    assert {"bcd", "cjt188_kernel", "cjt188_layout", "gb26875_kernel", "gbt43229_crc", "gbt43229_kernel",
            "parking", "rollups"} <= modules
    # A container's start: the gateway's warm-up and a rollup batch, in a new process, with numba
    # telling what it does with its cache.  Loaded, never saved (= nothing compiled).
    started = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import warm_numba; "
                               "from decoders.warmup import warm_up; warm_up(); warm_numba.warm_rollups()", str(DEPLOY)],
        env={**env, "NUMBA_DEBUG_CACHE": "1"}, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert started.returncode == 0, started.stderr
    log = started.stdout + started.stderr
    assert "[cache] data loaded from" in log
    assert "[cache] data saved to" not in log
