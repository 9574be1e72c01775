"""Input types that refuse, with a reason, what the database could not store or give back.

PostgreSQL text cannot hold NUL; a lone surrogate (``"\\ud800"`` in JSON) is not UTF-8; JSON's
NaN/Infinity are not JSON to jsonb; an integer past bigint or a time past year 9999 cannot be read
back.  Each is a 422 here, before anything reaches a query."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, create_model

from iotjx.db.migrations import CITIES
from iotjx.devices import (DEVICE_ID, MAX_REPORTING_INTERVAL_S, SITE_CODE, SITE_KINDS, STATUSES, bundled_models,
                           installed_at_problem)

MAX_PARAMS_BYTES = 4096
MAX_JSON_DEPTH = 8


def _text(value: str, *, newlines: bool = False) -> str:
    for ch in value:
        code = ord(ch)
        if code == 0:
            raise ValueError("NUL characters are not allowed")
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError("lone surrogate code points (e.g. \\ud800) are not text")
        if (code < 0x20 and not (newlines and ch in "\n\r\t")) or code == 0x7F:
            raise ValueError(f"control character U+{code:04X} is not allowed")
    return value


def clean_text(value: str) -> str:
    """`value` when it is storable text on one line: no NUL, control characters or lone surrogates."""
    return _text(value)


def clean_note(value: str) -> str:
    """As `clean_text`, newlines and tabs allowed."""
    return _text(value, newlines=True)


def clean_json(value: Any, depth: int = 0) -> Any:
    """`value` when jsonb can store it: finite numbers, integers within bigint, text without NUL or
    lone surrogates, nested at most MAX_JSON_DEPTH deep."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} deep")
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise ValueError("an integer out of the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and Infinity are not JSON numbers")
        return value
    if isinstance(value, list):
        return [clean_json(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v, depth + 1) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not JSON")


def _params(value: dict[str, Any]) -> dict[str, Any]:
    value = clean_json(value)
    if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_PARAMS_BYTES:
        raise ValueError(f"params are larger than {MAX_PARAMS_BYTES} bytes as JSON")
    return value


def _installed_at(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    if problem := installed_at_problem(value):
        raise ValueError(problem)
    return value


# The patterns tell the OpenAPI document (and schemathesis) what the validators refuse; the
# validators, not the patterns, make the message.
Text = Annotated[str, AfterValidator(clean_text), Field(json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f]*$"})]
Note = Annotated[str, AfterValidator(clean_note), Field(
    max_length=2000, description="at most 2000 characters; newlines and tabs allowed",
    json_schema_extra={"pattern": r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"})]
JsonParams = Annotated[dict[str, Any], AfterValidator(_params)]
InstalledAt = Annotated[datetime | None, AfterValidator(_installed_at),
                        Field(None, description="2000-01-01 … tomorrow; without a zone: UTC")]
_CODES = tuple(code for code, _, _ in CITIES)


def _known_city(code: int) -> int:
    if code not in _CODES:
        raise ValueError(f"{code} is not a city of Jiangxi (division codes {_CODES[0]}..{_CODES[-1]})")
    return code


# An int (a query string's "360600" is one) that is a city's division code.
CityCode = Annotated[int, AfterValidator(_known_city), Field(json_schema_extra={"enum": list(_CODES)})]
_CityText = Literal[tuple(sorted({str(code) for code, _, _ in CITIES} | {zh for _, zh, _ in CITIES}
                                 | {en for _, _, en in CITIES}))]  # type: ignore[valid-type]
# A city in a JSON body: the division code (360600, as everywhere in the API's answers) or, as in a CSV
# line, the code as text or the city's name (鹰潭, Yingtan).  Given to the registry as text.
CityName = Annotated[CityCode | _CityText, AfterValidator(str)]  # type: ignore[valid-type]

_NAMES = {code: (zh, en) for code, zh, en in CITIES}


def city_names(code: int | None) -> dict[str, str | None]:
    """`{"city_name_zh", "city_name_en"}` of a division code (None for None, 0 or an unknown code): the one
    spelling of a city's names in every answer, beside `city`, the code."""
    zh, en = _NAMES.get(code or 0, (None, None))
    return {"city": code or None, "city_name_zh": zh, "city_name_en": en}


def device_in_model() -> type[BaseModel]:
    """The registration body, its enums taken from the model catalogue, the cities and the site kinds,
    so that a request the schema admits is one the registry accepts."""
    models = tuple(sorted(m["model"] for m in bundled_models()))
    return create_model(
        "DeviceIn",
        device_id=(str, Field(pattern=DEVICE_ID.pattern, examples=["869975034012345"],
                              description="IMEI or carrier platform id")),
        model=(Literal[models], Field(examples=["cjt188-nb-water-std"])),  # type: ignore[valid-type]
        network=(Literal["nbiot", "cat1", ""], Field("", description="empty: the model's network")),
        city=(CityName | Literal[""], Field("", examples=["360600", "Yingtan", "鹰潭"],  # type: ignore[valid-type]
                                            description="division code or name")),
        site_kind=(Literal[(*SITE_KINDS, "")], Field("", examples=["residential"])),  # type: ignore[valid-type]
        site_name=(Annotated[str, AfterValidator(clean_text)],
                   Field("", max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$", examples=["月湖区 龙岗小区"],
                         description="with city and site_kind: resolved through the catalogue's names and aliases")),
        site_id=(str | None, Field(None, pattern=SITE_CODE.pattern, max_length=64, examples=["JX-SS-0004"],
                                   description="a catalogue site's code (instead of city, site_kind, site_name)")),
        installed_at=(InstalledAt, None),
        reporting_interval_s=(int | None, Field(None, gt=0, le=MAX_REPORTING_INTERVAL_S,
                                                description="overrides the model's interval (at most 366 days)")),
        status=(Literal[STATUSES], "active"),  # type: ignore[valid-type]
    )


class RegistrationResult(BaseModel):
    created: int
    updated: int
    sites: int
    catalogue_sites: int = Field(description="distinct catalogue sites the devices now attach to")
    unverified_sites: int = Field(description="distinct unverified (free-text) sites the devices now attach to")


__all__ = ["CityCode", "CityName", "city_names", "InstalledAt", "JsonParams", "Note", "RegistrationResult", "Text", "clean_json",
           "clean_note", "clean_text", "device_in_model"]
