package softlb

import "fmt"

// Code is a stable protocol error code (docs/PROTOCOL.md), or one of the client's own.
type Code string

// The agent's codes: stable, never renamed or reused.
const (
	CodeBadFrame           Code = "BAD_FRAME"
	CodeFrameTooLarge      Code = "FRAME_TOO_LARGE"
	CodeUnknownOp          Code = "UNKNOWN_OP"
	CodeBadArgument        Code = "BAD_ARGUMENT"
	CodeUnsupportedVersion Code = "UNSUPPORTED_VERSION"
	CodeUnknownService     Code = "UNKNOWN_SERVICE"
	CodeNoHealthyEndpoint  Code = "NO_HEALTHY_ENDPOINT"
	CodeUnknownLease       Code = "UNKNOWN_LEASE"
	CodeUnavailable        Code = "UNAVAILABLE"
	CodeInternal           Code = "INTERNAL"
)

// The client's own codes, the same as the Python client's.
const (
	// CodeTimeout: no answer before the call's deadline (the error wraps
	// context.DeadlineExceeded).
	CodeTimeout Code = "TIMEOUT"
	// CodeAgentUnavailable: the agent could not be reached, or went away twice in one call.
	CodeAgentUnavailable Code = "AGENT_UNAVAILABLE"
	// CodeProtocol: the agent's bytes did not parse as protocol frames.
	CodeProtocol Code = "PROTOCOL_ERROR"
)

// Error is every error this package returns for a call, but a caller's own cancellation
// (context.Canceled). Match it by code with errors.Is against the sentinels below, or
// read Code with errors.As.
type Error struct {
	Code    Code
	Message string
	Err     error // the cause, when there is one (a dial error, context.DeadlineExceeded)
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

func (e *Error) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrUnknownService) true for any *Error with that code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Err == nil && t.Code == e.Code
}

// Sentinels for errors.Is, one per code.
var (
	ErrBadFrame           = &Error{Code: CodeBadFrame}
	ErrFrameTooLarge      = &Error{Code: CodeFrameTooLarge}
	ErrUnknownOp          = &Error{Code: CodeUnknownOp}
	ErrBadArgument        = &Error{Code: CodeBadArgument}
	ErrUnsupportedVersion = &Error{Code: CodeUnsupportedVersion}
	ErrUnknownService     = &Error{Code: CodeUnknownService}
	ErrNoHealthyEndpoint  = &Error{Code: CodeNoHealthyEndpoint}
	ErrUnknownLease       = &Error{Code: CodeUnknownLease}
	ErrUnavailable        = &Error{Code: CodeUnavailable}
	ErrInternal           = &Error{Code: CodeInternal}
	ErrTimeout            = &Error{Code: CodeTimeout}
	ErrAgentUnavailable   = &Error{Code: CodeAgentUnavailable}
	ErrProtocol           = &Error{Code: CodeProtocol}
)
