// The shared wire vectors (tests/wire_vectors/vectors.json) against this client's codec.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { FrameDecoder, ProtocolError, SoftLBError, encodeFrame, resultOf } from '../src/index.js';

const VECTORS = JSON.parse(readFileSync(new URL('../../../tests/wire_vectors/vectors.json', import.meta.url), 'utf8'));
const byKind = (kind) => VECTORS.filter((v) => v.kind === kind);
const named = (name) => Buffer.from(VECTORS.find((v) => v.name === name).hex, 'hex');

test('there are vectors of every kind', () => {
  for (const kind of ['request', 'response', 'invalid']) assert.ok(byKind(kind).length > 0, kind);
});

for (const v of byKind('request')) {
  test(`request ${v.name} encodes to the vector bytes`, () => {
    assert.equal(encodeFrame(v.value).toString('hex'), v.hex);
  });
}

for (const v of byKind('response')) {
  test(`response ${v.name} decodes to the vector value, split anywhere`, () => {
    const raw = Buffer.from(v.hex, 'hex');
    const d = new FrameDecoder();
    for (let i = 0; i < raw.length; i++) d.feed(raw.subarray(i, i + 1));
    const msg = d.next();
    assert.deepEqual(msg, v.value);
    assert.equal(d.next(), null);
    if (msg.error) {
      assert.throws(() => resultOf(msg), (e) => e instanceof SoftLBError && e.code === msg.error.code);
    } else {
      assert.deepEqual(resultOf(msg), v.value.result);
    }
  });
}

test('two frames in one chunk come out one by one', () => {
  const d = new FrameDecoder();
  d.feed(Buffer.concat([named('report_result'), named('hello_result')]));
  assert.equal(d.next().id, 5);
  assert.equal(d.next().id, 1);
  assert.equal(d.next(), null);
});

for (const name of ['length_over_max', 'body_not_msgpack', 'body_not_a_map']) {
  test(`invalid ${name} is a ProtocolError`, () => {
    const d = new FrameDecoder();
    d.feed(named(name));
    assert.throws(() => d.next(), (e) => e instanceof ProtocolError && e.code === 'PROTOCOL_ERROR');
  });
}

test('a truncated frame waits for the rest', () => {
  const d = new FrameDecoder();
  d.feed(named('truncated'));
  assert.equal(d.next(), null);
});

test('frames the agent refuses (missing id, unknown op) are still maps to a decoder', () => {
  for (const name of ['missing_id', 'unknown_op']) {
    const d = new FrameDecoder();
    d.feed(named(name));
    assert.equal(typeof d.next(), 'object');
  }
});
