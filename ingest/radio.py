"""The radio_readings row of one stored uplink, from every place radio figures come from.

Precedence per figure (docs/radio.md): what the device model declares (``radio`` in its TOML: a
GB/T 26875.3 analog type, a SenML/LwM2M object 4 resource, a vendor field, with its transform), then
what the payload codec found under the common spellings (the JSON codec's ``radio``), then what the
carrier envelope carried (``u.meta["radio"]``, normalised by ``decoders.carrier``).  Every figure is
range-checked by ``decoders.radio.normalised``; no figure, no row.  ``source`` names the channel:
the carrier platform (``ctwing``/``onenet``) when the uplink came through one, else the payload codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from decoders.radio import FIGURES, declared, normalised
from iotjx.model import Uplink

from .sinks import RADIO


def _payload_radio(record: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON codec's per-object radio (already normalised), later objects winning."""
    out: dict[str, Any] = {}
    for item in record.get("records") or ():
        radio = item.get("radio") if isinstance(item, Mapping) else None
        if isinstance(radio, Mapping):
            out.update({k: v for k, v in radio.items() if v is not None})
    return out


def radio_row_of(u: Uplink, codec: str, record: Mapping[str, Any], settings: Mapping[str, Any]) -> tuple | None:
    """The radio_readings row (RADIO.all_columns) for a stored uplink and its decoded record, or None
    when neither the model's declaration, the payload nor the envelope gave a figure in range."""
    envelope = u.meta.get("radio") if u.meta else None
    spec = settings.get("radio") if settings else None
    payload = _payload_radio(record) if codec == "json" else {}
    if not (envelope or spec or payload):
        return None
    merged: dict[str, Any] = dict(envelope or {})
    merged.update(payload)
    if spec:
        merged.update(declared(codec, record, spec))
    values = normalised(merged)
    if all(values[f] is None for f in FIGURES):
        return None
    source = (u.meta.get("envelope") if u.meta else None) or codec
    return RADIO.row(u, {"source": source, **values})


__all__ = ["radio_row_of"]
