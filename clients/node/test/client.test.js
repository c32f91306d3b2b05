// The client against a scripted agent on a real Unix socket / loopback port: frames sent,
// answers matched, timeouts, the transparent retry, reconnects, watches across restarts.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { AgentUnavailable, Client, SoftLBError, Timeout, encodeFrame } from '../src/index.js';
import { FakeAgent, endpoint, ok } from './fake-agent.js';

async function withAgent(handle, fn, listenOpts) {
  const agent = new FakeAgent(handle);
  await agent.listen(listenOpts);
  try {
    await fn(agent);
  } finally {
    await agent.cleanup();
  }
}

test('calls send the documented frames and return results', () =>
  withAgent((req) => ok(req, req.op === 'resolve' ? { ...endpoint('web-1'), lease: 3, panic: false, stale: false } : {}), async (agent) => {
    const c = new Client({ socketPath: agent.path });
    assert.equal((await c.resolve('web')).id, 'web-1');
    await c.resolve('web', { key: 'user:42', tags: ['v2'], lease: false });
    await c.report({ lease: 3, ok: false, latency: 0.25 });
    await c.report({ service: 'web', endpoint: 'web-1' });
    await c.hello({ versions: [1, 2] });
    const sent = agent.requests.map(({ id, ...rest }) => rest);
    assert.deepEqual(sent, [
      { op: 'resolve', service: 'web' },
      { op: 'resolve', service: 'web', key: 'user:42', tags: ['v2'], lease: false },
      { op: 'report', ok: false, lease: 3, latency: 0.25 },
      { op: 'report', ok: true, service: 'web', endpoint: 'web-1' },
      { op: 'hello', versions: [1, 2], client: 'softlb-node/0.1.0' },
    ]);
    assert.equal(agent.connections, 1, 'one reused connection');
    c.close();
  }));

test('error answers reject with a SoftLBError carrying the protocol code', () =>
  withAgent((req) => ({ id: req.id, error: { code: 'UNKNOWN_SERVICE', message: 'unknown service "nope"' } }), async (agent) => {
    const c = new Client({ socketPath: agent.path });
    await assert.rejects(c.resolve('nope'), (e) => e instanceof SoftLBError && e instanceof Error && e.code === 'UNKNOWN_SERVICE' && e.detail === 'unknown service "nope"');
    c.close();
  }));

test('pipelined calls share one connection and get their own answers, in any order', async () => {
  let held = [];
  await withAgent((req, sock) => {
    held.push(req);
    if (held.length === 20) {
      // Answer in reverse order: the client must match by id, not by position.
      for (const r of held.reverse()) sock.write(encodeAnswer(r));
      held = [];
    }
    return undefined;
  }, async (agent) => {
    const c = new Client({ socketPath: agent.path });
    const ids = await Promise.all(Array.from({ length: 20 }, (_, i) => c.resolve(`svc-${i}`, { lease: false }).then((r) => r.id)));
    assert.deepEqual(ids, Array.from({ length: 20 }, (_, i) => `svc-${i}`));
    assert.equal(agent.connections, 1);
    c.close();
  });
});

function encodeAnswer(req) {
  return encodeFrame(ok(req, { ...endpoint(req.service), lease: null, panic: false, stale: false }));
}

test('a timeout rejects, drops the connection, and the next call works on a new one', async () => {
  let silent = true;
  await withAgent((req) => (silent ? undefined : ok(req, { ...endpoint('web-2'), lease: null })), async (agent) => {
    const c = new Client({ socketPath: agent.path, timeoutMs: 2000 });
    const t0 = performance.now();
    await assert.rejects(c.resolve('web', { timeoutMs: 150 }), (e) => e instanceof Timeout && e.code === 'TIMEOUT');
    const took = performance.now() - t0;
    assert.ok(took >= 140 && took < 1500, `timed out after ${took} ms`);
    await sleep(20);
    assert.equal(agent.sockets.size, 0, 'the timed-out connection was dropped');
    silent = false;
    assert.equal((await c.resolve('web')).id, 'web-2');
    assert.equal(agent.connections, 2);
    c.close();
  });
});

test('a connection closed before the answer is retried once, transparently', async () => {
  let drops = 1;
  await withAgent((req, sock) => {
    if (drops > 0) {
      drops--;
      sock.destroy(); // the agent restarted with our request unanswered
      return undefined;
    }
    return ok(req, []);
  }, async (agent) => {
    const c = new Client({ socketPath: agent.path });
    assert.deepEqual(await c.services(), []);
    assert.equal(agent.connections, 2);
    drops = 2;
    await assert.rejects(c.services(), (e) => e instanceof AgentUnavailable && e.code === 'AGENT_UNAVAILABLE');
    assert.equal(agent.requests.length, 4, 'one retry, not more');
    c.close();
  });
});

test('an idle connection the agent closed is replaced without an error', () =>
  withAgent((req) => ok(req, []), async (agent) => {
    const c = new Client({ socketPath: agent.path });
    await c.services();
    for (const s of agent.sockets) s.destroy();
    await sleep(20);
    assert.deepEqual(await c.services(), []);
    assert.equal(agent.connections, 2);
    c.close();
  }));

test('connecting retries with backoff until the agent listens, within the timeout', async () => {
  const agent = new FakeAgent((req) => ok(req, []));
  const c = new Client({ socketPath: agent.path, timeoutMs: 3000 });
  const call = c.services();
  await sleep(150);
  await agent.listen();
  try {
    assert.deepEqual(await call, []);
  } finally {
    c.close();
    await agent.cleanup();
  }
});

