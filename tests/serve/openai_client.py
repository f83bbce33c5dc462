"""Drives `oxtune serve` with the official `openai` client, as users do.

usage: python3 openai_client.py BASE_URL MODEL
       python3 openai_client.py BASE_URL MODEL --adapter NAME
       python3 openai_client.py BASE_URL MODEL --image FILE
       python3 openai_client.py BASE_URL MODEL --tools CITY
prints one JSON object with what the client saw; the Rust test asserts on it.
With --adapter: the same chat from the base model and from the adapter NAME
(plain and streamed). With --image: a chat about FILE sent as a data: URL
(plain and streamed). With --tools: the weather in CITY asked with a
`get_weather` tool (plain and streamed), the calls as the client reads them.
"""
import base64
import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused")
out = {}


def chat_both(model, messages):
    """The text of a chat at temperature 0, plain and streamed."""
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, seed=1)
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, seed=1, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return plain.choices[0].message.content, streamed, plain.model


if len(sys.argv) > 4 and sys.argv[3] == "--adapter":
    messages = [{"role": "user", "content": "Say something."}]
    out["models"] = {m.id: m.model_dump().get("parent") for m in client.models.list().data}
    out["base_text"], out["base_stream_text"], out["base_model"] = chat_both(model, messages)
    out["adapter_text"], out["adapter_stream_text"], out["adapter_model"] = chat_both(sys.argv[4], messages)
    print(json.dumps(out))
    sys.exit(0)

if len(sys.argv) > 4 and sys.argv[3] == "--tools":
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": f"What is the weather in {sys.argv[4]}?"}]
    plain = client.chat.completions.create(model=model, messages=messages, tools=tools, temperature=0, max_tokens=120)
    choice = plain.choices[0]
    out["finish"] = choice.finish_reason
    out["content"] = choice.message.content
    out["calls"] = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                    for c in choice.message.tool_calls or []]
    calls, content, finish = {}, "", None
    for chunk in client.chat.completions.create(model=model, messages=messages, tools=tools, temperature=0,
                                                max_tokens=120, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            call = calls.setdefault(c.index, {"name": "", "arguments": ""})
            call["name"] += c.function.name or ""
            call["arguments"] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    out["stream_finish"] = finish
    out["stream_content"] = content
    out["stream_calls"] = [calls[i] for i in sorted(calls)]
    print(json.dumps(out))
    sys.exit(0)

if len(sys.argv) > 4 and sys.argv[3] == "--image":
    with open(sys.argv[4], "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in the picture?"},
    ]}]
    out["image_text"], out["image_stream_text"], _ = chat_both(model, messages)
    print(json.dumps(out))
    sys.exit(0)

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
