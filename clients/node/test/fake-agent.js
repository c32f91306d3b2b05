// A tiny agent speaking the wire protocol on a real socket, scripted per test.
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FrameDecoder, encodeFrame } from '../src/index.js';

export class FakeAgent {
  /** `handle(req, conn)` returns an answer map, or undefined to stay silent. */
  constructor(handle) {
    this.handle = handle;
    this.dir = mkdtempSync(join(tmpdir(), 'softlb-node-'));
    this.path = join(this.dir, 'agent.sock');
    this.connections = 0;
    this.requests = [];
    this.sockets = new Set();
  }

  listen(opts = { path: this.path }) {
    this.server = net.createServer((sock) => {
      this.connections++;
      this.sockets.add(sock);
      sock.on('close', () => this.sockets.delete(sock));
      sock.on('error', () => {});
      const d = new FrameDecoder();
      sock.on('data', (chunk) => {
        d.feed(chunk);
        for (let req = d.next(); req !== null; req = d.next()) {
          this.requests.push(req);
          const answer = this.handle(req, sock);
          if (answer !== undefined) sock.write(encodeFrame(answer));
        }
      });
    });
    return new Promise((resolve) => this.server.listen(opts, () => resolve(this)));
  }

  get addr() {
    return `127.0.0.1:${this.server.address().port}`;
  }

  /** Like an agent restart: drop every connection and stop listening. */
  async stop() {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }

  async cleanup() {
    if (this.server.listening) await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export const ok = (req, result) => ({ id: req.id, result });
export const endpoint = (id, extra = {}) => ({ address: '127.0.0.1', port: 8000, id, tags: [], meta: {}, weight: 1, node: '', zone: '', region: '', ...extra });
