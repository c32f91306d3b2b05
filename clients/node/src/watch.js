// A watch: its own connection, re-established after agent restarts, with updates that only
// repeat the state the caller already has suppressed.

import { connect } from './connection.js';
import { resultOf } from './codec.js';

export class Watch {
  constructor(client, service, onUpdate, onError, onClose) {
    this.client = client;
    this.service = service;
    this.onUpdate = onUpdate;
    this.onError = onError ?? (() => {});
    this.onClose = onClose;
    this.closed = false;
    this.conn = null;
    this.last = undefined; // the view last delivered
  }

  /** Resolves after the first update was delivered; rejects on no agent or an error answer. */
  start() {
    return new Promise((resolve, reject) => {
      this._started = { resolve, reject };
      this._run().catch((e) => this._fail(e));
    });
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.onClose();
    if (this.conn) this.conn.drop();
  }

  _fail(err) {
    if (this._started) {
      const { reject } = this._started;
      this._started = null;
      reject(err);
    } else {
      this.onError(err);
    }
  }

  async _run() {
    let delay = 50;
    while (!this.closed) {
      try {
        this.conn = await connect(this.client._target, this.client._where, performance.now() + this.client.timeoutMs);
      } catch (e) {
        if (this._started) throw e; // no agent at all: say so at once
        // The agent is restarting (or upgrading): a watch is long-lived, so keep trying,
        // backing off to one attempt a second.
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 1000);
        continue;
      }
      delay = 50;
      if (this.closed) {
        this.conn.drop();
        break;
      }
      this.conn.socket.ref(); // a live watch keeps the process alive until closed
      await new Promise((ended) => {
        this.conn.send(1, { id: 1, op: 'watch', service: this.service }, {
          stream: true,
          answer: (msg) => this._answer(msg),
          closed: () => ended(),
        });
      });
    }
  }

  _answer(msg) {
    let update;
    try {
      update = resultOf(msg);
    } catch (e) {
      this._fail(e); // before the first update: the watch fails; later: onError
      return;
    }
    const view = watchView(update);
    if (this.last !== undefined && deepEqual(view, this.last)) return;
    this.last = view;
    try {
      this.onUpdate(update);
    } catch (e) {
      this.onError(e); // the caller's bug must not tear down the stream
    }
    if (this._started) {
      this._started.resolve();
      this._started = null;
    }
  }
}

/** What a watcher cares about: the set and its state, not counters that restart with the
 * agent (version) or move with the clock (age). */
function watchView(update) {
  if (update === null || typeof update !== 'object' || Array.isArray(update)) return update;
  const { version, age, ...rest } = update;
  return rest;
}

function deepEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (a instanceof Uint8Array || b instanceof Uint8Array) return Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0 && a instanceof Uint8Array && b instanceof Uint8Array;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  return ka.length === kb.length && ka.every((k) => Object.hasOwn(b, k) && deepEqual(a[k], b[k]));
}
