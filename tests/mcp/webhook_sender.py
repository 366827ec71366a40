"""Sends one webhook signed with the Standard Webhooks library, as a provider would.

Installed by `cargo xtask test` into .tools/mcp/venv (standardwebhooks, pinned by hash).
Signs BODY with SECRET (a `whsec_…` key) under MSG_ID at now + SKEW seconds, optionally
tampers with the body after signing, POSTs it to URL and prints the answer's status
and body as one JSON line: {"status", "body"}.

Usage: python webhook_sender.py URL SECRET MSG_ID BODY SKEW TAMPER
"""

import json
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

from standardwebhooks.webhooks import Webhook

URL, SECRET, MSG_ID, BODY = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
SKEW, TAMPER = int(sys.argv[5]), sys.argv[6] == "tamper"

timestamp = datetime.now(tz=timezone.utc) + timedelta(seconds=SKEW)
signature = Webhook(SECRET).sign(msg_id=MSG_ID, timestamp=timestamp, data=BODY)
sent = BODY + " " if TAMPER else BODY
request = urllib.request.Request(
    URL,
    data=sent.encode(),
    method="POST",
    headers={
        "content-type": "application/json",
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    },
)
try:
    with urllib.request.urlopen(request, timeout=30) as answer:
        print(json.dumps({"status": answer.status, "body": answer.read().decode()}))
except urllib.error.HTTPError as answer:
    print(json.dumps({"status": answer.code, "body": answer.read().decode()}))
