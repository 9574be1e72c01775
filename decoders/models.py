"""The device-model catalogue: which codec and vendor settings each device model uses, read from
``decoders/models/*.toml`` so that adding a model is a data change.

Each TOML file holds tables ``[models."<model name>"]`` with the keys of `DeviceModel` (``name`` is the
table key).  Loading validates codec names against the codec registry without importing any codec
module, so reading the catalogue compiles no numba kernel.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .radio import spec_problem
from .registry import codec_names

MODELS_DIR = Path(__file__).with_name("models")
FAMILIES = ("water", "fire", "traffic", "parking")
NETWORKS = ("nbiot", "cat1")
ENVELOPE_CODECS = ("ctwing", "onenet")
_KEYS = {"vendor", "family", "codec", "settings", "inner_codec", "inner_settings", "name_map",
         "report_interval_s", "network", "description", "dedup_window_s", "max_payload_bytes", "radio"}
# A model's largest frame when its table does not say: CoAP's documented single-request limit
# (IOTJX_COAP_MAX_PAYLOAD).  Models whose protocol bounds the frame say so (CJ/T 188, GB/T 26875.3,
# the parking sensor); the gateway rejects a larger uplink as `too_large`.
DEFAULT_MAX_PAYLOAD_BYTES = 16384
MAX_PAYLOAD_CEILING = 65536          # the default IOTJX_UPLINK_MAX_BYTES: no model may ask for more


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """A device model: its codec, the vendor settings for it, and what the fleet expects of it."""

    name: str
    vendor: str
    family: str                                    # water, fire, traffic, parking
    codec: str                                     # a name in decoders.codec_names()
    network: str                                   # nbiot, cat1
    report_interval_s: int                         # expected seconds between uplinks (online checks)
    settings: Mapping[str, Any] = field(default_factory=dict)       # passed to decode(codec, …)
    inner_codec: str | None = None                 # envelopes: the codec of the wrapped payload
    inner_settings: Mapping[str, Any] = field(default_factory=dict)
    name_map: Mapping[str, str] = field(default_factory=dict)       # SenML/JSON name -> reading name
    description: str = ""
    # Seconds within which identical bytes from one device are one uplink sent twice; None: the
    # gateway's default.  Short for frames with neither time nor counter (a quiet lane repeats itself).
    dedup_window_s: float | None = None
    # The largest uplink (for an envelope model: the device's frame inside the envelope) in bytes;
    # larger is kept as a `too_large` reject without its full bytes.
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    # Where the model's radio figures are in its decoded records (`decoders.radio`): figure -> locator.
    radio: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def codec_settings(self) -> dict[str, Any]:
        """The settings for ``decode(self.codec, …)``: vendor settings plus the name map and the radio
        spec (the gateway reads ``radio`` beside the record; decoders ignore it)."""
        merged = dict(self.settings)
        if self.name_map:
            merged["name_map"] = dict(self.name_map)
        if self.radio:
            merged["radio"] = {k: dict(v) for k, v in self.radio.items()}
        return merged

    def inner_codec_settings(self) -> dict[str, Any]:
        """The settings for the inner codec of an envelope model: its inner settings plus the radio spec."""
        merged = dict(self.inner_settings)
        if self.radio:
            merged["radio"] = {k: dict(v) for k, v in self.radio.items()}
        return merged


def _fail(path: Path, model: str, problem: str) -> ValueError:
    return ValueError(f"{path.name}: model {model!r}: {problem}")


def _model(path: Path, name: str, table: Any, known: set[str]) -> DeviceModel:
    if not isinstance(table, dict):
        raise _fail(path, name, "must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise _fail(path, name, f"unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    for key in ("vendor", "family", "codec", "network", "report_interval_s"):
        if key not in table:
            raise _fail(path, name, f"missing {key!r}")
    codec = table["codec"]
    if codec not in known:
        raise _fail(path, name, f"unknown codec {codec!r}; known codecs: {', '.join(sorted(known))}")
    if table["family"] not in FAMILIES:
        raise _fail(path, name, f"family {table['family']!r} is not one of {FAMILIES}")
    if table["network"] not in NETWORKS:
        raise _fail(path, name, f"network {table['network']!r} is not one of {NETWORKS}")
    interval = table["report_interval_s"]
    if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
        raise _fail(path, name, f"report_interval_s must be a positive integer, not {interval!r}")
    window = table.get("dedup_window_s")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, float)) or window < 0):
        raise _fail(path, name, f"dedup_window_s must be a number of seconds >= 0, not {window!r}")
    limit = table.get("max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAYLOAD_CEILING:
        raise _fail(path, name, f"max_payload_bytes must be an integer from 1 to {MAX_PAYLOAD_CEILING}, not {limit!r}")
    inner = table.get("inner_codec")
    if inner is not None:
        if codec not in ENVELOPE_CODECS:
            raise _fail(path, name, f"inner_codec is only for envelope codecs {ENVELOPE_CODECS}")
        if inner not in known or inner in ENVELOPE_CODECS:
            raise _fail(path, name, f"unknown or envelope inner_codec {inner!r}")
    for key in ("settings", "inner_settings", "name_map"):
        if not isinstance(table.get(key, {}), dict):
            raise _fail(path, name, f"{key} must be a table")
    radio = table.get("radio", {})
    problem = spec_problem(radio)
    if problem is not None:
        raise _fail(path, name, problem)
    name_map = table.get("name_map", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in name_map.items()):
        raise _fail(path, name, "name_map maps strings to strings")
    return DeviceModel(
        name=name, vendor=str(table["vendor"]), family=table["family"], codec=codec,
        network=table["network"], report_interval_s=interval,
        settings=MappingProxyType(dict(table.get("settings", {}))), inner_codec=inner,
        inner_settings=MappingProxyType(dict(table.get("inner_settings", {}))),
        name_map=MappingProxyType(dict(name_map)), description=str(table.get("description", "")),
        dedup_window_s=None if window is None else float(window), max_payload_bytes=limit,
        radio=MappingProxyType({k: MappingProxyType(dict(v)) for k, v in radio.items()}),
    )


def load_models(paths: Iterable[str | Path] | None = None) -> dict[str, DeviceModel]:
    """Every device model in these TOML files (default: ``decoders/models/*.toml``), by model name.

    ValueError naming the file and the model for anything invalid, including a name defined twice."""
    files = sorted(MODELS_DIR.glob("*.toml")) if paths is None else [Path(p) for p in paths]
    known = set(codec_names())
    models: dict[str, DeviceModel] = {}
    origin: dict[str, Path] = {}
    for path in files:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path.name}: not valid TOML: {exc}") from None
        tables = document.get("models", {})
        if not isinstance(tables, dict):
            raise ValueError(f"{path.name}: 'models' must be a table of models")
        for name, table in tables.items():
            if name in models:
                raise _fail(path, name, f"already defined in {origin[name].name}")
            models[name] = _model(path, name, table, known)
            origin[name] = path
    return models


_CATALOGUE: dict[str, DeviceModel] | None = None


def get_model(name: str) -> DeviceModel:
    """The model `name` from the bundled catalogue (read once); KeyError naming the known ones."""
    global _CATALOGUE
    if _CATALOGUE is None:
        _CATALOGUE = load_models()
    try:
        return _CATALOGUE[name]
    except KeyError:
        raise KeyError(f"no device model {name!r}; known: {', '.join(sorted(_CATALOGUE))}") from None


__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "DeviceModel", "get_model", "load_models"]
