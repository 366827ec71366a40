"""An MCP server over streamable HTTP that wants a bearer token on every request.

Built on the official Python SDK installed in .tools/mcp/venv. The token it accepts is
read from BEARER_TOKEN; every request without it is answered 401. Its tool whoami
answers with the Authorization header its call came with, as a server that echoes
credentials back would; whoami_encoded answers with the token in the forms a careless
server passes it on in (base64, URL-safe base64, hex either case, percent-encoded,
upper case).

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


@server.tool(description="Says this call's bearer token, encoded every which way.")
def whoami_encoded(ctx: Context) -> str:
    import base64
    from urllib.parse import quote

    token = ctx.request_context.request.headers.get("authorization", "").removeprefix("Bearer ")
    raw = token.encode()
    return "\n".join([
        "b64: " + base64.b64encode(b"user:" + raw).decode(),
        "b64url: " + base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "hex: " + raw.hex(),
        "HEX: " + raw.hex().upper(),
        "pct: " + "".join(f"%{b:02X}" for b in raw),
        "quoted: " + quote(token, safe=""),
        "upper: " + token.upper(),
    ])


inner = server.streamable_http_app()


async def app(scope, receive, send):
    if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != b"Bearer " + TOKEN:
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"a bearer token is needed"})
        return
    await inner(scope, receive, send)


uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
