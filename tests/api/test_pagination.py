"""Cursor pagination's cursors: what one encodes comes back, and anything else is a clear 422."""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime

import pytest
from fastapi import HTTPException
from hypothesis import given
from hypothesis import strategies as st

from api.pagination import PageParams, decode_cursor, encode_cursor

# (text of at most 24 characters: four keys of 4-byte characters fit MAX_CURSOR, as the lists' keys do)
values = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.text(max_size=24).filter(lambda s: "\x00" not in s),
                   st.floats(allow_nan=False, allow_infinity=False),
                   st.datetimes(timezones=st.just(UTC)), st.dates())


@given(st.lists(values, min_size=1, max_size=4))
def test_a_cursor_round_trips(key):
    assert decode_cursor(encode_cursor(key), len(key)) == tuple(key)


@pytest.mark.parametrize("cursor", ["", "not base64 !", base64.urlsafe_b64encode(b"[1,2]").decode(),
                                    base64.urlsafe_b64encode(b'{"a":1}').decode(), "x" * 600,
                                    base64.urlsafe_b64encode(b'[{"t":"2026-01-01T00:00:00"}]').decode(),
                                    base64.urlsafe_b64encode(b"[true]").decode(),
                                    base64.urlsafe_b64encode(b"[99999999999999999999999]").decode()])
def test_anything_else_is_refused_with_a_reason(cursor):
    with pytest.raises(HTTPException) as refused:
        decode_cursor(cursor, 1)
    assert refused.value.status_code == 422 and "cursor" in refused.value.detail


def test_a_page_has_a_next_cursor_only_when_a_row_is_left():
    page = PageParams(None, 2)
    rows = [(datetime(2026, 1, d, tzinfo=UTC), d) for d in (3, 2, 1)]
    first = page.of(rows, key=lambda r: r)
    assert first.items == rows[:2] and decode_cursor(first.next_cursor, 2) == rows[1]
    assert page.of(rows[:2], key=lambda r: r).next_cursor is None
    assert page.of([], key=lambda r: r).next_cursor is None
    assert PageParams(first.next_cursor, 2).after(2) == rows[1] and page.after(2) is None
    assert decode_cursor(encode_cursor([date(2026, 1, 2)]), 1) == (date(2026, 1, 2),)
