// Package softlb is the Go client of the softlb agent (docs/PROTOCOL.md): resolve a
// service to one endpoint, report how the call went, list services and endpoints, and
// watch a service's endpoint set.
//
// One Client holds one connection, shared by every goroutine: calls are pipelined and
// their answers matched by id. Each call is bounded by its context's deadline, or by
// Options.Timeout when the context has none. A timed-out call drops the connection (an
// agent that stopped answering is not trusted with the next call); calls in flight on it
// are sent again on a new one. A connection the agent closed before answering (a restart) is retried once,
// transparently, and connecting is retried with exponential backoff within the deadline.
package softlb

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"softlb/clients/go/internal/wire"
)

// Options says where the agent is and how long calls may take. The zero value is the
// default socket (DefaultSocketPath) and a one-second timeout.
type Options struct {
	Socket  string        // Unix socket path; "" is DefaultSocketPath()
	Addr    string        // loopback "host:port"; when set, used instead of Socket
	Timeout time.Duration // per call, for contexts without a deadline; 0 is one second
	Name    string        // sent in hello; "" is "softlb-go/0.1"
}

// Client talks to one agent. Safe for concurrent use; create it once and share it.
type Client struct {
	network, address string
	timeout          int64 // atomic, nanoseconds: see SetTimeout
	name             string

	nextID  uint64 // atomic
	version int64  // atomic: what hello negotiated; 1 until then

	mu      sync.Mutex
	cur     *conn
	closed  bool
	dialing chan struct{} // a one-token semaphore: one dial at a time, waited on with the caller's context
}

// New makes a client. It connects lazily, on the first call.
func New(o Options) *Client {
	c := &Client{network: "unix", address: o.Socket, timeout: int64(o.Timeout), name: o.Name,
		version: 1, dialing: make(chan struct{}, 1)}
	if o.Addr != "" {
		c.network, c.address = "tcp", o.Addr
	} else if c.address == "" {
		c.address = DefaultSocketPath()
	}
	if c.timeout <= 0 {
		c.timeout = int64(time.Second)
	}
	if c.name == "" {
		c.name = "softlb-go/0.1"
	}
	return c
}

// Close drops the connection. Calls in flight fail; later calls fail at once.
func (c *Client) Close() error {
	c.mu.Lock()
	cn := c.cur
	c.cur, c.closed = nil, true
	c.mu.Unlock()
	if cn != nil {
		cn.close(&Error{Code: CodeAgentUnavailable, Message: "the client is closed"})
	}
	return nil
}

// SetTimeout changes the per-call timeout for contexts without a deadline, from the next
// call on. Calls bounded by it need no timer of their own.
func (c *Client) SetTimeout(d time.Duration) {
	if d > 0 {
		atomic.StoreInt64(&c.timeout, int64(d))
	}
}

// Timeout is the per-call timeout for contexts without a deadline.
func (c *Client) Timeout() time.Duration { return time.Duration(atomic.LoadInt64(&c.timeout)) }

// Version is the protocol version Hello negotiated (1 before any Hello).
func (c *Client) Version() int { return int(atomic.LoadInt64(&c.version)) }

// Arg is one argument of a request; arguments go on the wire in the order given.
type Arg = wire.Field

// Pending is a request sent and not yet answered (see Send).
type Pending struct {
	c        *Client
	ctx      context.Context
	deadline time.Time // the context's, or now + Options.Timeout
	id       uint64
	frame    []byte
	cn       *conn
	ch       chan answer
	err      error
	retried  bool
}

