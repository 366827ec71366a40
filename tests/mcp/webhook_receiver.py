"""A webhook receiver that checks every delivery with the Standard Webhooks library.

Installed by `cargo xtask test` into .tools/mcp/venv (standardwebhooks, pinned by hash).
It answers 500 to the first FAIL_FIRST requests, then verifies each request's
signature with the secret and answers 204 when it checks out (400 when it does not).
Every request is appended to LOG as one JSON line: {"verified", "status", "headers",
"body"}.

Usage: python webhook_receiver.py PORT SECRET FAIL_FIRST LOG

PORT 0 takes a free port; the port listened on is printed on the first line of
standard output once the socket is bound (a port picked by the caller beforehand can be
taken by another test before the receiver binds it).
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

PORT, SECRET, FAIL_FIRST, LOG = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
webhook = Webhook(SECRET)
lock = threading.Lock()
seen = 0


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        global seen
        body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
        headers = {k.lower(): v for k, v in self.headers.items()}
        with lock:
            seen += 1
            failing = seen <= FAIL_FIRST
        verified = False
        if failing:
            status = 500
        else:
            try:
                webhook.verify(body, headers)
                verified, status = True, 204
            except WebhookVerificationError:
                status = 400
        with lock, open(LOG, "a") as log:
            log.write(json.dumps({"verified": verified, "status": status,
                                  "headers": headers, "body": body}) + "\n")
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Receiver)
print(server.server_address[1], flush=True)
server.serve_forever()
