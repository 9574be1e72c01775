"""deploy/Dockerfile and its numba warm-up.  No Docker here: the image is not built; what its build
does is done — the package built as a wheel and installed apart from the tree, the warm-up run against
it into a fresh cache — and then a new process shows that the cache serves every kernel the gateway
starts with, without compiling, and the installed package migrates an empty database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import psycopg
import pytest

from iotjx.db.migrations import MIGRATIONS

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


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package as the image has it: a wheel built from this tree (`pip install .` does the same),
    installed into a directory of its own; processes started with it on PYTHONPATH, outside the tree,
    import it and not the editable checkout."""
    wheels = tmp_path_factory.mktemp("wheel")
    site = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(wheels.glob("iotjx-*.whl"))
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return site


def run_installed(site: Path, cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(site), **env}
    environ.pop("NUMBA_DISABLE_JIT", None)
    return subprocess.run([sys.executable, *args], env=environ, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_installed_package_runs_db_upgrade_on_an_empty_database(installed, pg_admin_url, tmp_path):
    """What the image's `db-upgrade` service runs, from the installed package (the migrations and the
    device-model catalogue are package data), on a database nobody has touched."""
    name = f"iotjx_deploy_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name)
        where = run_installed(installed, tmp_path, ["-c", "import iotjx, decoders; print(iotjx.__file__); print(decoders.__file__)"])
        assert all(line.startswith(str(installed)) for line in where.stdout.split()), where.stdout
        upgraded = run_installed(installed, tmp_path, ["-m", "iotjx.cli", "db", "upgrade"], IOTJX_DATABASE_URL=url)
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        with psycopg.connect(url) as conn:
            version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
            models = conn.execute("SELECT count(*) FROM device_models").fetchone()[0]
        catalogue = sum(len(tomllib.loads(path.read_text()).get("models", {}))
                        for path in (ROOT / "decoders" / "models").glob("*.toml"))
        assert version == max(m.version for m in MIGRATIONS)
        assert models == catalogue
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_warm_up_fills_the_cache_and_a_new_process_compiles_nothing(installed, tmp_path):
    """The Dockerfile's warm-up against the installed package, then a container's start: the
    gateway's warm-up and a rollup batch in a new process, with numba telling what it does with its
    cache: loaded, never saved (= nothing compiled)."""
    cache = tmp_path / "numba"
    built = run_installed(installed, tmp_path, [str(DEPLOY / "warm_numba.py")], NUMBA_CACHE_DIR=str(cache))
    assert built.returncode == 0, built.stderr
    indexes = list(cache.rglob("*.nbi"))
    # every module with cached kernels has its entries (file names are <module>.<function>-<line>...)
    modules = {p.name.split(".")[0] for p in indexes}
    assert {"bcd", "cjt188_kernel", "cjt188_layout", "gb26875_kernel", "gbt43229_crc", "gbt43229_kernel",
            "parking", "rollups"} <= modules
    started = run_installed(
        installed, tmp_path,
        ["-c", "import sys; sys.path.insert(0, sys.argv[1]); import warm_numba; "
               "from decoders.warmup import warm_up; warm_up(); warm_numba.warm_rollups()", str(DEPLOY)],
        NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1")
    assert started.returncode == 0, started.stderr
    log = started.stdout + started.stderr
    assert "[cache] data loaded from" in log
    assert "[cache] data saved to" not in log
