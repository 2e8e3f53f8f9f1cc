#!/usr/bin/env python3
"""Example hookrelay consumer: RabbitMQ -> CloudEvent -> (re-verify) -> ack.

Reads the CloudEvents that hookrelay publishes (structured mode: the whole
event is the JSON message body, content type application/cloudevents+json),
parses each with the CloudEvents Python SDK, takes the webhook body's exact
bytes (the raw `data` member of a JSON body, or `data_base64` decoded), for a
Patreon event optionally recomputes the webhook's HMAC-MD5 over them, drops
duplicates by source and id, acks, and prints one line per delivery:

    event id=<id> type=<type> subject=<subject|-> deliveryid=<id|-> data=<json|base64> bytes=<n> sha256=<hex> verified=<true|false|skipped|n/a> duplicate=<true|false> hmac=<hex|->

and, when it stops, `consumed=<N> duplicates=<M>`. A message that is not a
valid CloudEvent is rejected without requeue (the broker dead-letters it) and
printed as `invalid delivery=<tag> message_id=<id|-> error=<reason>`.

See README.md for the options and what "verified" means.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import os
import signal
import sys
import time

import pika
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.formats.json import JSONFormat

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
DEFAULT_QUEUE = "hookrelay.patreon"
# The Patreon kind's default type prefix: only these events are re-verified
# (Patreon signs the body alone; other kinds sign timestamps or ids too, or
# use other algorithms, and this example does not pretend to check them).
PATREON_TYPE_PREFIX = "com.patreon."


# --- the exact bytes of the webhook body ------------------------------------
#
# hookrelay embeds a JSON webhook body in the envelope's `data` member byte for
# byte. Parsing and re-serialising `data` would change those bytes (key order,
# spacing, escapes), so we locate the member in the raw message body instead:
# a small scanner walks the top-level object and returns everything between
# the colon after the member's name and the comma or closing brace that ends
# it. Any other body (a Slack form post) is in `data_base64`.

_WS = b" \t\r\n"


def _skip_ws(buf: bytes, i: int) -> int:
    while i < len(buf) and buf[i] in _WS:
        i += 1
    return i


def _end_of_string(buf: bytes, i: int) -> int:
    """buf[i] is an opening quote; return the index just past the closing one."""
    i += 1
    while i < len(buf):
        c = buf[i]
        if c == 0x5C:  # backslash: skip the escaped byte
            i += 2
            continue
        if c == 0x22:  # quote
            return i + 1
        i += 1
    raise ValueError("unterminated string")


def _end_of_value(buf: bytes, i: int) -> int:
    """Return the index just past the JSON value starting at buf[i]."""
    c = buf[i]
    if c == 0x22:
        return _end_of_string(buf, i)
    if c in b"{[":
        depth = 0
        while i < len(buf):
            c = buf[i]
            if c == 0x22:
                i = _end_of_string(buf, i)
                continue
            if c in b"{[":
                depth += 1
            elif c in b"}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError("unterminated object or array")
    while i < len(buf) and buf[i] not in b",}]" + _WS:
        i += 1
    return i


def member_bytes(body: bytes, name: bytes) -> bytes | None:
    """The raw bytes of the value of the top-level member `name` (quoted), or None."""
    i = _skip_ws(body, 0)
    if i >= len(body) or body[i] != ord("{"):
        raise ValueError("not a JSON object")
    i += 1
    while True:
        i = _skip_ws(body, i)
        if i >= len(body) or body[i] == ord("}"):
            return None
        key_end = _end_of_string(body, i)
        key = body[i:key_end]
        i = _skip_ws(body, key_end)
        if body[i] != ord(":"):
            raise ValueError("expected ':'")
        value_start = i + 1
        i = _skip_ws(body, _end_of_value(body, _skip_ws(body, value_start)))
        if key == name:
            return body[value_start:i]
        if i < len(body) and body[i] == ord(","):
            i += 1


def webhook_body(body: bytes) -> tuple[bytes, str]:
    """The webhook body's exact bytes and the member that carries them."""
    raw = member_bytes(body, b'"data"')
    if raw is not None:
        return raw, "json"
    encoded = member_bytes(body, b'"data_base64"')
    if encoded is None:
        raise ValueError("neither data nor data_base64")
    # Strict: the SDK's own decoding ignores characters outside the alphabet.
    try:
        return base64.b64decode(json.loads(encoded), validate=True), "base64"
    except (binascii.Error, TypeError, ValueError) as e:
        raise ValueError(f"data_base64: {e}") from None


