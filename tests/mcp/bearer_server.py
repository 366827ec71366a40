"""An MCP server over streamable HTTP that wants a bearer token on every request.

Built on the official Python SDK installed in .tools/mcp/venv. The token it accepts is
read from BEARER_TOKEN; every request without it is answered 401. Its one tool,
whoami, answers with the Authorization header its call came with, as a server that
echoes credentials back would.

Usage: python bearer_server.py PORT
"""

import os
import sys

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

TOKEN = os.environ["BEARER_TOKEN"].encode()
PORT = int(sys.argv[1])

server = MCPServer("bearer-check", version="1.0.0")


@server.tool(description="Says which Authorization header this call came with.")
def whoami(ctx: Context) -> str:
    headers = ctx.request_context.request.headers
    return "authorization: " + headers.get("authorization", "(none)")


inner = server.streamable_http_app()


async def app(scope, receive, send):
    if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != b"Bearer " + TOKEN:
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"a bearer token is needed"})
        return
    await inner(scope, receive, send)


uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
