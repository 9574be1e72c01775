"""The pipeline's batch queue: FIFO across threads, bounded, taken by size, age or a pause in the
input, closed cleanly."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ingest.uplink_queue import Closed, UplinkQueue


def test_many_producers_one_taker_every_item_once_in_each_producers_order():
    q: UplinkQueue[tuple[int, int]] = UplinkQueue(1000)
    producers, per = 4, 20_000

    def produce(p: int) -> None:
        for i in range(per):
            q.put((p, i))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    got, sizes = [], []
    while len(got) < producers * per:
        batch, done = q.take(5000, 0.05)
        assert not done
        assert len(q._items) <= 1000
        sizes.append(len(batch))
        got.extend(batch)
    for t in threads:
        t.join()
    assert len(got) == producers * per and len(set(got)) == producers * per
    for p in range(producers):
        assert [i for pp, i in got if pp == p] == list(range(per))     # each producer's order kept
    assert max(sizes) <= 1000          # never more than the bound was held, so never more in a batch


def test_put_blocks_while_full_and_resumes_when_a_take_makes_room():
    q: UplinkQueue[int] = UplinkQueue(3)
    for i in range(3):
        q.put(i)
    with pytest.raises(TimeoutError):
        q.put(99, timeout=0.05)
    done = threading.Event()
    t = threading.Thread(target=lambda: (q.put(3), done.set()))
    t.start()
    assert not done.wait(0.1)                      # still blocked: the queue is full
    assert q.take(2, 0.0) == ([0, 1], False)
    assert done.wait(5)
    t.join()
    assert q.take(10, 0.0) == ([2, 3], False)


def test_take_waits_for_the_first_item_then_for_the_rest_of_the_batch_until_its_age():
    q: UplinkQueue[int] = UplinkQueue(100)
    threading.Timer(0.1, q.put, args=(1,)).start()
    threading.Timer(0.2, q.put, args=(2,)).start()
    assert q.take(2, 30) == ([1, 2], False)        # waited for the first, then for the second
    q.put(3)
    assert q.take(50, 0.05) == ([3], False)        # the age ends a batch that is not full


def test_a_full_batch_is_taken_without_waiting_for_the_age():
    q: UplinkQueue[int] = UplinkQueue(100)
    for i in range(10):
        q.put(i)
    batch, _ = q.take(10, 3600)                    # an hour's age: returns because 10 are there
    assert batch == list(range(10))


def test_a_pause_in_the_input_ends_the_batch_without_waiting_for_the_age():
    """Devices that wait for their answer stop sending: with `idle_s` the batch is taken once the
    input pauses, not after an hour's age; while the input keeps coming it is not cut."""
    q: UplinkQueue[int] = UplinkQueue(100_000)
    burst = threading.Thread(target=lambda: [q.put(i) for i in range(5000)])
    burst.start()
    batch, done = q.take(100_000, 3600, idle_s=2.0)
    burst.join()
    assert (batch, done) == (list(range(5000)), False)
    q.put(5000)
    assert q.take(100_000, 3600, idle_s=0.01) == ([5000], False)


def test_a_pause_ends_the_batch_only_once_the_consumer_is_idle():
    """While `idle_ok` says the consumer is busy (a batch still being written), a pause does not
    cut the batch; it is asked again until it says idle."""
    q: UplinkQueue[int] = UplinkQueue(100)
    answers = iter([False, False, False])
    asked = []

    def idle_ok() -> bool:
        asked.append(1)
        return next(answers, True)

    q.put(1)
    q.put(2)
    assert q.take(100, 3600, idle_s=0.01, idle_ok=idle_ok) == ([1, 2], False)
    assert len(asked) == 4


def test_put_many_keeps_order_and_waits_only_for_some_room():
    q: UplinkQueue[int] = UplinkQueue(4)
    q.put_many([1, 2, 3])
    q.put_many([4, 5, 6])              # room for one: the group goes in whole (bounded overshoot)
    assert q.qsize() == 6 and not q.wait_room(0)
    blocked = threading.Thread(target=q.put_many, args=([7, 8],))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()          # full: waits for a take
    assert q.take(6, 0) == ([1, 2, 3, 4, 5, 6], False)
    blocked.join(5)
    assert q.take(10, 0) == ([7, 8], False)


def test_wait_room_says_whether_a_put_would_block():
    q: UplinkQueue[int] = UplinkQueue(2)
    assert q.wait_room(0)
    q.put(1)
    q.put(2)
    assert not q.wait_room(0) and not q.wait_room(0.01)
    threading.Timer(0.05, q.take, args=(1, 0)).start()
    assert q.wait_room(30)                          # woken by the take that made room
    q.put(3)
    q.close()
    assert q.wait_room(0)                           # closed: the put raises instead of blocking


def test_close_hands_out_what_is_left_then_says_done_and_refuses_puts():
    q: UplinkQueue[int] = UplinkQueue(100)
    for i in range(7):
        q.put(i)
    q.close()
    with pytest.raises(Closed):
        q.put(8)
    assert q.take(5, 10) == ([0, 1, 2, 3, 4], False)
    assert q.take(5, 10) == ([5, 6], True)
    assert q.take(5, 10) == ([], True)


