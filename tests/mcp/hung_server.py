"""An MCP server (stdio, JSON-RPC written by hand: a hung server is not something an SDK
helps to write) that answers the handshake and then never answers tools/list, the
first time it is started. Started again (a marker file says it was hung once), it
answers like any server: one tool, `ping`.

Usage: python hung_server.py MARKER_FILE
"""

import json
import os
import sys
import time

MARKER = sys.argv[1]
hang = not os.path.exists(MARKER)
if hang:
    open(MARKER, "w").close()


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    request = json.loads(line)
    method, ident = request.get("method"), request.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": ident, "result": {
            "protocolVersion": request["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "hung", "version": "1.0.0"},
        }})
    elif method == "tools/list":
        if hang:
            time.sleep(3600)
        send({"jsonrpc": "2.0", "id": ident, "result": {"tools": [{
            "name": "ping",
            "description": "Answers pong.",
            "inputSchema": {"type": "object", "properties": {}},
            "annotations": {"readOnlyHint": True},
        }]}})
    elif method == "tools/call":
        send({"jsonrpc": "2.0", "id": ident, "result": {
            "content": [{"type": "text", "text": "pong"}], "isError": False}})
    elif ident is not None:
        send({"jsonrpc": "2.0", "id": ident, "error": {"code": -32601, "message": "no such method"}})
