"""gateway.admission: backend slots, the FIFO queue, weights, leavers and timeouts."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Admission, Admissions, QueueFull, QueueTimeout


def test_slots_are_granted_in_order_and_passed_on() -> None:
    async def scenario() -> None:
        gate = Admission(capacity=1, timeout=5)
        await gate.acquire()
        order: list[str] = []

        async def wait(name: str) -> None:
            await gate.acquire()
            order.append(name)

        first = asyncio.create_task(wait("first"))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(wait("second"))
        await asyncio.sleep(0.01)
        assert gate.depth == 2 and gate.saturated
        gate.release()
        await asyncio.wait_for(first, 1)
        gate.release()
        await asyncio.wait_for(second, 1)
        assert order == ["first", "second"] and gate.active == 1

    asyncio.run(scenario())


def test_a_full_queue_and_a_long_wait_are_refused() -> None:
    async def scenario() -> None:
        gate = Admission(capacity=1, max_queue=1, timeout=0.05)
        await gate.acquire()
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await gate.acquire()
        with pytest.raises(QueueTimeout):
            await waiting
        assert gate.depth == 0 and gate.active == 1

    asyncio.run(scenario())


def test_a_waiter_that_leaves_is_removed_at_once() -> None:
    async def scenario() -> None:
        gate = Admission(capacity=1, timeout=5)
        await gate.acquire()
        leaver = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.01)
        leaver.cancel()
        await asyncio.sleep(0.01)
        assert gate.depth == 0
        gate.release()
        assert gate.active == 0

    asyncio.run(scenario())


def test_admission_weighs_a_request_by_its_slots() -> None:
    async def scenario() -> None:
        gate = Admission(capacity=4, timeout=5)
        assert await gate.acquire(3) == 0.0
        heavy = asyncio.create_task(gate.acquire(2))  # needs 2, only 1 free: waits
        await asyncio.sleep(0.01)
        light = asyncio.create_task(gate.acquire(1))  # would fit, but must not jump the queue
        await asyncio.sleep(0.01)
        assert not heavy.done() and not light.done() and gate.depth == 2
        gate.release(3)
        await asyncio.wait_for(asyncio.gather(heavy, light), 1)
        assert gate.active == 3 and gate.depth == 0
        assert not gate.saturated
        await gate.acquire(1)
        assert gate.saturated

    asyncio.run(scenario())


def test_a_heavy_waiter_that_leaves_lets_the_next_one_in() -> None:
    async def scenario() -> None:
        gate = Admission(capacity=2, timeout=5)
        await gate.acquire(1)
        heavy = asyncio.create_task(gate.acquire(2))
        await asyncio.sleep(0.01)
        light = asyncio.create_task(gate.acquire(1))
        await asyncio.sleep(0.01)
        heavy.cancel()
        await asyncio.wait_for(light, 1)
        assert gate.active == 2 and gate.depth == 0

    asyncio.run(scenario())


def test_each_model_has_its_own_slots_and_queue() -> None:
    async def scenario() -> None:
        gates = Admissions(capacity=1, max_queue=1, timeout=5)
        assert gates.of("a") is gates.of("a") and gates.of("a") is not gates.of("b")
        await gates.of("a").acquire()
        # a's only slot is held: b still has its own
        assert await asyncio.wait_for(gates.of("b").acquire(), 1) == 0.0
        waiting = asyncio.create_task(gates.of("a").acquire())
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):  # a's queue (of 1) is full; b's is not touched
            await gates.of("a").acquire()
        assert (gates.active, gates.depth, gates.saturated) == (2, 1, True)
        gates.of("a").release()
        await asyncio.wait_for(waiting, 1)
        assert gates.of(None) is gates.default and gates.default.active == 0

    asyncio.run(scenario())
