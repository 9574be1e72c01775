"""`WriteSet.liveness`: device_state's per-device first/last/count, aggregated with numpy, against a
plain-Python fold over the same stored uplinks."""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from ingest.writer import WriteSet
from iotjx.model import Uplink

DEVICE = st.sampled_from(["869975030000001", "869975030000002", "A-1", "a-1", "Z.9:x", "86997503000000"])
STORED = st.lists(st.tuples(DEVICE, st.floats(1.7e9, 1.8e9, allow_nan=False)), max_size=60)


@given(STORED, st.integers(0, 60))
def test_liveness_is_first_last_and_count_per_device_in_sorted_order(stored, split):
    ws = WriteSet()
    for device_id, at in stored[:split]:             # one by one (add_stored), the rest as a block
        ws.add_stored(Uplink(device_id=device_id, payload=b"x", transport="mqtt", received_at=at))
    block = [Uplink(device_id=d, payload=b"x", transport="mqtt", received_at=at) for d, at in stored[split:]]
    if block:
        ws.add_stored_block(block, np.array([u.received_at for u in block]), "cjt188")
    expected: dict[str, tuple[float, float, int]] = {}
    for device_id, at in stored:
        first, last, n = expected.get(device_id, (at, at, 0))
        expected[device_id] = (min(first, at), max(last, at), n + 1)
    devices, first, last, count = ws.liveness()
    assert devices == sorted(expected)
    assert [(f, la, n) for f, la, n in zip(first, last, count, strict=True)] == [expected[d] for d in devices]
