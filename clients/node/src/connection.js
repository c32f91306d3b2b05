// One stream to the agent: frames out, answers matched to their call by id.

import net from 'node:net';
import { FrameDecoder, encodeFrame } from './codec.js';
import { AgentUnavailable, SoftLBError, Timeout } from './errors.js';

// Worth retrying within the call's timeout: the agent is (re)starting, or a Unix socket's
// listen backlog is full for a moment.
const RETRYABLE = new Set(['ENOENT', 'ECONNREFUSED', 'ECONNRESET', 'EAGAIN']);

export class Connection {
  constructor() {
    this.socket = null;
    this.closed = false;
    this.pending = new Map(); // id -> {answer(msg), closed(err|null), stream}
    this.dec = new FrameDecoder();
  }

  /** Resolves once connected; rejects with the socket's error, or Timeout at `deadline`. */
  open(target, deadline) {
    return new Promise((resolve, reject) => {
      // One read buffer per connection, reused: no allocation per answer.
      const onread = { buffer: Buffer.allocUnsafe(READ_SIZE), callback: (n, buf) => this._onData(buf.subarray(0, n)) };
      const s = net.createConnection({ ...target, onread });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Timeout('connect'));
      }, Math.max(1, deadline - performance.now()));
      s.once('error', (e) => {
        clearTimeout(timer);
        s.destroy();
        reject(e);
      });
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        s.on('error', () => {}); // 'close' follows and says it
        s.on('close', () => this._onClose(null));
        if (target.port !== undefined) s.setNoDelay(true);
        s.unref(); // an idle client does not keep the process alive
        this.socket = s;
        resolve(this);
      });
    });
  }

  /** Write one request; `handler.answer` gets its answer(s), `handler.closed` the end. */
  send(id, msg, handler) {
    if (this.closed) {
      handler.closed(null); // it closed between our check and now: the retry-once case
      return;
    }
    if (this.pending.size === 0) this.socket.ref();
    this.pending.set(id, handler);
    this.socket.write(encodeFrame(msg));
  }

  forget(id) {
    this.pending.delete(id);
    if (this.pending.size === 0 && !this.closed) this.socket.unref();
  }

  /** Drop the stream; every call waiting on it hears `err` (null: "closed, retry"). */
  drop(err = null) {
    if (this.closed) return;
    this.socket.destroy();
    this._onClose(err);
  }

  _onData(chunk) {
    // `chunk` is a view of the socket's reused read buffer: decode what is whole now, and
    // keep a copy only of a partial frame's bytes.
    this.dec.feed(chunk);
    try {
      for (let msg = this.dec.next(); msg !== null; msg = this.dec.next()) this._dispatch(msg);
      this.dec.detach();
    } catch (e) {
      this.drop(e); // unparseable bytes: the stream cannot be re-framed
    }
  }

  _dispatch(msg) {
    const h = this.pending.get(msg.id);
    if (h !== undefined) {
      if (!h.stream) this.forget(msg.id);
      h.answer(msg);
    } else if ((msg.id === null || msg.id === undefined) && msg.error) {
      // A frame-level error (our frame was refused): no call to pin it on, so all fail.
      this.drop(new SoftLBError(String(msg.error.code), String(msg.error.message)));
    } // else a late answer to a call that gave up: ignored
  }

  _onClose(err) {
    if (this.closed) return;
    this.closed = true;
    const waiting = [...this.pending.values()];
    this.pending.clear();
    for (const h of waiting) h.closed(err);
  }
}

/** Bytes per read; above glibc's mmap threshold each read would map a fresh buffer. */
const READ_SIZE = 65536;

/** Connect, retrying refused/missing sockets with exponential backoff until `deadline`. */
export async function connect(target, where, deadline) {
  let delay = 5;
  for (;;) {
    try {
      return await new Connection().open(target, deadline);
    } catch (e) {
      if (e instanceof Timeout) throw new Timeout(`connecting to ${where} timed out`);
      if (!RETRYABLE.has(e.code) || performance.now() + delay >= deadline) {
        throw new AgentUnavailable(`cannot connect to the softlb agent at ${where}: ${e.message}`);
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 200);
    }
  }
}
