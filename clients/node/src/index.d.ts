// Types for softlb-client (the implementation is plain ESM in this folder).

export const CLIENT_NAME: string;
export const SYSTEM_SOCKET: string;
export const MAX_FRAME: number;

/** An error answer from the agent (`code`: UNKNOWN_SERVICE, NO_HEALTHY_ENDPOINT, ...), or
 * one of the client's own: AGENT_UNAVAILABLE, TIMEOUT, PROTOCOL_ERROR. */
export class SoftLBError extends Error {
  constructor(code: string, message: string);
  readonly code: string;
  readonly detail: string;
}
export class AgentUnavailable extends SoftLBError {}
export class Timeout extends SoftLBError {}
export class ProtocolError extends SoftLBError {}

export interface Endpoint {
  address: string;
  port: number;
  id: string;
  tags: string[];
  meta: Record<string, string>;
  weight: number;
  node: string;
  zone: string;
  region: string;
  [newerField: string]: unknown;
}

export interface Resolved extends Endpoint {
  lease: number | null;
  panic: boolean;
  stale: boolean;
  age?: number;
}

export interface EndpointSet {
  service: string;
  policy: string;
  version: number;
  panic: boolean;
  stale: boolean;
  age?: number | null;
  endpoints: Array<Endpoint & { registry: string; eligible: boolean; [k: string]: unknown }>;
  [newerField: string]: unknown;
}

export interface ServiceSummary {
  name: string;
  policy: string;
  endpoints: number;
  eligible: number;
  panic: boolean;
  stale: boolean;
  [newerField: string]: unknown;
}

export interface HelloResult {
  version: number;
  agent: string;
  ops: string[];
  max_frame: number;
  [newerField: string]: unknown;
}

export interface CallOptions {
  /** This call's timeout (default: the client's `timeoutMs`). */
  timeoutMs?: number;
}

export interface Watch {
  readonly service: string;
  readonly closed: boolean;
  close(): void;
}

export class Client {
  constructor(opts?: { socketPath?: string; addr?: string; timeoutMs?: number });
  timeoutMs: number;
  call(op: string, args?: Record<string, unknown>, opts?: CallOptions): Promise<unknown>;
  hello(opts?: { versions?: number[]; client?: string } & CallOptions): Promise<HelloResult>;
  resolve(service: string, opts?: { key?: string | Uint8Array; tags?: string[]; lease?: boolean } & CallOptions): Promise<Resolved>;
  report(opts: { lease?: number; ok?: boolean; latency?: number; service?: string; endpoint?: string } & CallOptions): Promise<void>;
  services(opts?: CallOptions): Promise<ServiceSummary[]>;
  endpoints(service: string, opts?: CallOptions): Promise<EndpointSet>;
  watch(service: string, onUpdate: (update: EndpointSet) => void, opts?: { onError?: (err: Error) => void }): Promise<Watch>;
  close(): void;
}

export function defaultSocketPath(env?: Record<string, string | undefined>, probe?: { uid?: number; exists?: (path: string) => boolean }): string;
export function parseAddr(addr: string): { host: string; port: number };
export function encodeFrame(msg: Record<string, unknown>): Buffer;
export class FrameDecoder {
  feed(chunk: Buffer): void;
  next(): Record<string, unknown> | null;
}
export function resultOf(msg: Record<string, unknown>): unknown;
