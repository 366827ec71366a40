"""An independent reader of Dispatch's run logs, written from ARCHITECTURE.md alone
("Who writes what", "What makes a log trusted", "Verifying a trail yourself").

It reads each run's messages straight from JetStream with nats-py (direct gets of
`dispatch.run.default.<run_id>.*` in stream order), decodes each envelope with a small
protobuf wire reader (no generated code), and applies the writer rule:

1. the event's `role` (field 12) is the role whose subject it is stored on (the last
   subject token);
2. that role may write the event's kind (the table in ARCHITECTURE.md);
3. the event with seq 1 is a run_requested, and no other event is.

It stops at the run's first run_finished (what follows a seal is outside the record)
and prints one JSON object: run id -> {"verdict": "ok"|"corrupt", "seq", "reason",
"events"}. It checks nothing else (hashes and seals are `dispatch verify`'s).

Usage: audit_reader.py NATS_URL RUN_ID... with DISPATCH_AUDIT_NKEY (the public nkey of
the identity it connects as) and DISPATCH_AUDIT_SEED_HEX (that identity's ed25519 seed,
hex) in the environment, and DISPATCH_AUDIT_INBOX (its inbox prefix).
"""

import asyncio
import base64
import json
import os
import sys

import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.js.errors import NotFoundError

STREAM = "DISPATCH_RUNS"

# The body's oneof field numbers (proto/dispatch/run/v1/events.proto).
KINDS = {
    20: "run_requested", 21: "plan_authored", 22: "plan_rejected", 23: "run_started",
    24: "leaf_started", 25: "model_turn", 26: "tool_call_requested",
    27: "policy_decided", 28: "tool_call_completed", 29: "tool_call_failed",
    30: "gate_checked", 31: "leaf_finished", 32: "feedback_queued", 33: "run_finished",
    34: "tool_call_started", 35: "stop_requested", 36: "command_abandoned",
    37: "approval_requested", 38: "approval_resolved", 39: "output_delta",
    40: "service_woken",
}
ROLES = {1: "dispatcher", 2: "policy", 3: "connectors"}
DISPATCHER_KINDS = {
    "run_requested", "plan_authored", "plan_rejected", "run_started", "service_woken",
    "leaf_started", "leaf_finished", "model_turn", "output_delta", "tool_call_requested",
    "stop_requested", "feedback_queued", "run_finished",
}
POLICY_KINDS = {"policy_decided", "approval_requested", "approval_resolved"}
CONNECTORS_KINDS = {"tool_call_started", "tool_call_completed", "tool_call_failed", "gate_checked"}
DENY = 2


def fields(data):
    """(number, wire type, value) of each field of a protobuf message."""
    i, out = 0, []
    while i < len(data):
        key, i = varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(data, i)
        elif wire == 2:
            length, i = varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((number, wire, value))
    return out


def varint(data, i):
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def first(body, number, default):
    return next((v for n, _, v in fields(body) if n == number), default)


def may_write(role, kind, body):
    """The table of ARCHITECTURE.md, "Who writes what"."""
    if kind in DISPATCHER_KINDS:
        return role == "dispatcher"
    if kind == "policy_decided":
        if role == "policy":
            return True
        return role == "dispatcher" and first(body, 2, 0) == DENY and first(body, 3, b"") == b"denial-memo"
    if kind == "approval_resolved":
        if role == "policy":
            return True
        return role == "dispatcher" and first(body, 3, 0) == DENY and first(body, 6, 0) == 1
    if kind in POLICY_KINDS:
        return role == "policy"
    if kind in CONNECTORS_KINDS:
        return role == "connectors"
    if kind == "command_abandoned":
        command = first(body, 1, b"").decode()
        return (role == "policy" and command == "policy") or (
            role == "connectors" and command in ("tool", "gate"))
    return False


def judge(messages):
    """The writer rule over one run's messages, in stream order."""
    for count, (subject, data) in enumerate(messages, start=1):
        stored_as = subject.split(".")[-1]
        try:
            envelope = fields(data)
        except (ValueError, IndexError) as e:
            return {"verdict": "corrupt", "seq": count, "reason": f"not an event: {e}", "events": count}
        seq = next((v for n, w, v in envelope if n == 3 and w == 0), 0)
        role = ROLES.get(next((v for n, w, v in envelope if n == 12 and w == 0), 0), "none")
        body = next(((n, v) for n, w, v in envelope if n in KINDS and w == 2), None)
        if body is None:
            return {"verdict": "corrupt", "seq": seq, "reason": "no body", "events": count}
        kind = KINDS[body[0]]
        if role != stored_as:
            reason = f"stored on the {stored_as} subject but names {role}"
        elif not may_write(role, kind, body[1]):
            reason = f"{kind} written by {role}"
        elif (seq == 1) != (kind == "run_requested"):
            reason = f"seq {seq} is {kind}"
        else:
            reason = None
        if reason:
            return {"verdict": "corrupt", "seq": seq, "reason": reason, "events": count}
        if kind == "run_finished":
            return {"verdict": "ok", "seq": seq, "reason": "", "events": count}
    return {"verdict": "ok", "seq": len(messages), "reason": "", "events": len(messages)}


async def read_run(js, run_id):
    """Every message on the run's subjects, in stream order."""
    subject, seq, out = f"dispatch.run.default.{run_id}.*", 1, []
    while True:
        try:
            msg = await js.get_msg(STREAM, seq=seq, subject=subject, next=True, direct=True)
        except NotFoundError:
            return out
        out.append((msg.subject, msg.data))
        seq = msg.seq + 1


async def main():
    url, run_ids = sys.argv[1], sys.argv[2:]
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(os.environ["DISPATCH_AUDIT_SEED_HEX"]))
    public = os.environ["DISPATCH_AUDIT_NKEY"]

    # nats-py signs the server's nonce with the `nkeys` package, which ships no wheel;
    # the same signature is made here with `cryptography`.
    def setup(client):
        client._public_nkey = public
        client._signature_cb = lambda nonce: base64.b64encode(key.sign(nonce.encode()))

    Client._setup_nkeys_seed_connect = setup
    nc = await nats.connect(url, nkeys_seed_str="-", inbox_prefix=os.environ["DISPATCH_AUDIT_INBOX"])
    js = nc.jsm()
    verdicts = {run_id: judge(await read_run(js, run_id)) for run_id in run_ids}
    await nc.close()
    print(json.dumps(verdicts))


asyncio.run(main())
