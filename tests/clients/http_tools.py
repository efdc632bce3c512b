"""Tool calls through the official clients: a `turn_on(name)` tool and "Turn on the kitchen
light", greedily, not streamed and streamed (openai) and through `ollama.chat`; then the
tool's result sent back as a `tool` message.

Usage: http_tools.py BASE_URL MODEL
"""
import json
import sys

import ollama
import openai

base, model = sys.argv[1], sys.argv[2]
tools = [{
    "type": "function",
    "function": {
        "name": "turn_on",
        "description": "Turn on a device in the house",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "description": "The device's name"}},
            "required": ["name"],
        },
    },
}]
question = [{"role": "user", "content": "Turn on the kitchen light"}]
out = {}

oa = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
r = oa.chat.completions.create(model=model, messages=question, tools=tools, temperature=0,
                               max_tokens=64)
m = r.choices[0].message
calls = [{"id": c.id, "name": c.function.name, "arguments": json.loads(c.function.arguments)}
         for c in (m.tool_calls or [])]
out["openai"] = {"finish_reason": r.choices[0].finish_reason, "content": m.content,
                 "calls": calls, "prompt_tokens": r.usage.prompt_tokens}

streamed, text, finish = {}, [], None
for c in oa.chat.completions.create(model=model, messages=question, tools=tools, temperature=0,
                                    max_tokens=64, stream=True):
    for ch in c.choices:
        if ch.delta.content:
            text.append(ch.delta.content)
        for t in ch.delta.tool_calls or []:
            s = streamed.setdefault(t.index, {"name": "", "arguments": ""})
            if t.function.name:
                s["name"] += t.function.name
            if t.function.arguments:
                s["arguments"] += t.function.arguments
        if ch.finish_reason:
            finish = ch.finish_reason
out["openai_stream"] = {
    "finish_reason": finish, "content": "".join(text),
    "calls": [{"name": s["name"], "arguments": json.loads(s["arguments"])}
              for _, s in sorted(streamed.items())],
}

# The call's result goes back as a `tool` message after the assistant's call.
follow = question + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"] if calls else "call_0", "type": "function",
         "function": {"name": "turn_on", "arguments": json.dumps({"name": "kitchen light"})}}]},
    {"role": "tool", "tool_call_id": calls[0]["id"] if calls else "call_0",
     "content": json.dumps({"ok": True, "state": "on"})},
]
r = oa.chat.completions.create(model=model, messages=follow, tools=tools, temperature=0,
                               max_tokens=48)
out["openai_after_tool"] = {"finish_reason": r.choices[0].finish_reason,
                            "content": r.choices[0].message.content,
                            "calls": len(r.choices[0].message.tool_calls or []),
                            "prompt_tokens": r.usage.prompt_tokens}

ol = ollama.Client(host=base, timeout=300)
r = ol.chat(model=model, messages=question, tools=tools,
            options={"temperature": 0, "num_predict": 64}, stream=False)
out["ollama"] = {"content": r.message.content,
                 "calls": [{"name": c.function.name, "arguments": dict(c.function.arguments)}
                           for c in (r.message.tool_calls or [])]}
print(json.dumps(out))