def test_close_wakes_a_waiting_taker_and_a_blocked_putter():
    q: UplinkQueue[int] = UplinkQueue(1)
    result = {}
    taker = threading.Thread(target=lambda: result.setdefault("take", q.take(5, 10)))
    taker.start()
    time.sleep(0.05)
    q.close()
    taker.join(5)
    assert result["take"] == ([], True)
    q2: UplinkQueue[int] = UplinkQueue(1)
    q2.put(0)
    errors = []

    def blocked() -> None:
        try:
            q2.put(1)
        except Closed as exc:
            errors.append(exc)

    putter = threading.Thread(target=blocked)
    putter.start()
    time.sleep(0.05)
    q2.close()
    putter.join(5)
    assert len(errors) == 1


# ------------------------------------------------------------------------------ the byte bound
Item = tuple[int, int]          # (id, weight): the weight stands for an uplink's payload length


def _weight(item: Item) -> int:
    return item[1]


@hsettings(max_examples=300, deadline=None)
@given(maxsize=st.integers(1, 6), max_bytes=st.integers(1, 600),
       ops=st.lists(st.one_of(st.tuples(st.just("put"), st.lists(st.integers(0, 400), min_size=1, max_size=4)),
                              st.tuples(st.just("take"), st.integers(1, 8))), max_size=40))
def test_bounded_by_items_and_bytes_as_a_plain_model_says(maxsize, max_bytes, ops):
    """Against a plain list: a put waits (here: times out at once) exactly while the queue is at
    either bound, otherwise its whole group goes in; a take hands out the oldest and frees their
    weight; what is held never passes the byte bound by more than the last put's weight."""
    q: UplinkQueue[Item] = UplinkQueue(maxsize, max_bytes, _weight)
    model: list[Item] = []
    ids = iter(range(10**6))
    for op, arg in ops:
        full = len(model) >= maxsize or sum(w for _, w in model) >= max_bytes
        if op == "put":
            group = [(next(ids), w) for w in arg]
            if full:
                with pytest.raises(TimeoutError):
                    q.put_many(group, timeout=0)
            else:
                q.put_many(group, timeout=0)
                model.extend(group)
                assert sum(w for _, w in model) < max_bytes + sum(arg)
        elif model:                                    # a take on an empty queue would wait for a put
            assert q.take(arg, 0) == (model[:arg], False)
            del model[:arg]
        held = sum(w for _, w in model)
        assert (q.qsize(), q.qbytes()) == (len(model), held)
        assert q.wait_room(0) == (len(model) < maxsize and held < max_bytes)


def test_a_putter_held_by_the_byte_bound_goes_on_when_a_take_frees_bytes():
    q: UplinkQueue[Item] = UplinkQueue(1000, 100, _weight)
    q.put((0, 60))
    q.put((1, 50))                                  # 110 bytes: at the byte bound, far from 1000 items
    assert not q.wait_room(0)
    putter = threading.Thread(target=q.put, args=((2, 10),))
    putter.start()
    putter.join(0.2)
    assert putter.is_alive()                        # held back by bytes alone
    assert q.take(1, 0) == ([(0, 60)], False)       # 50 bytes left: room
    putter.join(5)
    assert not putter.is_alive() and q.qbytes() == 60


def test_one_uplink_heavier_than_the_whole_byte_bound_still_passes():
    """Never a deadlock: an item above `max_bytes` goes into a queue below its bound, and a putter
    waiting with one is let in by the take that empties the queue."""
    q: UplinkQueue[Item] = UplinkQueue(10, 100, _weight)
    q.put((0, 1000), timeout=0)                     # empty queue: in at once, alone
    assert q.qbytes() == 1000 and not q.wait_room(0)
    heavy = threading.Thread(target=q.put, args=((1, 5000),))
    heavy.start()
    heavy.join(0.2)
    assert heavy.is_alive()
    assert q.take(10, 0) == ([(0, 1000)], False)
    heavy.join(5)
    assert not heavy.is_alive()
    assert q.take(10, 0) == ([(1, 5000)], False) and q.qbytes() == 0
    q.put((2, 10))
    q.put((3, 5000), timeout=0)                     # below the bound with 10 bytes held: in, whole
    assert q.qbytes() == 5010


def test_weights_given_by_the_putter_are_counted_and_checked():
    q: UplinkQueue[bytes] = UplinkQueue(10, 1000, len)
    q.put_many([b"a" * 300, b"b" * 200], weights=[300, 200])
    q.put_many([b"c" * 10])                         # weighed by the queue
    assert q.qbytes() == 510
    with pytest.raises(ValueError, match="2 weights for 1 items"):
        q.put_many([b"d"], weights=[1, 1])
    assert q.take(2, 0)[0] == [b"a" * 300, b"b" * 200] and q.qbytes() == 10
    unbounded: UplinkQueue[bytes] = UplinkQueue(10)
    unbounded.put_many([b"x" * 10**6], weights=[10**6])
    assert unbounded.qbytes() == 0 and unbounded.wait_room(0)     # no byte bound: not weighed
