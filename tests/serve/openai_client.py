"""Drives `oxtune serve` with the official `openai` client, as users do.

usage: python3 openai_client.py BASE_URL MODEL
prints one JSON object with what the client saw; the Rust test asserts on it.
"""
import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused")
out = {}

out["models"] = [m.id for m in client.models.list().data]

messages = [{"role": "user", "content": "Say something."}]
plain = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, seed=1)
out["chat_text"] = plain.choices[0].message.content
out["chat_role"] = plain.choices[0].message.role
out["chat_finish"] = plain.choices[0].finish_reason
out["chat_usage"] = plain.usage.model_dump()

chunks = list(client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, seed=1, stream=True,
    stream_options={"include_usage": True}))
out["stream_first_role"] = chunks[0].choices[0].delta.role
out["stream_text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["stream_finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
out["stream_usage"] = chunks[-1].usage.model_dump() if chunks[-1].usage else None
out["stream_last_choices"] = len(chunks[-1].choices)

scored = client.completions.create(model=model, prompt="hello world, this is", max_tokens=0, echo=True, logprobs=2)
lp = scored.choices[0].logprobs
out["echo_text"] = scored.choices[0].text
out["echo_token_logprobs"] = lp.token_logprobs
out["echo_text_offset"] = lp.text_offset
out["echo_top_logprobs"] = lp.top_logprobs

plain_completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
streamed_completion = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
out["completion_text"] = plain_completion.choices[0].text
out["completion_stream_text"] = "".join(c.choices[0].text for c in streamed_completion if c.choices)
out["completion_stream_finish"] = [c.choices[0].finish_reason for c in streamed_completion if c.choices and c.choices[0].finish_reason]

ids = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=3, temperature=0)
out["ids_completion_tokens"] = ids.usage.completion_tokens

errors = {}
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
except openai.NotFoundError as e:
    errors["unknown_model"] = [e.status_code, e.body.get("code") if isinstance(e.body, dict) else None]
try:
    client.chat.completions.create(model=model, messages=[])
except openai.BadRequestError as e:
    errors["empty_messages"] = [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]
out["errors"] = errors
print(json.dumps(out))
