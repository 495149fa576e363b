"""A request's event stream stops when its consumer is cancelled (its client went away), even when
the cancellation lands in the very tick its next event arrives: asyncio.wait_for, used while a
--request-timeout was set, returned that event on Python 3.11 and swallowed the cancellation, so the
generation ran on to max_tokens (the no-timeout case guards the other branch). And the deadline holds
while events are waiting: a consumer behind on a backlog gets what arrived in time, then its 504; an
answer that finished in time goes out whole."""

from __future__ import annotations

import asyncio

import pytest

from adapterhub.serve.backend import _events
from adapterhub.serve.engine import Finished, Token
from adapterhub.serve.errors import ApiError


def _unscored(index: int, event):
    return event


async def _cancelled_as_an_event_arrives(deadline_in: float | None) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    deadline = None if deadline_in is None else loop.time() + deadline_in
    events = _events(queue, 1, deadline, deadline_in, _unscored)
    consumer = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)  # the consumer waits on the queue
    queue.put_nowait((0, Token(0, "a")))  # the event arrives ...
    consumer.cancel()  # ... in the tick the client goes away
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert queue.qsize() == 1, "the event a cancelled consumer did not take stays in the queue"


@pytest.mark.parametrize("deadline_in", [30.0, None], ids=["request-timeout", "no-timeout"])
def test_a_consumer_cancelled_as_its_event_arrives_stops(deadline_in):
    asyncio.run(_cancelled_as_an_event_arrives(deadline_in))


async def _past_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    events = _events(queue, 2, loop.time() + 0.05, 0.05, _unscored)
    queue.put_nowait((0, Token(0, "a")))
    assert await anext(events) == (0, Token(0, "a"))
    with pytest.raises(ApiError, match="--request-timeout") as raised:
        await anext(events)
    assert raised.value.status == 504


def test_no_event_before_the_deadline_is_a_504():
    asyncio.run(_past_the_deadline())


async def _behind_at_the_deadline(finished: bool) -> list:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    events = _events(queue, 1, loop.time() - 0.001, 1.0, _unscored)  # the deadline has passed
    backlog = [(0, Token(0, "a")), (0, Token(0, "b"))] + ([(0, Finished(0, "length", 2))] if finished else [])
    for item in backlog:
        queue.put_nowait(item)  # what arrived before the deadline; getting it would not wait
    received = []
    async for item in events:
        received.append(item)
    return received


def test_a_consumer_behind_at_the_deadline_gets_what_arrived_then_504():
    with pytest.raises(ApiError, match="--request-timeout") as raised:
        asyncio.run(_behind_at_the_deadline(finished=False))
    assert raised.value.status == 504


def test_an_answer_that_finished_in_time_goes_out_whole_to_a_late_reader():
    received = asyncio.run(_behind_at_the_deadline(finished=True))
    assert [event for _, event in received] == [Token(0, "a"), Token(0, "b"), Finished(0, "length", 2)]
