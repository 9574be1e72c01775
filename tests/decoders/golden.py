"""Golden cases on disk (`cases/<codec>/<case>.{hex,txt}` + `<case>.json`) and how tests compare them."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "cases"


def load_cases(codec: str):
    """One pytest.param(payload, case) per golden case of `codec`, with the case's name as its id."""
    for meta_path in sorted((CASES / codec).glob("*.json")):
        stem = meta_path.with_suffix("")
        hex_path = stem.with_suffix(".hex")
        payload = (bytes.fromhex(hex_path.read_text().strip()) if hex_path.exists()
                   else stem.with_suffix(".txt").read_bytes())
        yield pytest.param(payload, json.loads(meta_path.read_text(encoding="utf-8")), id=stem.name)


def plain(value):
    """Datetimes as ISO strings and bytes as hex, the way the case files write them."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
