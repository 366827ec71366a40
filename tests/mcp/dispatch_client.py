"""An MCP client nobody here wrote (the official Python SDK) against Dispatch's own MCP
server, for tests/e2e/mcp_server.rs. It prints one JSON object a line; the Rust test
asserts on them.

  dispatch_client.py http URL GOAL           the API key in DISPATCH_MCP_KEY
  dispatch_client.py refused URL             no key: the server must refuse it
  dispatch_client.py answers URL GOAL        three runs of GOAL (a call that waits for a
                                             person): one approved, one denied, one
                                             stopped; the API key in DISPATCH_MCP_KEY
  dispatch_client.py stdio DISPATCH RUN_ID   `DISPATCH mcp`, with NATS_URL,
                                             DISPATCH_NATS_NKEY and DISPATCH_WORKSPACE
                                             passed on from this environment
"""

import json
import os
import sys

import anyio
import httpx2
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

NOTE_TIMEOUT_S = 60
POLL_S = 0.5


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def text_of(result):
    return "".join(block.text for block in result.content if getattr(block, "type", None) == "text")


def answered(result):
    return {"is_error": bool(result.is_error), "text": text_of(result), "structured": result.structured_content}


async def list_tools(session):
    tools = await session.list_tools()
    emit(
        "tools",
        names=[tool.name for tool in tools.tools],
        schemas={tool.name: tool.input_schema for tool in tools.tools},
    )


async def over_http(url, goal):
    key = os.environ["DISPATCH_MCP_KEY"]
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx2.Timeout(30, read=60),
    )
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            emit("initialized", server=init.server_info.name, protocol=init.protocol_version)
            await list_tools(session)

            bad = await session.call_tool("dispatch", {"goal": "   "})
            emit("bad_goal", **answered(bad))
            bad_timeout = await session.call_tool("dispatch", {"goal": "g", "timeout": "soon"})
            emit("bad_timeout", **answered(bad_timeout))

            dispatched = await session.call_tool("dispatch", {"goal": goal})
            emit("dispatched", **answered(dispatched))
            if dispatched.is_error:
                sys.exit(1)
            run_id = dispatched.structured_content["run_id"]

            # Poll `tasks` until the run's note arrives: each note is handed out once.
            note, polls, seen, tasks = None, 0, [], None
            with anyio.move_on_after(NOTE_TIMEOUT_S):
                while note is None:
                    tasks = await session.call_tool("tasks", {})
                    polls += 1
                    if tasks.is_error:
                        emit("tasks_error", **answered(tasks))
                        sys.exit(1)
                    for each in tasks.structured_content["notes"]:
                        seen.append(each)
                        if each["run_id"] == run_id:
                            note = each
                    if note is None:
                        await anyio.sleep(POLL_S)
            emit("note", note=note, polls=polls, seen=seen, text=text_of(tasks) if tasks else "")
            if note is None:
                sys.exit(1)

            again = await session.call_tool("tasks", {})
            emit("tasks_again", **answered(again))

            status = await session.call_tool("status", {"run_id": run_id})
            emit("status", **answered(status))

            resources = await session.list_resources()
            emit("resources", uris=[str(r.uri) for r in resources.resources])
            report = await session.read_resource(f"dispatch://runs/{run_id}/report")
            emit("report", texts=[getattr(c, "text", None) for c in report.contents])


async def answers(url, goal):
    key = os.environ["DISPATCH_MCP_KEY"]
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx2.Timeout(30, read=60),
    )
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            runs = []
            for name in ("approved", "denied", "stopped"):
                dispatched = await session.call_tool("dispatch", {"goal": goal})
                if dispatched.is_error:
                    emit("dispatch_error", **answered(dispatched))
                    sys.exit(1)
                runs.append(dispatched.structured_content["run_id"])
            emit("runs", approved=runs[0], denied=runs[1], stopped=runs[2])

            # Each run waits for a person: wait until all three ask.
            waiting = {}
            with anyio.move_on_after(NOTE_TIMEOUT_S):
                while len(waiting) < 3:
                    listed = await session.call_tool("approvals", {})
                    for each in listed.structured_content["approvals"]:
                        if each["run_id"] in runs:
                            waiting[each["run_id"]] = each
                    if len(waiting) < 3:
                        await anyio.sleep(POLL_S)
            emit("waiting", count=len(waiting))
            if len(waiting) < 3:
                sys.exit(1)
            first, second = waiting[runs[0]], waiting[runs[1]]

            wrong = await session.call_tool(
                "approve", {"approval_id": first["approval_id"], "args_digest": "sha256:" + "0" * 64}
            )
            emit("wrong_digest", **answered(wrong))
            approved = await session.call_tool(
                "approve", {"approval_id": first["approval_id"], "args_digest": first["args_digest"]}
            )
            emit("approved", **answered(approved))
            denied = await session.call_tool(
                "deny", {"approval_id": second["approval_id"], "reason": "not today"}
            )
            emit("denied", **answered(denied))
            again = await session.call_tool(
                "approve", {"approval_id": second["approval_id"], "args_digest": second["args_digest"]}
            )
            emit("again", **answered(again))
            stopped = await session.call_tool("stop", {"run_id": runs[2]})
            emit("stopped", **answered(stopped))


async def refused(url):
    statuses = []

    async def record(response):
        statuses.append({"status": response.status_code, "www_authenticate": response.headers.get("www-authenticate")})

    http = httpx2.AsyncClient(event_hooks={"response": [record]}, timeout=httpx2.Timeout(10))
    try:
        with anyio.fail_after(30):
            async with http, streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    await session.list_tools()
        emit("refused", refused=False, responses=statuses)
    except Exception as e:  # the SDK's error for a refused request, in a group or not
        emit("refused", refused=True, responses=statuses, error=f"{type(e).__name__}: {e}")


async def over_stdio(dispatch, run_id):
    passed = ("NATS_URL", "DISPATCH_NATS_NKEY", "DISPATCH_WORKSPACE", "RUST_LOG")
    server = StdioServerParameters(
        command=dispatch,
        args=["mcp"],
        env={name: os.environ[name] for name in passed if name in os.environ},
    )
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            emit("initialized", server=init.server_info.name, protocol=init.protocol_version)
            await list_tools(session)
            status = await session.call_tool("status", {"run_id": run_id})
            emit("status", **answered(status))
            approvals = await session.call_tool("approvals", {})
            emit("approvals", **answered(approvals))


def main():
    mode, *args = sys.argv[1:]
    if mode == "http":
        anyio.run(over_http, *args)
    elif mode == "refused":
        anyio.run(refused, *args)
    elif mode == "answers":
        anyio.run(answers, *args)
    elif mode == "stdio":
        anyio.run(over_stdio, *args)
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
