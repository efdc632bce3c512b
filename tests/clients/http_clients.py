"""The official `openai` and `ollama` Python clients against a running `edgellm serve --http`.

Usage: http_clients.py BASE_URL MODEL [API_KEY]
Prints one JSON object of what each client saw; the Rust test (tests/http.rs) checks it.
Any exception the clients raise where none is expected fails the run (exit 1).
"""
import json
import sys

import ollama
import openai

base, model = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else "unused"
out = {}

# --- openai -------------------------------------------------------------------------------
oa = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
out["openai_models"] = [m.id for m in oa.models.list()]
question = [{"role": "user", "content": "What is the capital of France?"}]
r = oa.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
out["openai_chat"] = {
    "text": r.choices[0].message.content,
    "finish_reason": r.choices[0].finish_reason,
    "prompt_tokens": r.usage.prompt_tokens,
    "completion_tokens": r.usage.completion_tokens,
    "model": r.model,
}
chunks, usage, finish = [], None, None
stream = oa.chat.completions.create(
    model=model, messages=question, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
for c in stream:
    if c.usage is not None:
        usage = c.usage.completion_tokens
    for ch in c.choices:
        if ch.delta.content:
            chunks.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
out["openai_stream"] = {"chunks": len(chunks), "text": "".join(chunks), "usage": usage,
                        "finish_reason": finish}
r = oa.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                          temperature=0)
out["openai_completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}

errors = {}
try:
    oa.chat.completions.create(model="no-such-model", messages=question, max_tokens=4)
except openai.NotFoundError as e:
    errors["model"] = {"status": e.status_code, "code": e.code, "message": e.message}
try:
    oa.chat.completions.create(model=model, messages=question, max_tokens=100000)
except openai.BadRequestError as e:
    errors["max_tokens"] = {"status": e.status_code, "message": e.message}
try:
    oa.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
except openai.BadRequestError as e:
    errors["role"] = {"status": e.status_code, "message": e.message}
try:
    oa.chat.completions.create(model=model, messages=question, temperature="hot")
except openai.BadRequestError as e:
    errors["type"] = {"status": e.status_code, "message": e.message, "param": e.param}
out["openai_errors"] = errors

# --- ollama -------------------------------------------------------------------------------
ol = ollama.Client(host=base, headers={"Authorization": "Bearer " + key}, timeout=120)
out["ollama_list"] = [m.model for m in ol.list().models]
r = ol.chat(model=model, messages=question, options={"temperature": 0, "num_predict": 24},
            stream=False)
out["ollama_chat"] = {"text": r.message.content, "done_reason": r.done_reason,
                      "eval_count": r.eval_count, "prompt_eval_count": r.prompt_eval_count}
parts, last = [], None
for p in ol.chat(model=model, messages=question, options={"temperature": 0, "num_predict": 24},
                 stream=True):
    parts.append(p.message.content)
    last = p
out["ollama_stream"] = {"parts": len(parts), "text": "".join(parts), "done": last.done,
                        "done_reason": last.done_reason, "eval_count": last.eval_count}
r = ol.generate(model=model, prompt="The capital of France is", raw=True,
                options={"temperature": 0, "num_predict": 8})
out["ollama_generate"] = {"text": r.response, "done_reason": r.done_reason}
s = ol.show(model)
out["ollama_show"] = {"family": s.details.family, "quantization": s.details.quantization_level,
                      "capabilities": list(s.capabilities or [])}
out["ollama_ps"] = [m.model for m in ol.ps().models]
errors = {}
try:
    ol.chat(model="no-such-model", messages=question)
except ollama.ResponseError as e:
    errors["model"] = {"status": e.status_code, "message": e.error}
try:
    ol.chat(model=model, messages=question, options={"num_predict": -7}, stream=False)
except ollama.ResponseError as e:
    errors["num_predict"] = {"status": e.status_code, "message": e.error}
out["ollama_errors"] = errors

print(json.dumps(out))
