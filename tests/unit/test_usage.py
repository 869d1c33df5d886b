"""Token usage from llama-server's answers (gateway/usage.py)."""

from __future__ import annotations

import pytest

from gateway.usage import (
    HEAD_BYTES,
    TAIL_BYTES,
    StreamTail,
    Usage,
    usage_from_json,
    usage_from_sse,
    usage_from_stream,
)

CHUNK = ('data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" you"}}],"created":1795609032,'
         '"id":"chatcmpl-b","model":"smol","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n')
TIMINGS = ('"timings":{"cache_n":30,"prompt_n":1,"prompt_ms":7.068,"prompt_per_token_ms":7.068,'
           '"prompt_per_second":141.48,"predicted_n":8,"predicted_ms":48.141,"predicted_per_token_ms":6.87,'
           '"predicted_per_second":145.40}')
# The last events of streams as llama-server sends them: with stream_options.include_usage, and without.
TAIL_WITH_USAGE = (
    CHUNK
    + 'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1795609032,"id":"chatcmpl-b",'
      '"model":"smol","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    + 'data: {"choices":[],"created":1795609032,"id":"chatcmpl-b","model":"smol","system_fingerprint":"b1-0c1e570",'
      '"object":"chat.completion.chunk","usage":{"completion_tokens":8,"prompt_tokens":31,"total_tokens":39,'
      '"prompt_tokens_details":{"cached_tokens":30}},' + TIMINGS + '}\n\n'
    + "data: [DONE]\n\n"
).encode()
TAIL_TIMINGS_ONLY = (
    CHUNK
    + 'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1795609032,"id":"chatcmpl-b",'
      '"model":"smol","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk",' + TIMINGS + '}\n\n'
    + "data: [DONE]\n\n"
).encode()



def test_usage_from_a_json_answer() -> None:
    body = ('{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"hi \\"usage\\":'
            ' {\\"prompt_tokens\\": 999}"}}],"created":1795609032,"model":"smol","object":"chat.completion",'
            '"usage":{"completion_tokens":8,"prompt_tokens":31,"total_tokens":39,'
            '"prompt_tokens_details":{"cached_tokens":30}},"id":"chatcmpl-G6",' + TIMINGS + '}').encode()
    usage = usage_from_json(body)
    assert usage == Usage(31, 8, pytest.approx(0.048141), 30)
    assert usage is not None and usage[:2] == (31, 8)


def test_usage_of_an_embedding_and_of_answers_without_usage() -> None:
    body = b'{"data":[{"embedding":[0.1,0.2],"index":0,"object":"embedding"}],"model":"smol","object":"list",' \
           b'"usage":{"prompt_tokens":3,"total_tokens":3}}'
    assert usage_from_json(body) == Usage(3, 0, 0.0)
    assert usage_from_json(b'{"object":"list","data":[{"id":"smol"}]}') is None
    assert usage_from_json(b'{"error":{"code":400,"message":"bad"}}') is None
    assert usage_from_json(b"") is None
    assert usage_from_json(b"not json at all") is None
    assert usage_from_json(b'{"usage": null}') is None


def test_usage_of_a_large_answer_is_read_from_its_tail() -> None:
    embedding = ",".join(["0.123456"] * 200_000)
    body = ('{"data":[{"embedding":[' + embedding + ']}],"model":"smol","usage":{"prompt_tokens":7,'
            '"total_tokens":7}}').encode()
    assert usage_from_json(body) == Usage(7, 0, 0.0)


def test_usage_from_a_stream_with_usage() -> None:
    assert usage_from_sse(TAIL_WITH_USAGE) == Usage(31, 8, pytest.approx(0.048141), 30)


def test_usage_from_a_stream_with_only_timings() -> None:
    # without include_usage the final chunk still has timings: prompt = evaluated + cached tokens
    assert usage_from_sse(TAIL_TIMINGS_ONLY) == Usage(31, 8, pytest.approx(0.048141), 30)


def test_usage_from_a_stream_cut_off_or_without_any() -> None:
    assert usage_from_sse(CHUNK.encode() * 3) is None
    assert usage_from_sse(TAIL_WITH_USAGE[:-14]) == Usage(31, 8, pytest.approx(0.048141), 30)  # [DONE] lost
    # the final event broke off mid-way: a whole usage object still counts, a cut one does not
    cut = TAIL_WITH_USAGE[: TAIL_WITH_USAGE.index(b'"predicted_ms"')]
    assert usage_from_sse(cut) == Usage(31, 8, 0.0, 30)
    assert usage_from_sse(TAIL_WITH_USAGE[: TAIL_WITH_USAGE.index(b'"prompt_tokens"')]) is None
    # a tail that starts in the middle of an event, even of a UTF-8 character (the gateway keeps the last bytes)
    assert usage_from_sse(TAIL_WITH_USAGE[25:]) == Usage(31, 8, pytest.approx(0.048141), 30)
    assert usage_from_sse("\u00e9".encode()[1:] + TAIL_WITH_USAGE) == Usage(31, 8, pytest.approx(0.048141), 30)


def test_usage_from_a_text_completion_stream() -> None:
    tail = ('data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"created":1795609032,'
            '"model":"smol","object":"text_completion","usage":{"completion_tokens":8,"prompt_tokens":1,'
            '"total_tokens":9,"prompt_tokens_details":{"cached_tokens":0}},"id":"cmpl-n0",' + TIMINGS + '}\n\n'
            'data: [DONE]\n\n').encode()
    assert usage_from_sse(tail) == Usage(1, 8, pytest.approx(0.048141))


def test_stream_tail_keeps_the_last_bytes() -> None:
    tail = StreamTail()
    for _ in range(100):
        tail.feed(CHUNK.encode())
    tail.feed(TAIL_WITH_USAGE)
    kept = bytes(tail)
    # the first HEAD_BYTES (an Anthropic stream's message_start), then the last TAIL_BYTES
    assert kept.startswith(CHUNK.encode()) and len(kept) == HEAD_BYTES + 2 + TAIL_BYTES
    assert TAIL_WITH_USAGE.endswith(kept[-len(TAIL_WITH_USAGE):])
    assert len(tail.buffer) <= 2 * TAIL_BYTES
    assert usage_from_sse(kept) == Usage(31, 8, pytest.approx(0.048141), 30)
    short = StreamTail()
    short.feed(b"abc")
    assert bytes(short) == b"abc"


def test_responses_and_anthropic_usage() -> None:
    responses = (b'{"id":"resp_1","object":"response","output":[],"status":"completed","usage":{"input_tokens":31,'
                 b'"input_tokens_details":{"cached_tokens":30},"output_tokens":8,"total_tokens":39}}')
    assert usage_from_json(responses) == Usage(31, 8, 0.0, 30)
    anthropic = (b'{"content":[],"id":"x","type":"message","usage":{"cache_read_input_tokens":20,"input_tokens":11,'
                 b'"output_tokens":8}}')
    assert usage_from_json(anthropic) == Usage(31, 8, 0.0, 20)
    stream = (b'event: message_start\ndata: {"message":{"usage":{"cache_read_input_tokens":20,"input_tokens":11,'
              b'"output_tokens":0}},"type":"message_start"}\n\n'
              b'event: content_block_delta\ndata: {"delta":{"text":"hi","type":"text_delta"},"index":0}\n\n'
              b'event: message_delta\ndata: {"delta":{"stop_reason":"end_turn"},"type":"message_delta",'
              b'"usage":{"output_tokens":8}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert usage_from_sse(stream) == Usage(31, 8, 0.0, 20)
    long = StreamTail()
    long.feed(stream[:stream.index(b"event: content_block_delta")])  # message_start, in the head
    for _ in range(2000):
        long.feed(b'event: content_block_delta\ndata: {"delta":{"text":"x","type":"text_delta"},"index":0}\n\n')
    long.feed(stream[stream.index(b"event: message_delta"):])
    assert usage_from_sse(bytes(long)) == Usage(31, 8, 0.0, 20)


def role_event() -> bytes:
    return b'data: {"choices":[{"delta":{"content":null,"role":"assistant"},"finish_reason":null,"index":0}]}\n\n'


def token_event(text: str = "x") -> bytes:
    return b'data: {"choices":[{"delta":{"content":"%s"},"finish_reason":null,"index":0}]}\n\n' % text.encode()


def test_cached_tokens_of_every_shape() -> None:
    openai = b'{"usage":{"completion_tokens":2,"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":7}}}'
    assert usage_from_json(openai).cached_tokens == 7  # type: ignore[union-attr]
    timings = b'{"timings":{"cache_n":5,"prompt_n":4,"predicted_n":2}}'  # no usage: llama-server's native answer
    assert usage_from_json(timings) == Usage(9, 2, 0.0, 5)
    none = b'{"usage":{"completion_tokens":2,"prompt_tokens":9}}'
    assert usage_from_json(none) == Usage(9, 2)


def test_stream_tail_counts_data_events() -> None:
    tail = StreamTail()
    tail.feed(role_event())
    tail.feed(token_event() * 3)  # several events in one read
    tail.feed(b'event: content_block_delta\ndata: {"delta":{"text":"data: x"}}\n\n')  # "data:" in a string
    assert tail.events == 5


def test_a_stream_that_ran_to_its_end_counts_its_usage_not_its_events() -> None:
    stream = role_event() + token_event() * 3 + TAIL_WITH_USAGE
    assert usage_from_stream(stream, 99) == usage_from_sse(stream)


def test_a_stream_cut_short_counts_the_tokens_relayed() -> None:
    tail = StreamTail()
    tail.feed(role_event())
    for _ in range(5):
        tail.feed(token_event())
    assert usage_from_sse(bytes(tail)) is None  # no final event: nothing said
    assert usage_from_stream(bytes(tail), tail.events) == Usage(0, 5)
    # a long one: the middle is no longer held, and every event there is a token
    for _ in range(2000):
        tail.feed(token_event())
    assert usage_from_stream(bytes(tail), tail.events) == Usage(0, 2005)
    # the gateway's own error event after the backend broke off is no token
    tail.feed(b'data: {"error":{"message":"the model backend broke off the stream","code":"backend_error"}}\n\n')
    assert usage_from_stream(bytes(tail), tail.events) == Usage(0, 2005)
    assert usage_from_stream(b"", 0) is None


def test_an_anthropic_stream_cut_short_keeps_its_prompt_from_the_head() -> None:
    start = (b'event: message_start\ndata: {"message":{"usage":{"cache_read_input_tokens":20,"input_tokens":11,'
             b'"output_tokens":0}},"type":"message_start"}\n\n'
             b'event: content_block_start\ndata: {"content_block":{"text":"","type":"text"},"index":0}\n\n')
    delta = b'event: content_block_delta\ndata: {"delta":{"text":"x","type":"text_delta"},"index":0}\n\n'
    tail = StreamTail()
    tail.feed(start)
    for _ in range(7):
        tail.feed(delta)
    assert usage_from_stream(bytes(tail), tail.events) == Usage(31, 7, 0.0, 20)


def test_a_responses_stream_cut_short() -> None:
    events = [b'event: response.created\ndata: {"type":"response.created"}\n\n',
              b'event: response.in_progress\ndata: {"type":"response.in_progress"}\n\n',
              *[b'event: response.output_text.delta\ndata: {"delta":"x","type":"response.output_text.delta"}\n\n'] * 4]
    tail = StreamTail()
    for event in events:
        tail.feed(event)
    assert usage_from_stream(bytes(tail), tail.events) == Usage(0, 4)
