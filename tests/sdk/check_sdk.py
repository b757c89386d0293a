"""Checks that the official `anthropic` Python SDK (2.x) works unmodified against the
callcoach LLM emulator.

Run with ANTHROPIC_BASE_URL pointing at the emulator and ANTHROPIC_API_KEY set to the key
it requires. Exits non-zero (with the failing assertion) on any mismatch.
"""

import json
import sys
import time
import uuid

import anthropic

MODEL = "claude-sonnet-5-5"
TRANSCRIPT = "\n".join(
    [
        "Rep: What does your current process look like?",
        "Prospect: Mostly spreadsheets, but the price of change worries me.",
        "Rep: We support 3 CRMs out of the box.",
    ]
    * 120
)
SYSTEM = [
    # A fresh prefix per run, so a reused emulator starts with a cold cache.
    {"type": "text", "text": f"Run {uuid.uuid4()}. " + "You are a sales coach. " * 40},
    {
        "type": "text",
        "text": f"<transcript>\n{TRANSCRIPT}\n</transcript>",
        "cache_control": {"type": "ephemeral"},
    },
]
MESSAGES = [{"role": "user", "content": "Analyse the transcript for the `discovery` dimension."}]
COACHING_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "strengths": {"type": "array", "items": {"type": "string"}},
        "improvements": {"type": "array", "items": {"type": "string"}},
        "examples": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
    },
    "required": ["score", "strengths", "improvements", "examples", "summary"],
    "additionalProperties": False,
}
OTHER_SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["pass", "fail"]},
        "confidence": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "escalate": {"type": "boolean"},
    },
    "required": ["verdict", "confidence", "tags", "escalate"],
    "additionalProperties": False,
}


def check_create(client):
    config = {"effort": "medium", "format": {"type": "json_schema", "schema": COACHING_SCHEMA}}
    first = client.messages.create(
        model=MODEL, max_tokens=4096, system=SYSTEM, messages=MESSAGES, output_config=config
    )
    assert first.type == "message" and first.role == "assistant", first
    assert first.content[0].type == "text", first.content
    answer = json.loads(first.content[0].text)
    assert 0 <= answer["score"] <= 100 and isinstance(answer["strengths"], list), answer
    usage = first.usage
    assert usage.cache_creation_input_tokens > 0 and usage.cache_read_input_tokens == 0, usage
    assert usage.cache_creation.ephemeral_5m_input_tokens == usage.cache_creation_input_tokens
    assert usage.service_tier == "standard", usage
    second = client.messages.create(
        model=MODEL, max_tokens=4096, system=SYSTEM, messages=MESSAGES, output_config=config
    )
    assert second.usage.cache_read_input_tokens == usage.cache_creation_input_tokens, second.usage
    assert second.usage.cache_creation_input_tokens == 0, second.usage

    other = client.messages.create(
        model=MODEL,
        max_tokens=4096,
        messages=MESSAGES,
        output_config={"format": {"type": "json_schema", "schema": OTHER_SCHEMA}},
    )
    value = json.loads(other.content[0].text)
    assert value["verdict"] in ("pass", "fail") and 1 <= value["confidence"] <= 5, value
    assert len(value["tags"]) >= 2 and isinstance(value["escalate"], bool), value

    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert raw.headers.get("anthropic-ratelimit-requests-limit"), dict(raw.headers)
    assert raw.headers.get("request-id", "").startswith("req_"), dict(raw.headers)
    return usage


def check_errors(client):
    try:
        # SDK 2.x has no `temperature` argument any more; send it raw.
        client.messages.create(
            model=MODEL, max_tokens=64, messages=MESSAGES, extra_body={"temperature": 0.2}
        )
    except anthropic.BadRequestError as e:
        assert "temperature: Extra inputs are not permitted" in str(e), e
    else:
        raise AssertionError("temperature must be refused under anthropic-version 2026-10-21")
    try:
        client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=8, messages=MESSAGES)
    except anthropic.NotFoundError as e:
        assert "model: claude-sonnet-4-5-20250929" in str(e), e
    else:
        raise AssertionError("a retired model must be 404")
    bad_key = anthropic.Anthropic(api_key="wrong-key", max_retries=0)
    try:
        bad_key.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
    except anthropic.AuthenticationError:
        pass
    else:
        raise AssertionError("a wrong key must be 401")


def check_count_tokens(client, usage):
    counted = client.messages.count_tokens(
        model=MODEL,
        system=SYSTEM,
        messages=MESSAGES,
        output_config={"effort": "high"},
        thinking={"type": "adaptive"},
    )
    total = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    assert counted.input_tokens == total, (counted, usage)


def check_batches(client):
    requests = [
        {
            "custom_id": f"call-{i}",
            "params": {
                "model": MODEL,
                "max_tokens": 2048,
                "system": SYSTEM,
                "messages": MESSAGES,
                "output_config": {"format": {"type": "json_schema", "schema": COACHING_SCHEMA}},
            },
        }
        for i in range(3)
    ]
    batch = client.messages.batches.create(requests=requests)
    assert batch.id.startswith("msgbatch_") and batch.type == "message_batch", batch
    assert batch.processing_status == "in_progress", batch
    deadline = time.time() + 30
    while batch.processing_status != "ended":
        assert time.time() < deadline, f"batch did not end: {batch}"
        time.sleep(0.1)
        batch = client.messages.batches.retrieve(batch.id)
    assert batch.request_counts.succeeded == 3, batch.request_counts
    assert batch.results_url and batch.ended_at and batch.expires_at > batch.created_at, batch
    results = list(client.messages.batches.results(batch.id))
    assert sorted(r.custom_id for r in results) == ["call-0", "call-1", "call-2"], results
    for r in results:
        assert r.result.type == "succeeded", r
        assert r.result.message.usage.service_tier == "batch", r.result.message.usage
        json.loads(r.result.message.content[0].text)
    listed = [b.id for b in client.messages.batches.list(limit=1)]
    assert batch.id in listed, listed
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id, deleted


def main():
    client = anthropic.Anthropic(max_retries=0)
    usage = check_create(client)
    check_errors(client)
    check_count_tokens(client, usage)
    check_batches(client)
    print(f"anthropic {anthropic.__version__}: SDK checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"SDK check failed: {e!r}", file=sys.stderr)
        raise
