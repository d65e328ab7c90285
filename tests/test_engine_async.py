"""AsyncLLMEngine: the background step loop, streaming, client disconnects, queue bounds."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from peftserve.engine.engine import AsyncLLMEngine, QueueFull, UnknownAdapter
from tests.engine_helpers import generate_all, greedy, make_engine, random_prompts
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m"), "llama")


async def _collect(engine: AsyncLLMEngine, rid: str, prompt, params):
    ids, text, outs = [], "", []
    async for out in engine.generate(rid, prompt, params):
        ids += out.token_ids
        text += out.text
        outs.append(out)
    return ids, text, outs


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def _ran_to_first_await() -> None:
    """Let the tasks created just before run up to their first await: asyncio runs ready
    callbacks in order, so one yield suffices (generate submits its request before it awaits
    anything), however loaded the machine is."""
    await asyncio.sleep(0)


def test_concurrent_streams_match_the_sync_engine(model_dir):
    prompts = random_prompts((4, 12, 20, 28, 7), seed=12)
    want = generate_all(make_engine(model_dir), prompts, greedy(12))
    engine = AsyncLLMEngine(make_engine(model_dir))
    engine.start()
    try:

        async def main():
            return await asyncio.gather(*(_collect(engine, str(i), p, greedy(12)) for i, p in enumerate(prompts)))

        got = asyncio.run(main())
    finally:
        engine.shutdown()
    for i, (ids, text, outs) in enumerate(got):
        assert ids == want[str(i)].token_ids and text == want[str(i)].text
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert engine.stats.kv_blocks_used == 0


def test_disconnect_aborts_and_frees_blocks(model_dir):
    engine = AsyncLLMEngine(make_engine(model_dir))
    engine.start()
    try:

        async def main():
            gen = engine.generate("r", [5] * 30, greedy(200))
            async for _ in gen:
                break  # the client goes away after the first token
            await gen.aclose()

        asyncio.run(main())
        _wait_until(lambda: not engine.engine.has_unfinished_requests())
        assert engine.stats.kv_blocks_used == 0
    finally:
        engine.shutdown()


def test_cancelled_consumer_aborts(model_dir):
    engine = AsyncLLMEngine(make_engine(model_dir))
    engine.start()
    try:

        async def main():
            task = asyncio.create_task(_collect(engine, "r", [5] * 30, greedy(200)))
            while not engine.stats.num_running:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        _wait_until(lambda: not engine.engine.has_unfinished_requests())
        assert engine.stats.kv_blocks_used == 0
    finally:
        engine.shutdown()


def test_errors_come_before_the_first_output(model_dir):
    engine = AsyncLLMEngine(make_engine(model_dir, max_waiting=1))  # not started: nothing moves

    async def main():
        first = engine.generate("a", [5, 6], greedy(4))
        pending = asyncio.create_task(first.__anext__())
        await _ran_to_first_await()  # "a" is submitted (it waits in the queue)
        with pytest.raises(QueueFull):
            await engine.generate("b", [5, 6], greedy(4)).__anext__()
        with pytest.raises(UnknownAdapter):
            await engine.generate("c", [5, 6], greedy(4), lora_id="nope").__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate("a", [5, 6], greedy(4)).__anext__()
        engine.start()
        out = await pending
        assert out.request_id == "a"
        rest = [o async for o in first]
        assert rest[-1].finished

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_shutdown_ends_open_requests(model_dir):
    engine = AsyncLLMEngine(make_engine(model_dir))

    async def main():
        gen = engine.generate("r", [5] * 10, greedy(8))
        task = asyncio.create_task(gen.__anext__())
        await _ran_to_first_await()
        engine.shutdown()  # never started: the request is still waiting
        out = await task
        assert out.finished and out.finish_reason == "abort"

    asyncio.run(main())
    assert engine.stats.kv_blocks_used == 0 and not engine.engine.has_unfinished_requests()


def test_detokenization_runs_on_the_output_thread_only(model_dir):
    """Text, stop strings and logprob texts are made off the engine thread and off the event
    loop, and the outputs equal the synchronous engine's (which detokenizes inline)."""
    prompts = random_prompts((6, 13, 21, 9), seed=14)
    full = generate_all(make_engine(model_dir), prompts, greedy(16))
    stops = [full[str(i)].text[5:7] for i in range(len(prompts))]
    params = [greedy(16, stop=[s], logprobs=2) if i % 2 else greedy(16, logprobs=1) for i, s in enumerate(stops)]
    want = generate_all(make_engine(model_dir), prompts, params)
    sync = make_engine(model_dir)
    threads: set[str] = set()
    decode = sync.tokenizer.decode

    def recording_decode(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return decode(*args, **kwargs)

    sync.tokenizer.decode = recording_decode
    engine = AsyncLLMEngine(sync)
    engine.start()
    try:

        async def main():
            runs = (_collect(engine, str(i), p, params[i]) for i, p in enumerate(prompts))
            return await asyncio.gather(*runs)

        got = asyncio.run(main())
        _wait_until(lambda: not sync.has_unfinished_requests())  # stopped requests leave the engine
    finally:
        engine.shutdown()
    assert threads == {"peftserve-output"}
    for i, (ids, text, outs) in enumerate(got):
        res = want[str(i)]
        assert (ids, text) == (res.token_ids, res.text)
        assert outs[-1].finish_reason == res.last.finish_reason
        assert outs[-1].completion_tokens == len(ids)
        lps = [lp for o in outs for lp in o.logprobs]
        want_lps = [lp for o in res.outputs for lp in o.logprobs]
        assert [(lp.token, list(lp.top)) for lp in lps] == [(lp.token, list(lp.top)) for lp in want_lps]
        assert [lp.logprob for lp in lps] == pytest.approx([lp.logprob for lp in want_lps], abs=1e-5)
    assert any(o[2][-1].finish_reason == "stop" for o in got)
    assert engine.stats.kv_blocks_used == 0
