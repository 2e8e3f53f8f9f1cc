#!/usr/bin/env node
// Example hookrelay consumer: RabbitMQ -> CloudEvent -> (re-verify) -> ack.
//
// Reads the CloudEvents that hookrelay publishes (structured mode: the whole
// event is the JSON message body, content type application/cloudevents+json),
// parses each with the CloudEvents JavaScript SDK, takes the webhook body's
// exact bytes (the raw `data` member of a JSON body, or `data_base64` decoded),
// for a Patreon event optionally recomputes the webhook's HMAC-MD5 over them,
// drops duplicates by source and id, acks, and prints one line per delivery:
//
//   event id=<id> type=<type> subject=<subject|-> deliveryid=<id|-> data=<json|base64> bytes=<n> sha256=<hex> verified=<true|false|skipped|n/a> duplicate=<true|false> hmac=<hex|->
//
// and, when it stops, `consumed=<N> duplicates=<M>`. A message that is not a
// valid CloudEvent is rejected without requeue (the broker dead-letters it)
// and printed as `invalid delivery=<tag> message_id=<id|-> error=<reason>`.
//
// See README.md for the options and what "verified" means.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');
const { HTTP } = require('cloudevents');

const DEFAULT_URL = 'amqp://guest:guest@127.0.0.1:5672/%2f';
const DEFAULT_QUEUE = 'hookrelay.patreon';
// The Patreon kind's default type prefix: only these events are re-verified
// (Patreon signs the body alone; other kinds sign timestamps or ids too, or use
// other algorithms, and this example does not pretend to check them).
const PATREON_TYPE_PREFIX = 'com.patreon.';

// --- the exact bytes of the webhook body ------------------------------------
//
// hookrelay embeds a JSON webhook body in the envelope's `data` member byte for
// byte. Parsing and re-serialising `data` would change those bytes (key order,
// spacing, escapes, and JavaScript numbers lose precision), so we locate the
// member in the raw message body instead: a small scanner walks the top-level
// object and returns everything between the colon after "data" and the comma
// or closing brace that ends the member. Any other body (a Slack form post) is
// in `data_base64`.

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const isWs = (c) => c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d;

function skipWs(buf, i) {
  while (i < buf.length && isWs(buf[i])) i++;
  return i;
}

function endOfString(buf, i) {
  for (i += 1; i < buf.length; i++) {
    if (buf[i] === BACKSLASH) i++;
    else if (buf[i] === QUOTE) return i + 1;
  }
  throw new Error('unterminated string');
}

function endOfValue(buf, i) {
  const c = buf[i];
  if (c === QUOTE) return endOfString(buf, i);
  if (c === 0x7b || c === 0x5b) { // { [
    let depth = 0;
    while (i < buf.length) {
      const d = buf[i];
      if (d === QUOTE) { i = endOfString(buf, i); continue; }
      if (d === 0x7b || d === 0x5b) depth++;
      else if (d === 0x7d || d === 0x5d) { depth--; if (depth === 0) return i + 1; }
      i++;
    }
    throw new Error('unterminated object or array');
  }
  while (i < buf.length && !isWs(buf[i]) && buf[i] !== 0x2c && buf[i] !== 0x7d && buf[i] !== 0x5d) i++;
  return i;
}

/** The raw bytes of the top-level "data" member's value, or null. */
function dataMemberBytes(body) {
  let i = skipWs(body, 0);
  if (body[i] !== 0x7b) throw new Error('not a JSON object');
  i++;
  for (;;) {
    i = skipWs(body, i);
    if (i >= body.length || body[i] === 0x7d) return null;
    const keyEnd = endOfString(body, i);
    const key = body.subarray(i, keyEnd).toString('utf8');
    i = skipWs(body, keyEnd);
    if (body[i] !== 0x3a) throw new Error("expected ':'");
    const valueStart = i + 1;
    i = skipWs(body, endOfValue(body, skipWs(body, valueStart)));
    if (key === '"data"') return body.subarray(valueStart, i);
    if (body[i] === 0x2c) i++;
  }
}

/** The webhook body's exact bytes and the member that carries them. */
function webhookBody(body, event) {
  const data = dataMemberBytes(body);
  if (data !== null) return [data, 'json'];
  const encoded = event.data_base64;
  if (typeof encoded !== 'string') throw new Error('neither data nor data_base64');
  // Buffer.from skips characters outside the alphabet; the round trip is the
  // strict check. (The SDK's own decoded `data` is a Uint32Array.)
  const decoded = Buffer.from(encoded, 'base64');
  if (decoded.toString('base64') !== encoded) throw new Error('data_base64 is not canonical base64');
  return [decoded, 'base64'];
}

// --- command line ------------------------------------------------------------

