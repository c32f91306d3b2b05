// Thin Node.js client for the softlb agent (wire protocol v1, docs/PROTOCOL.md).
export { Client, CLIENT_NAME } from './client.js';
export { SoftLBError, AgentUnavailable, Timeout, ProtocolError } from './errors.js';
export { defaultSocketPath, parseAddr, SYSTEM_SOCKET } from './paths.js';
export { encodeFrame, FrameDecoder, resultOf, MAX_FRAME } from './codec.js';
