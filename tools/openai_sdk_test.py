"""The official openai SDK (pinned in tools/openai_sdk.sh) against a live server on the tiny
fixture: chat non-streamed and streamed with a data: image (the deltas concatenate to the
non-streamed text, which equals /v1/vqa's answer), n = 2 with a seed, the usage chunk,
models.list(), and a bad image raising BadRequestError with the server's message.

  python tools/openai_sdk_test.py http://127.0.0.1:PORT
"""

import base64
import json
import sys
import urllib.request
from pathlib import Path

import openai

BASE = sys.argv[1]
ROOT = Path(__file__).resolve().parent.parent
IMAGE = base64.b64encode((ROOT / "tests/fixtures/images/photo_320x240.jpg").read_bytes()).decode()
URL = f"data:image/jpeg;base64,{IMAGE}"
QUESTION = "what is in the picture?"
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused")
failures = []


def check(name, ok, detail=""):
    print(f"openai-sdk: {'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def messages(text=QUESTION, url=URL):
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]},
    ]


req = urllib.request.Request(
    f"{BASE}/v1/vqa",
    data=json.dumps({"image": IMAGE, "question": QUESTION, "parameters": {"max_new_tokens": 8}}).encode(),
    headers={"content-type": "application/json"},
)
vqa = json.load(urllib.request.urlopen(req, timeout=60))

models = client.models.list()
ids = [m.id for m in models.data]
check("models.list() names the served model", len(ids) == 1, str(ids))
model = ids[0]

chat = client.chat.completions.create(model=model, messages=messages(), max_tokens=8)
text = chat.choices[0].message.content
check("chat equals /v1/vqa's answer", text == vqa["answer"], f"{text!r} vs {vqa['answer']!r}")
check("chat usage counts the generated tokens", chat.usage.completion_tokens == vqa["usage"]["generated_tokens"], str(chat.usage))

stream = client.chat.completions.create(
    model=model, messages=messages(), max_tokens=8, stream=True, stream_options={"include_usage": True}
)
deltas, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        deltas.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
check("streamed deltas concatenate to the non-streamed text", "".join(deltas) == text, f"{''.join(deltas)!r}")
check("the usage chunk comes when asked", usage is not None and usage.completion_tokens == chat.usage.completion_tokens, str(usage))

a = client.chat.completions.create(model=model, messages=messages(), max_tokens=8, n=2, temperature=1.0, seed=11)
b = client.chat.completions.create(model=model, messages=messages(), max_tokens=8, n=2, temperature=1.0, seed=11)
check(
    "n = 2 with a seed: two choices, reproducible",
    len(a.choices) == 2 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices],
    str([c.message.content for c in a.choices]),
)

try:
    client.chat.completions.create(model=model, messages=messages(url="data:image/png;base64,AAAA"), max_tokens=8)
    check("a bad image raises BadRequestError", False, "no error")
except openai.BadRequestError as e:
    message = e.body.get("message", "") if isinstance(e.body, dict) else str(e)
    check("a bad image raises BadRequestError with the server's message", "image" in message, message)

print(f"openai-sdk: {'FAILED: ' + ', '.join(failures) if failures else 'all checks passed'}")
sys.exit(1 if failures else 0)
