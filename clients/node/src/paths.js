// Where the agent's Unix socket lives by default: the same rule as the Python client
// (clients/python/softlb_client/_paths.py) and the agent itself.

import { existsSync } from 'node:fs';
import { join } from 'node:path';

/** Where the system agent (systemd units, root) serves every caller on the host. */
export const SYSTEM_SOCKET = '/run/softlb/softlb.sock';

/**
 * $SOFTLB_SOCKET, else systemd's $RUNTIME_DIRECTORY, else the system socket when it exists
 * or we are root, else a per-user socket in $XDG_RUNTIME_DIR/softlb or /tmp/softlb-<uid>.
 */
export function defaultSocketPath(env = process.env, { uid = process.geteuid(), exists = existsSync } = {}) {
  if (env.SOFTLB_SOCKET) return env.SOFTLB_SOCKET;
  if (env.RUNTIME_DIRECTORY) return join(env.RUNTIME_DIRECTORY.split(':')[0], 'softlb.sock');
  // A host agent serves every user: non-root callers must find it without configuration.
  if (uid === 0 || exists(SYSTEM_SOCKET)) return SYSTEM_SOCKET;
  if (env.XDG_RUNTIME_DIR) return join(env.XDG_RUNTIME_DIR, 'softlb', 'softlb.sock');
  return `/tmp/softlb-${uid}/softlb.sock`;
}

/** "HOST:PORT" (or "[v6]:PORT", ":PORT") -> {host, port}. */
export function parseAddr(addr) {
  const i = addr.lastIndexOf(':');
  const port = addr.slice(i + 1);
  if (i < 0 || !/^\d+$/.test(port)) throw new TypeError(`expected HOST:PORT, got ${JSON.stringify(addr)}`);
  const host = addr.slice(0, i).replace(/^\[|\]$/g, '') || '127.0.0.1';
  return { host, port: Number(port) };
}