# --- command line ------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="Consume hookrelay CloudEvents from RabbitMQ.")
    p.add_argument("--url", default=env("AMQP_URL", DEFAULT_URL),
                   help="AMQP URL (env AMQP_URL; default %(default)s)")
    p.add_argument("--queue", default=env("QUEUE_NAME", DEFAULT_QUEUE),
                   help="queue to consume (env QUEUE_NAME; default %(default)s)")
    p.add_argument("--secret-file", default=env("WEBHOOK_SECRET_FILE"),
                   help="file holding the Patreon webhook secret, to recompute the HMAC "
                        "(env WEBHOOK_SECRET_FILE; or give the secret itself in WEBHOOK_SECRET)")
    p.add_argument("--signatures-file", default=env("SIGNATURES_FILE"),
                   help="known X-Patreon-Signature values, one per line; a Patreon event is "
                        "verified=true when its recomputed HMAC is among them (env SIGNATURES_FILE)")
    p.add_argument("--max-messages", type=int, default=int(env("MAX_MESSAGES", "0")),
                   help="stop after this many deliveries; 0 = no limit (env MAX_MESSAGES)")
    p.add_argument("--idle-timeout", type=float, default=float(env("IDLE_TIMEOUT_SECS", "0")),
                   help="stop after this many seconds without a delivery; 0 = never (env IDLE_TIMEOUT_SECS)")
    p.add_argument("--prefetch", type=int, default=20, help="unacked deliveries in flight (default %(default)s)")
    return p.parse_args()


def read_secret(args: argparse.Namespace) -> bytes | None:
    if args.secret_file:
        with open(args.secret_file, "rb") as f:
            # One secret per file; a trailing newline is not part of it.
            return f.read().rstrip(b"\r\n")
    secret = os.environ.get("WEBHOOK_SECRET")
    return secret.encode() if secret else None


def read_signatures(path: str | None) -> set[str] | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return {line.strip().lower() for line in f if line.strip() and not line.startswith("#")}


def main() -> int:
    args = parse_args()
    secret = read_secret(args)
    known_signatures = read_signatures(args.signatures_file)
    # In-memory only, so it forgets across restarts and grows without bound:
    # fine for an example. A real consumer records processed ids durably
    # (e.g. a unique key in its database, written in the same transaction
    # as the effect) because RabbitMQ delivers at least once.
    seen: set[tuple[str, str]] = set()
    consumed = duplicates = 0
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    try:
        connection = pika.BlockingConnection(pika.URLParameters(args.url))
    except pika.exceptions.AMQPError as e:
        print(f"consumer: cannot connect to {pika.URLParameters(args.url).host}: {e!r}", file=sys.stderr)
        return 1
    channel = connection.channel()
    channel.basic_qos(prefetch_count=args.prefetch)

    last_delivery = time.monotonic()
    try:
        for method, properties, body in channel.consume(args.queue, auto_ack=False, inactivity_timeout=0.5):
            if stop:
                break
            if method is None:  # inactivity tick
                if args.idle_timeout and time.monotonic() - last_delivery >= args.idle_timeout:
                    break
                continue
            last_delivery = time.monotonic()
            consumed += 1
            message = ce_rabbitmq.RabbitMQMessage(
                headers={k: str(v) for k, v in (properties.headers or {}).items()},
                content_type=properties.content_type,
                body=body,
            )
            try:
                # Structured content mode: the SDK reads the event from the body.
                event = ce_rabbitmq.from_structured(message, JSONFormat())
                data, carried_as = webhook_body(body)
            except Exception as e:  # any parse/validation failure
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"invalid delivery={method.delivery_tag} message_id={properties.message_id or '-'} "
                      f"error={reason!r}", flush=True)
                channel.basic_nack(method.delivery_tag, requeue=False)
                if args.max_messages and consumed >= args.max_messages:
                    break
                continue

            event_id = event.get_id()
            # Ids are unique per source (CloudEvents: source + id).
            key = (event.get_source(), event_id)
            duplicate = key in seen
            seen.add(key)
            if duplicate:
                duplicates += 1

            digest = None
            if not event.get_type().startswith(PATREON_TYPE_PREFIX):
                verified = "n/a"
            else:
                if secret is not None:
                    digest = hmac.new(secret, data, hashlib.md5).hexdigest()
                if digest is None or known_signatures is None:
                    verified = "skipped"
                else:
                    verified = "true" if any(hmac.compare_digest(digest, s) for s in known_signatures) else "false"

            # A real consumer does its work here, for non-duplicates only, and
            # acks after the work is durable.
            print(f"event id={event_id} type={event.get_type()} subject={event.get_subject() or '-'} "
                  f"deliveryid={event.get_extension('deliveryid') or '-'} data={carried_as} bytes={len(data)} "
                  f"sha256={hashlib.sha256(data).hexdigest()} verified={verified} "
                  f"duplicate={'true' if duplicate else 'false'} hmac={digest or '-'}", flush=True)
            channel.basic_ack(method.delivery_tag)
            if args.max_messages and consumed >= args.max_messages:
                break
    except pika.exceptions.ChannelClosedByBroker as e:
        print(f"consumer: the broker closed the channel: {e.reply_code} {e.reply_text}", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPError as e:
        print(f"consumer: connection lost: {e!r}", file=sys.stderr)
        return 1
    finally:
        print(f"consumed={consumed} duplicates={duplicates}", flush=True)

    try:
        channel.cancel()  # unacked prefetched messages go back to the queue
        connection.close()
    except pika.exceptions.AMQPError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
