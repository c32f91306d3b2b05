// Socket discovery: the same rule as the Python client (softlb_client/_paths.py).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SYSTEM_SOCKET, defaultSocketPath, parseAddr } from '../src/index.js';

test('SOFTLB_SOCKET wins, then systemd RUNTIME_DIRECTORY', () => {
  assert.equal(defaultSocketPath({ SOFTLB_SOCKET: '/x/s.sock', RUNTIME_DIRECTORY: '/r' }), '/x/s.sock');
  assert.equal(defaultSocketPath({ RUNTIME_DIRECTORY: '/run/softlb:/run/other' }), '/run/softlb/softlb.sock');
});

test('the system socket for root, or for anyone when it exists; else per-user sockets', () => {
  const none = () => false;
  assert.equal(defaultSocketPath({ XDG_RUNTIME_DIR: '/run/user/7' }, { uid: 0, exists: none }), SYSTEM_SOCKET);
  assert.equal(defaultSocketPath({ XDG_RUNTIME_DIR: '/run/user/7' }, { uid: 7, exists: (p) => p === SYSTEM_SOCKET }), SYSTEM_SOCKET);
  assert.equal(defaultSocketPath({ XDG_RUNTIME_DIR: '/run/user/7' }, { uid: 7, exists: none }), '/run/user/7/softlb/softlb.sock');
  assert.equal(defaultSocketPath({}, { uid: 7, exists: none }), '/tmp/softlb-7/softlb.sock');
});

test('addresses parse like the Python client', () => {
  assert.deepEqual(parseAddr('127.0.0.1:7070'), { host: '127.0.0.1', port: 7070 });
  assert.deepEqual(parseAddr('[::1]:7070'), { host: '::1', port: 7070 });
  assert.deepEqual(parseAddr(':7070'), { host: '127.0.0.1', port: 7070 });
  assert.throws(() => parseAddr('localhost'), TypeError);
  assert.throws(() => parseAddr('h:port'), TypeError);
});