// Send writes a request now and returns without waiting for its answer: requests sent
// one after another from one goroutine reach the agent in that order, on one connection
// (pipelining). Wait collects the answer; every Send must be followed by a Wait. The
// context bounds the whole call, Wait included.
func (c *Client) Send(ctx context.Context, op string, args ...Arg) *Pending {
	p := &Pending{c: c, ctx: ctx, id: atomic.AddUint64(&c.nextID, 1)}
	// A deadline, not a derived context: a call that finds the connection idle reads its
	// own answer under a read deadline and needs no timer at all.
	if d, ok := ctx.Deadline(); ok {
		p.deadline = d
	} else {
		p.deadline = time.Now().Add(c.Timeout())
	}
	p.frame, p.err = encodeRequest(p.id, op, args)
	if p.err == nil && ctx.Err() != nil {
		p.err = ctxError(ctx, "the call's context ended before it was sent")
	}
	if p.err == nil {
		p.err = p.issue()
	}
	return p
}

func (p *Pending) issue() error {
	cn, err := p.c.conn(p.ctx, p.deadline)
	if err != nil {
		return err
	}
	p.cn = cn
	if p.ch, err = cn.register(p.id); err != nil {
		return err
	}
	return cn.write(p.frame, p.deadline)
}

// encodeRequest frames {"id", "op", ...args}, keys in that order.
func encodeRequest(id uint64, op string, args []Arg) ([]byte, error) {
	fields := make([]Arg, 0, len(args)+2)
	fields = append(fields, Arg{Key: "id", Value: id}, Arg{Key: "op", Value: op})
	return wire.AppendFrame(make([]byte, 0, 64), append(fields, args...))
}

// Wait returns the answer's error, or decodes its result into out (a pointer; nil to
// discard it).
func (p *Pending) Wait(out interface{}) error {
	for {
		var res msgpack.RawMessage
		err := p.err
		if err == nil {
			res, err = p.wait()
		}
		if err == errDropped {
			p.err = p.issue()
			continue
		}
		if err == errClosed && !p.retried {
			// Closed before any answer: the agent restarted between calls. Once more.
			p.retried = true
			p.c.drop(p.cn, errClosed)
			p.err = p.issue()
			continue
		}
		if err == errClosed {
			return &Error{Code: CodeAgentUnavailable, Message: "the agent closed the connection twice before answering"}
		}
		if err != nil || out == nil {
			return err
		}
		if err := msgpack.Unmarshal(res, out); err != nil {
			return &Error{Code: CodeProtocol, Message: "undecodable result: " + err.Error(), Err: err}
		}
		return nil
	}
}

func (p *Pending) wait() (msgpack.RawMessage, error) {
	cn := p.cn
	select { // nobody reading (a sequential call): read at once, no timer needed
	case cn.readTok <- struct{}{}:
		if res, err, done := p.read(); done {
			return res, err
		}
	default:
	}
	timer := time.NewTimer(time.Until(p.deadline))
	defer timer.Stop()
	for {
		select {
		case a := <-p.ch:
			return a.result, a.err
		case cn.readTok <- struct{}{}:
			if res, err, done := p.read(); done {
				return res, err
			}
		case <-cn.done:
			select { // an answer that came in just before the end still counts
			case a := <-p.ch:
				return a.result, a.err
			default:
			}
			cn.mu.Lock()
			err := cn.err
			cn.mu.Unlock()
			return nil, err
		case <-timer.C:
			return nil, p.giveUp(&Error{Code: CodeTimeout, Message: "no answer from the agent in time",
				Err: context.DeadlineExceeded})
		case <-p.ctx.Done():
			return nil, p.giveUp(ctxError(p.ctx, "no answer from the agent in time"))
		}
	}
}

// read reads, holding readTok, until this call's answer (done) or the connection's end
// (not done: the caller's loop then sees cn.done, or an answer handed over before).
func (p *Pending) read() (msgpack.RawMessage, error, bool) {
	// Only the token holder hands answers over, and that is us now: an answer handed over
	// before we took the token is in p.ch already and will not come off the socket.
	select {
	case a := <-p.ch:
		<-p.cn.readTok
		return a.result, a.err, true
	default:
	}
	a, mine := p.cn.readFor(p.id, p.deadline)
	<-p.cn.readTok
	if a.err == errDeadline {
		return nil, p.giveUp(&Error{Code: CodeTimeout, Message: "no answer from the agent in time",
			Err: context.DeadlineExceeded}), true
	}
	return a.result, a.err, mine
}