function options() {
  const env = process.env;
  const { values } = parseArgs({
    options: {
      url: { type: 'string', default: env.AMQP_URL || DEFAULT_URL },
      queue: { type: 'string', default: env.QUEUE_NAME || DEFAULT_QUEUE },
      'secret-file': { type: 'string', default: env.WEBHOOK_SECRET_FILE },
      'signatures-file': { type: 'string', default: env.SIGNATURES_FILE },
      'max-messages': { type: 'string', default: env.MAX_MESSAGES || '0' },
      'idle-timeout': { type: 'string', default: env.IDLE_TIMEOUT_SECS || '0' },
      prefetch: { type: 'string', default: '20' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(`usage: node consumer.js [--url URL] [--queue NAME] [--secret-file FILE]
                        [--signatures-file FILE] [--max-messages N] [--idle-timeout SECS] [--prefetch N]
environment: AMQP_URL, QUEUE_NAME, WEBHOOK_SECRET_FILE or WEBHOOK_SECRET, SIGNATURES_FILE,
             MAX_MESSAGES, IDLE_TIMEOUT_SECS (0 = no limit / wait forever)`);
    process.exit(0);
  }
  let secret = null;
  if (values['secret-file']) {
    // One secret per file; a trailing newline is not part of it.
    secret = fs.readFileSync(values['secret-file']).toString('utf8').replace(/[\r\n]+$/, '');
  } else if (env.WEBHOOK_SECRET) {
    secret = env.WEBHOOK_SECRET;
  }
  let signatures = null;
  if (values['signatures-file']) {
    signatures = new Set(fs.readFileSync(values['signatures-file'], 'utf8').split('\n')
      .map((s) => s.trim().toLowerCase()).filter((s) => s && !s.startsWith('#')));
  }
  return {
    url: values.url,
    queue: values.queue,
    secret,
    signatures,
    maxMessages: Number(values['max-messages']),
    idleTimeoutMs: Number(values['idle-timeout']) * 1000,
    prefetch: Number(values.prefetch),
  };
}

async function main() {
  const opts = options();
  // In-memory only, so it forgets across restarts and grows without bound:
  // fine for an example. A real consumer records processed ids durably (e.g.
  // a unique key in its database, written in the same transaction as the
  // effect) because RabbitMQ delivers at least once.
  const seen = new Set(); // of JSON [source, id]: ids are unique per source
  let consumed = 0;
  let duplicates = 0;

  let connection;
  try {
    connection = await amqp.connect(opts.url);
  } catch (e) {
    console.error(`consumer: cannot connect: ${e.message}`);
    return 1;
  }
  const channel = await connection.createChannel();
  await channel.prefetch(opts.prefetch);

  let finish;
  const finished = new Promise((resolve) => { finish = resolve; });
  let idleTimer = null;
  const armIdle = () => {
    if (!opts.idleTimeoutMs) return;
    clearTimeout(idleTimer);
    idleTimer = setTimeout(() => finish(0), opts.idleTimeoutMs);
  };
  channel.on('close', () => finish(1));
  channel.on('error', (e) => console.error(`consumer: channel error: ${e.message}`));
  process.on('SIGINT', () => finish(0));
  process.on('SIGTERM', () => finish(0));

  let done = false;
  const onMessage = (msg) => {
    if (msg === null) { finish(1); return; } // consumer cancelled by the broker
    if (done) return; // arrived after we decided to stop; requeued on close
    armIdle();
    consumed += 1;
    const body = msg.content;
    let event;
    let data;
    let carriedAs;
    try {
      // Structured content mode: the SDK reads the event from the body.
      event = HTTP.toEvent({ headers: { 'content-type': msg.properties.contentType || '' }, body: body.toString('utf8') });
      event.validate();
      [data, carriedAs] = webhookBody(body, event);
    } catch (e) {
      const reason = String(e.message || e).split('\n')[0];
      console.log(`invalid delivery=${msg.fields.deliveryTag} message_id=${msg.properties.messageId || '-'} error=${JSON.stringify(reason)}`);
      channel.nack(msg, false, false);
      if (opts.maxMessages && consumed >= opts.maxMessages) { done = true; finish(0); }
      return;
    }

    const key = JSON.stringify([event.source, event.id]);
    const duplicate = seen.has(key);
    seen.add(key);
    if (duplicate) duplicates += 1;

    const patreon = event.type.startsWith(PATREON_TYPE_PREFIX);
    const digest = patreon && opts.secret !== null
      ? crypto.createHmac('md5', opts.secret).update(data).digest('hex')
      : null;
    let verified = patreon ? 'skipped' : 'n/a';
    if (digest !== null && opts.signatures !== null) {
      verified = [...opts.signatures].some((s) => s.length === digest.length
        && crypto.timingSafeEqual(Buffer.from(s), Buffer.from(digest))) ? 'true' : 'false';
    }
    const sha256 = crypto.createHash('sha256').update(data).digest('hex');

    // A real consumer does its work here, for non-duplicates only, and acks
    // after the work is durable.
    console.log(`event id=${event.id} type=${event.type} subject=${event.subject || '-'} `
      + `deliveryid=${event.deliveryid || '-'} data=${carriedAs} bytes=${data.length} sha256=${sha256} `
      + `verified=${verified} duplicate=${duplicate} hmac=${digest || '-'}`);
    channel.ack(msg);
    if (opts.maxMessages && consumed >= opts.maxMessages) { done = true; finish(0); }
  };

  try {
    await channel.consume(opts.queue, onMessage, { noAck: false });
  } catch (e) {
    console.error(`consumer: cannot consume from ${opts.queue}: ${e.message}`);
    console.log(`consumed=${consumed} duplicates=${duplicates}`);
    await connection.close().catch(() => {});
    return 1;
  }
  armIdle();

  const code = await finished;
  done = true;
  clearTimeout(idleTimer);
  console.log(`consumed=${consumed} duplicates=${duplicates}`);
  // Closing the connection returns unacked prefetched messages to the queue.
  await connection.close().catch(() => {});
  return code;
}

main().then((code) => { process.exitCode = code; }, (e) => {
  console.error(`consumer: ${e.stack || e}`);
  process.exitCode = 1;
});
