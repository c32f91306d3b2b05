// Frames: a 4-byte big-endian length, then one msgpack map (docs/PROTOCOL.md, Framing).

import { Decoder, Encoder } from '@msgpack/msgpack';
import { ProtocolError, SoftLBError } from './errors.js';

/** The largest answer we accept; a `watch` of a huge service is the biggest real one. */
export const MAX_FRAME = 64 << 20;

const encoder = new Encoder();
const decoder = new Decoder();

/** One request map -> one frame (keys in insertion order, as the vectors pin). */
export function encodeFrame(msg) {
  const body = encoder.encodeSharedRef(msg);
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  frame.set(body, 4);
  return frame;
}

/** Reassembles frames from stream chunks split anywhere. */
export class FrameDecoder {
  constructor() {
    this.buf = Buffer.alloc(0);
  }

  feed(chunk) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
  }

  /** Copy what is left out of a borrowed (reused) buffer before the next read overwrites it. */
  detach() {
    if (this.buf.length) this.buf = Buffer.from(this.buf);
  }

  /** The next whole message, or null until more bytes arrive. Throws ProtocolError. */
  next() {
    const buf = this.buf;
    if (buf.length < 4) return null;
    const n = buf.readUInt32BE(0);
    if (n > MAX_FRAME) throw new ProtocolError(`answer frame of ${n} bytes is over the limit`);
    if (buf.length < 4 + n) return null;
    const body = buf.subarray(4, 4 + n);
    this.buf = buf.subarray(4 + n);
    let msg;
    try {
      msg = decoder.decode(body);
    } catch (e) {
      throw new ProtocolError(`undecodable answer: ${e.message}`);
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg) || msg instanceof Uint8Array) {
      throw new ProtocolError('answer is not a map');
    }
    return msg;
  }
}

/** An answer's result, or throw its error with the agent's code. */
export function resultOf(msg) {
  const err = msg.error;
  if (err !== undefined && err !== null) {
    if (typeof err !== 'object') throw new ProtocolError(`malformed error answer: ${JSON.stringify(err)}`);
    throw new SoftLBError(String(err.code ?? 'UNKNOWN'), String(err.message ?? ''));
  }
  return msg.result;
}
