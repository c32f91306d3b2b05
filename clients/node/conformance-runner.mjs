// Conformance runner (tests/conformance/RUNNER.md): JSON lines on stdin drive this client's
// public API; one JSON line per reply or watch event on stdout.

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { isDeepStrictEqual } from 'node:util';
import { AgentUnavailable, Client, FrameDecoder, ProtocolError, SoftLBError, Timeout, encodeFrame, resultOf } from './src/index.js';

let client = null;
const watches = new Map();

function emit(obj) {
  process.stdout.write(JSON.stringify(obj, (k, v) => (v instanceof Uint8Array ? Buffer.from(v).toString('hex') : v)) + '\n');
}

function errorOf(e) {
  let code = 'CLIENT';
  if (e instanceof Timeout) code = 'TIMEOUT';
  else if (e instanceof AgentUnavailable) code = 'UNAVAILABLE_AGENT';
  else if (e instanceof ProtocolError) code = 'CLIENT';
  else if (e instanceof SoftLBError) code = e.code;
  return { code, message: String(e.detail ?? e.message ?? e) };
}

/** The shared vectors through this client's codec (tests/wire_vectors/vectors.json). */
function vectors(path) {
  let passed = 0;
  const failed = [];
  for (const v of JSON.parse(readFileSync(path, 'utf8'))) {
    let ok = false;
    try {
      const raw = Buffer.from(v.hex, 'hex');
      if (v.kind === 'request') {
        ok = encodeFrame(v.value).toString('hex') === v.hex;
      } else if (v.kind === 'response') {
        const d = new FrameDecoder();
        for (let i = 0; i < raw.length; i++) d.feed(raw.subarray(i, i + 1)); // any split
        const msg = d.next();
        ok = isDeepStrictEqual(msg, v.value) && d.next() === null;
        if (ok && msg.error) {
          try {
            resultOf(msg);
            ok = false;
          } catch (e) {
            ok = e.code === msg.error.code;
          }
        }
      } else {
        ok = invalidHandled(v, raw);
      }
    } catch {
      ok = false;
    }
    if (ok) passed++;
    else failed.push(v.name);
  }
  return { passed, failed };
}

// A client decoder's side of the "invalid" vectors (RUNNER.md): frames it cannot take are
// rejected, a truncated frame waits, and requests the agent refuses still decode as maps.
function invalidHandled(v, raw) {
  const d = new FrameDecoder();
  d.feed(raw);
  const rejects = () => {
    try {
      d.next();
      return false;
    } catch (e) {
      return e instanceof ProtocolError;
    }
  };
  if (v.name === 'truncated') return d.next() === null;
  if (['length_over_max', 'body_not_msgpack', 'body_not_a_map'].includes(v.name)) return rejects();
  const msg = d.next();
  return msg !== null && typeof msg === 'object';
}

async function run(cmd) {
  const opt = (x) => (x === null ? undefined : x);
  switch (cmd.cmd) {
    case 'connect': {
      if (client) client.close();
      const addr = cmd.addr;
      const timeoutMs = (cmd.timeout ?? 1.0) * 1000;
      client = addr.startsWith('/') ? new Client({ socketPath: addr, timeoutMs }) : new Client({ addr, timeoutMs });
      return {};
    }
    case 'hello':
      return client.hello({ versions: cmd.versions ?? [1] });
    case 'resolve':
      return client.resolve(cmd.service, { key: opt(cmd.key), tags: opt(cmd.tags), lease: cmd.lease ?? true });
    case 'report':
      await client.report({ lease: opt(cmd.lease), ok: cmd.ok ?? true, latency: opt(cmd.latency), service: opt(cmd.service), endpoint: opt(cmd.endpoint) });
      return {};
    case 'services':
      return client.services();
    case 'endpoints':
      return client.endpoints(cmd.service);
    case 'pipeline': {
      const all = await Promise.all(Array.from({ length: cmd.n }, () => client.resolve(cmd.service, { lease: false })));
      return all.map((r) => r.id);
    }
    case 'bench': {
      await client.resolve(cmd.service, { lease: false });
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < cmd.n; i++) await client.resolve(cmd.service, { lease: false });
      return { seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
    }
    case 'watch': {
      const name = cmd.name;
      const w = await client.watch(cmd.service, (update) => emit({ event: 'watch', watch: name, update }), {
        onError: (e) => emit({ event: 'watch_error', watch: name, error: errorOf(e) }),
      });
      watches.set(name, w);
      return {};
    }
    case 'unwatch':
      watches.get(cmd.name)?.close();
      watches.delete(cmd.name);
      return {};
    case 'set_timeout':
      client.timeoutMs = cmd.timeout * 1000;
      return {};
    case 'vectors':
      return vectors(cmd.path);
    case 'close':
      for (const w of watches.values()) w.close();
      watches.clear();
      client?.close();
      return {};
    case 'exit':
      return {};
    default:
      throw new Error(`unknown command ${JSON.stringify(cmd.cmd)}`);
  }
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    emit({ seq: null, ok: false, error: { code: 'CLIENT', message: `bad command line: ${e.message}` } });
    continue;
  }
  try {
    emit({ seq: cmd.seq, ok: true, result: await run(cmd) });
  } catch (e) {
    emit({ seq: cmd.seq, ok: false, error: errorOf(e) });
  }
  if (cmd.cmd === 'exit') break;
}
for (const w of watches.values()) w.close();
client?.close();
process.exit(0);
