// Errors. An error answer from the agent is a SoftLBError whose `code` is the protocol's
// stable code (UNKNOWN_SERVICE, NO_HEALTHY_ENDPOINT, ...); the client's own failures are
// subclasses with codes of their own, the same ones the Python client uses.

export class SoftLBError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'SoftLBError';
    this.code = code;
    this.detail = message;
  }
}

/** The agent could not be reached (not running, socket missing, connection refused). */
export class AgentUnavailable extends SoftLBError {
  constructor(message) {
    super('AGENT_UNAVAILABLE', message);
    this.name = 'AgentUnavailable';
  }
}

/** No answer within the call's timeout (the connection was dropped). */
export class Timeout extends SoftLBError {
  constructor(message) {
    super('TIMEOUT', message);
    this.name = 'Timeout';
  }
}

/** The agent's bytes did not parse as protocol v1 frames. */
export class ProtocolError extends SoftLBError {
  constructor(message) {
    super('PROTOCOL_ERROR', message);
    this.name = 'ProtocolError';
  }
}
