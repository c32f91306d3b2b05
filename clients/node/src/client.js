// The client: one reused connection, pipelined calls, per-call timeouts, bounded reconnects.
//
// Resilience rules (docs/PROTOCOL.md, Clients):
// - A connection that closes before a call's answer arrives (the agent restarted, or a
//   stopping agent accepted it and closed it idle) gets the call sent once more on a new
//   connection, transparently: every op is safe to repeat.
// - Connecting is retried with exponential backoff (5 ms doubling) within the call's timeout.
// - A timeout drops the connection, so a late answer is never read as another call's.

import { connect } from './connection.js';
import { AgentUnavailable, Timeout } from './errors.js';
import { resultOf } from './codec.js';
import { defaultSocketPath, parseAddr } from './paths.js';
import { Watch } from './watch.js';

export const CLIENT_NAME = 'softlb-node/0.1.0';

export class Client {
  /**
   * @param {{socketPath?: string, addr?: string, timeoutMs?: number}} [opts]
   *   `addr` ("127.0.0.1:7070") selects loopback TCP; otherwise the Unix socket
   *   (default: the same discovery as the agent and the Python client).
   */
  constructor({ socketPath, addr, timeoutMs = 1000 } = {}) {
    if (addr) {
      const { host, port } = parseAddr(addr);
      this._target = { host, port };
      this._where = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
    } else {
      const path = socketPath || defaultSocketPath();
      this._target = { path };
      this._where = path;
    }
    this.timeoutMs = timeoutMs;
    this._conn = null;
    this._connecting = null;
    this._nextId = 0;
    this._watches = new Set();
  }

  /** One request; resolves to its result or rejects with a SoftLBError carrying `.code`. */
  async call(op, args = {}, { timeoutMs } = {}) {
    const ms = timeoutMs ?? this.timeoutMs;
    const deadline = performance.now() + ms;
    for (let attempt = 0; ; attempt++) {
      const conn = this._conn !== null && !this._conn.closed ? this._conn : await this._connection(deadline);
      const id = (this._nextId = (this._nextId + 1) & 0x7fffffff);
      const req = { id, op, ...args }; // id and op first, as the vectors pin them
      req.id = id; // never the caller's: answers are matched by it
      req.op = op;
      const msg = await this._exchange(conn, req, deadline, ms);
      if (msg !== null) return resultOf(msg);
      if (this._conn === conn) this._conn = null;
      if (attempt > 0) throw new AgentUnavailable('the agent closed the connection');
    }
  }

  /** The answer to `req`; null when the connection closed first (the retry-once case). */
  _exchange(conn, req, deadline, ms) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        conn.forget(req.id);
        // Drop the stream: the late answer must not be read as a later call's.
        conn.drop();
        if (this._conn === conn) this._conn = null;
        reject(new Timeout(`no answer from the agent within ${ms} ms`));
      }, Math.max(1, deadline - performance.now()));
      conn.send(req.id, req, {
        stream: false,
        answer: (msg) => {
          clearTimeout(timer);
          resolve(msg);
        },
        closed: (err) => {
          clearTimeout(timer);
          if (err) reject(err);
          else resolve(null);
        },
      });
    });
  }

  _connection(deadline) {
    // Concurrent (pipelined) first calls share one connect.
    if (this._connecting === null) {
      this._connecting = connect(this._target, this._where, deadline).then(
        (conn) => {
          this._connecting = null;
          this._conn = conn;
          return conn;
        },
        (err) => {
          this._connecting = null;
          throw err;
        },
      );
    }
    return this._connecting;
  }

  /** Version negotiation: the agent answers the highest version both speak. */
  hello({ versions = [1], client = CLIENT_NAME, timeoutMs } = {}) {
    return this.call('hello', { versions, client }, { timeoutMs });
  }

  /** Pick one endpoint. `key`: hash key (string or bytes); `tags`: all required. */
  resolve(service, { key, tags, lease = true, timeoutMs } = {}) {
    const args = { service };
    if (key !== undefined && key !== null) args.key = key;
    if (tags && tags.length) args.tags = [...tags];
    if (!lease) args.lease = false;
    return this.call('resolve', args, { timeoutMs });
  }

  /** Feed an outcome back: by `lease`, or by `service` + `endpoint` id. */
  async report({ lease, ok = true, latency, service, endpoint, timeoutMs } = {}) {
    const args = { ok };
    for (const [k, v] of [['lease', lease], ['latency', latency], ['service', service], ['endpoint', endpoint]]) {
      if (v !== undefined && v !== null) args[k] = v;
    }
    await this.call('report', args, { timeoutMs });
  }

  services({ timeoutMs } = {}) {
    return this.call('services', {}, { timeoutMs });
  }

  endpoints(service, { timeoutMs } = {}) {
    return this.call('endpoints', { service }, { timeoutMs });
  }

  /**
   * Stream a service's endpoint set to `onUpdate`: now, and after every change, on a
   * connection of its own that survives agent restarts. Resolves to a Watch (`.close()`)
   * once the first update was delivered; rejects if there is no agent or no such service.
   */
  async watch(service, onUpdate, { onError } = {}) {
    const w = new Watch(this, service, onUpdate, onError, () => this._watches.delete(w));
    this._watches.add(w);
    try {
      await w.start();
    } catch (e) {
      w.close();
      throw e;
    }
    return w;
  }

  /** Drop the connection and end every watch. The client stays usable (it reconnects). */
  close() {
    for (const w of [...this._watches]) w.close();
    const conn = this._conn;
    this._conn = null;
    if (conn) conn.drop(new AgentUnavailable('the client was closed'));
  }
}
