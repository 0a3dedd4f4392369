"""Drives the daemon's OpenAI-compatible routes with the official `openai`
package, unchanged, and prints what it got as one JSON object.

    python openai_client.py BASE_URL TOKEN MODEL PROMPT MAX_TOKENS

Greedy (temperature 0) completions and chat completions, whole and streamed;
the status of a request for a model nobody serves and of one with a wrong
token; the model list.
"""

import json
import sys

import openai


def main() -> None:
    base_url, token, model, prompt, max_tokens = sys.argv[1:6]
    max_tokens = int(max_tokens)
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=300)
    out = {}

    completion = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0
    )
    out["completion"] = completion.choices[0].text

    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    )
    out["completion_stream"] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    out["chat"] = chat.choices[0].message.content
    out["chat_usage_completion_tokens"] = chat.usage.completion_tokens

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    out["chat_stream"] = "".join(
        chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
    )

    try:
        client.completions.create(model="no-such-model", prompt=prompt, max_tokens=1)
        out["not_found_status"] = 200
    except openai.APIStatusError as error:
        out["not_found_status"] = error.status_code

    wrong = openai.OpenAI(base_url=base_url, api_key="wrong-token", max_retries=0)
    try:
        wrong.models.list()
        out["unauthorized_status"] = 200
    except openai.APIStatusError as error:
        out["unauthorized_status"] = error.status_code

    out["models"] = [m.id for m in client.models.list()]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