// giveUp ends a call without its answer. The answer may still come: drop the connection
// so nothing waits on a stuck agent. Other calls on it are sent again on a new one.
func (p *Pending) giveUp(err error) error {
	p.cn.forget(p.id)
	p.c.drop(p.cn, errDropped)
	return err
}

// Call sends a request and waits for its answer: Send then Wait.
func (c *Client) Call(ctx context.Context, op string, out interface{}, args ...Arg) error {
	return c.Send(ctx, op, args...).Wait(out)
}

func ctxError(ctx context.Context, msg string) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return &Error{Code: CodeTimeout, Message: msg, Err: ctx.Err()}
	}
	return ctx.Err()
}

// drop forgets cn as the current connection and ends it.
func (c *Client) drop(cn *conn, why error) {
	if cn == nil {
		return
	}
	c.mu.Lock()
	if c.cur == cn {
		c.cur = nil
	}
	c.mu.Unlock()
	cn.close(why)
}

// conn returns the live connection, dialing one if needed.
func (c *Client) conn(ctx context.Context, deadline time.Time) (*conn, error) {
	c.mu.Lock()
	cur, closed := c.cur, c.closed
	c.mu.Unlock()
	if cur != nil && !closed && !cur.dead() {
		return cur, nil
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	for {
		c.mu.Lock()
		cur, closed := c.cur, c.closed
		c.mu.Unlock()
		if closed {
			return nil, &Error{Code: CodeAgentUnavailable, Message: "the client is closed"}
		}
		if cur != nil && !cur.dead() {
			return cur, nil
		}
		select {
		case c.dialing <- struct{}{}:
		case <-ctx.Done():
			return nil, ctxError(ctx, "connecting to the agent timed out")
		}
		c.mu.Lock()
		cur = c.cur
		c.mu.Unlock()
		if cur != nil && !cur.dead() {
			<-c.dialing // another caller dialed while we waited
			return cur, nil
		}
		nc, err := dial(ctx, c.network, c.address)
		if err == nil {
			cur = newConn(nc)
			c.mu.Lock()
			if c.closed { // Close ran while we dialed: it could not close this one
				err = &Error{Code: CodeAgentUnavailable, Message: "the client is closed"}
				defer cur.close(err)
			} else {
				c.cur = cur
			}
			c.mu.Unlock()
		}
		<-c.dialing
		return cur, err
	}
}

// Dial errors worth retrying within the deadline: the agent is (re)starting, or its
// listen backlog is full for a moment (a Unix socket answers EAGAIN then).
var retryableDial = []error{syscall.ENOENT, syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.EAGAIN}

const (
	firstBackoff = 5 * time.Millisecond
	maxBackoff   = 200 * time.Millisecond
)

// dial connects, retrying with exponential backoff (5 ms doubling to 200 ms) while the
// error is a retryable one and the deadline allows another try.
func dial(ctx context.Context, network, address string) (net.Conn, error) {
	delay := firstBackoff
	var d net.Dialer
	var unavailable *Error
	for {
		nc, err := d.DialContext(ctx, network, address)
		if err == nil {
			return nc, nil
		}
		if ctx.Err() != nil {
			if unavailable != nil { // out of time while the agent was not there: say that
				return nil, unavailable
			}
			return nil, ctxError(ctx, "connecting to the agent at "+address+" timed out")
		}
		unavailable = &Error{Code: CodeAgentUnavailable, Err: err,
			Message: fmt.Sprintf("cannot connect to the softlb agent at %s: %v", address, unwrapOp(err))}
		if !isAny(err, retryableDial) {
			return nil, unavailable
		}
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < delay {
			return nil, unavailable
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, unavailable
		}
		if delay *= 2; delay > maxBackoff {
			delay = maxBackoff
		}
	}
}

func isAny(err error, targets []error) bool {
	for _, t := range targets {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}

func unwrapOp(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
}
