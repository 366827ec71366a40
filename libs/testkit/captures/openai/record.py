#!/usr/bin/env python3
"""Records real answers of an OpenAI-compatible server for the provider's tests.

    record.py BASE_URL OUT_DIR [--native | --author]

BASE_URL is up to and including /v1 (`cargo xtask model` serves
http://127.0.0.1:8091/v1). Each scenario POSTs /chat/completions with a body shaped as
Dispatch's provider sends it and writes the response body byte for byte to
OUT_DIR/<scenario>.sse (streamed) or .json, beside <scenario>.request.json.
--native records the scenarios that need a server returning native tool_calls for a
named tool_choice (llama-cpp-python with --chat_format chatml-function-calling).
--author records only a plan given room to finish (1024 tokens): with the 1.5B model it
ends by itself (`finish_reason: stop`), where the 0.5B model's plans run into their
200-token limit.

Only the standard library is used, so it runs with any python3.
"""

import json
import pathlib
import sys
import urllib.request

WORKER_PROMPT = (
    "You carry out one step of a plan. Use the tools to do what the step asks; every "
    "path is relative to the run's directory, and files you make go under scratch/. Call "
    "one tool at a time and look at its result before going on. When the step is done, "
    "answer with one short paragraph saying what you did, and call no tool."
)

GRAMMAR_HINT = (
    "Answer with an org-mode outline only: a '#+TITLE:' line, then one '* TODO' headline "
    "per step, each followed by a ':done-when:' line such as ':done-when: test -s "
    "scratch/REPORT.org'."
)


def tool(name, description, properties, required):
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


TOOLS = [
    tool("read_file", "Read a text file under scratch/.",
         {"path": {"type": "string", "description": "the file, e.g. scratch/notes.org"}}, ["path"]),
    tool("write_file", "Write a text file under scratch/, replacing it if it exists.",
         {"path": {"type": "string", "description": "the file, e.g. scratch/REPORT.org"},
          "content": {"type": "string", "description": "the whole new content"}},
         ["path", "content"]),
    tool("list_files", "List a directory under scratch/.",
         {"path": {"type": "string", "description": "the directory, e.g. scratch"}}, ["path"]),
]

STEP = (
    "The goal: Write the word hello into a file\n\nThis step: Write hello to "
    "scratch/hello.txt\n\nThe step counts as done when this check passes: test -s "
    "scratch/hello.txt"
)


def request(messages, tools=None, stream=True, temperature=0.2, max_tokens=256, tool_choice=None):
    body = {
        "model": "recorded",
        "messages": messages,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    if tools:
        body["tools"] = tools
        body["tool_choice"] = tool_choice or "auto"
    return body


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def scenarios(native, author_only):
    author = [system(GRAMMAR_HINT), user("Goal: Write the word hello into scratch/hello.txt")]
    worker = [system(WORKER_PROMPT), user(STEP)]
    after_call = worker + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "l0-t0-c0", "type": "function", "function": {
             "name": "write_file",
             "arguments": json.dumps({"path": "scratch/hello.txt", "content": "hello"})}}]},
        {"role": "tool", "tool_call_id": "l0-t0-c0", "content": "wrote 5 bytes to scratch/hello.txt"},
    ]
    if author_only:
        yield "author.json", request(author, stream=False, max_tokens=1024)
    elif native:
        named = {"type": "function", "function": {"name": "write_file"}}
        yield "native-call.sse", request(worker, TOOLS, tool_choice=named)
        yield "native-call.json", request(worker, TOOLS, stream=False, tool_choice=named)
    else:
        yield "author.sse", request(author, max_tokens=200)
        yield "author.json", request(author, stream=False, max_tokens=200)
        yield "text-call.sse", request(worker, TOOLS)
        yield "final.sse", request(after_call, TOOLS)


def main():
    base, out = sys.argv[1].rstrip("/"), pathlib.Path(sys.argv[2])
    native = "--native" in sys.argv[3:]
    author_only = "--author" in sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    for name, body in scenarios(native, author_only):
        data = json.dumps(body).encode()
        req = urllib.request.Request(base + "/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as response:
            raw = response.read()
        (out / name).write_bytes(raw)
        (out / (name.rsplit(".", 1)[0] + "." + name.rsplit(".", 1)[1] + ".request.json")).write_text(
            json.dumps(body, indent=1) + "\n")
        print(f"{name}: {len(raw)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