test('no agent: AgentUnavailable once the timeout is spent', async () => {
  const c = new Client({ socketPath: '/nonexistent/softlb.sock', timeoutMs: 100 });
  const t0 = performance.now();
  await assert.rejects(c.resolve('web'), (e) => e instanceof AgentUnavailable && /cannot connect/.test(e.message));
  assert.ok(performance.now() - t0 < 1000);
});

test('loopback TCP works the same', () =>
  withAgent((req) => ok(req, [{ name: 'web' }]), async (agent) => {
    const c = new Client({ addr: agent.addr });
    assert.deepEqual(await c.services(), [{ name: 'web' }]);
    c.close();
  }, { host: '127.0.0.1', port: 0 }));

test('newer agents: unknown result fields and answer keys pass through harmlessly', () =>
  withAgent((req) => ({ id: req.id, result: { ...endpoint('web-1'), lease: 9, cost: 3, hints: { retry: true } }, trace: 'x' }), async (agent) => {
    const c = new Client({ socketPath: agent.path });
    const r = await c.resolve('web');
    assert.equal(r.id, 'web-1');
    assert.equal(r.cost, 3);
    c.close();
  }));

test('a frame-level error (id nil) fails the calls in flight instead of hanging them', () =>
  withAgent((req) => ({ id: null, error: { code: 'BAD_FRAME', message: 'frame body is not valid msgpack' } }), async (agent) => {
    const c = new Client({ socketPath: agent.path, timeoutMs: 5000 });
    await assert.rejects(c.services(), (e) => e.code === 'BAD_FRAME');
    c.close();
  }));

test('a watch survives an agent restart and repeats no unchanged set', async () => {
  const set = (ids, version) => ({ service: 'web', policy: 'round_robin', version, panic: false, stale: false, age: Math.random(), endpoints: ids.map((id) => endpoint(id)) });
  let current = set(['web-1', 'web-2'], 1);
  let watchSock = null;
  const agent = new FakeAgent((req, sock) => {
    if (req.op !== 'watch') return ok(req, {});
    watchSock = { sock, id: req.id };
    return ok(req, current);
  });
  await agent.listen();
  const updates = [];
  const c = new Client({ socketPath: agent.path, timeoutMs: 1000 });
  try {
    const w = await c.watch('web', (u) => updates.push(u.endpoints.map((e) => e.id)));
    assert.deepEqual(updates, [['web-1', 'web-2']]);
    await agent.stop(); // restart: the new agent numbers versions afresh
    current = set(['web-1', 'web-2'], 1);
    await sleep(100);
    await agent.listen();
    const deadline = performance.now() + 5000;
    while (agent.requests.filter((r) => r.op === 'watch').length < 2 && performance.now() < deadline) await sleep(20);
    assert.equal(agent.requests.filter((r) => r.op === 'watch').length, 2, 're-watched');
    await sleep(50);
    assert.deepEqual(updates, [['web-1', 'web-2']], 'no duplicate of the unchanged set');
    watchSock.sock.write(encodeFrame(ok({ id: watchSock.id }, set(['web-1', 'web-2', 'web-3'], 2))));
    while (updates.length < 2 && performance.now() < deadline) await sleep(10);
    assert.deepEqual(updates[1], ['web-1', 'web-2', 'web-3']);
    w.close();
    assert.ok(w.closed);
  } finally {
    c.close();
    await agent.cleanup();
  }
});

test('watching an unknown service rejects with its code', () =>
  withAgent((req) => ({ id: req.id, error: { code: 'UNKNOWN_SERVICE', message: 'nope' } }), async (agent) => {
    const c = new Client({ socketPath: agent.path });
    await assert.rejects(c.watch('nope', () => {}), (e) => e.code === 'UNKNOWN_SERVICE');
    c.close();
  }));

test('answers split across reads decode whole (the read buffer is reused between reads)', async () => {
  const held = [];
  await withAgent((req, sock) => {
    held.push(req);
    if (held.length < 2) return undefined;
    // Answer 1 and the head of answer 2 in one read; the tail of answer 2, longer than
    // what came before it, in the next: it lands where the head was in the read buffer.
    const [first, second] = held.map((r) => encodeFrame(ok(r, { ...endpoint(r.service), pad: 'x'.repeat(r.service === 'beta' ? 600 : 0) })));
    sock.write(Buffer.concat([first, second.subarray(0, 40)]));
    setTimeout(() => sock.write(second.subarray(40)), 30);
    return undefined;
  }, async (agent) => {
    const c = new Client({ socketPath: agent.path });
    const [a, b] = await Promise.all([c.resolve('alpha'), c.resolve('beta')]);
    assert.deepEqual([a.id, b.id, b.pad.length], ['alpha', 'beta', 600]);
    c.close();
  });
});

test("a watch callback that throws reaches onError; the stream goes on", async () => {
  let watchSock = null;
  const set = (n) => ({ service: 'web', version: n, endpoints: Array.from({ length: n }, (_, i) => endpoint(`web-${i}`)) });
  await withAgent((req, sock) => {
    watchSock = { sock, id: req.id };
    return ok(req, set(1));
  }, async (agent) => {
    const c = new Client({ socketPath: agent.path });
    const seen = [];
    const errors = [];
    const w = await c.watch('web', (u) => {
      seen.push(u.endpoints.length);
      throw new Error('caller bug');
    }, { onError: (e) => errors.push(e.message) });
    watchSock.sock.write(encodeFrame(ok({ id: watchSock.id }, set(2))));
    const deadline = performance.now() + 3000;
    while (seen.length < 2 && performance.now() < deadline) await sleep(10);
    assert.deepEqual(seen, [1, 2]);
    assert.deepEqual(errors, ['caller bug', 'caller bug']);
    assert.equal(agent.connections, 1);
    w.close();
    c.close();
  });
});
