package softlb

import (
	"bufio"
	"context"
	"errors"
	"net"
	"reflect"
	"sync"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"softlb/clients/go/internal/wire"
)

// Watch streams one service's endpoint set: the set now, then again after every change.
// It has a connection of its own, and survives agent restarts: it reconnects (backing off
// to one try a second, for as long as it takes), watches again, and passes the first
// answer on only if the set differs from the last one delivered.
type Watch struct {
	// C delivers each update. It is closed when the watch ends: after Close, or on an
	// error (Err says which). A slow reader misses nothing that matters: the agent
	// coalesces updates while this side is not reading.
	C <-chan *Endpoints

	c       chan *Endpoints
	client  *Client
	service string
	stop    chan struct{}
	done    chan struct{}

	mu  sync.Mutex
	nc  net.Conn
	err error
}

// Watch starts watching service. ctx bounds the start only (connect and first answer);
// the watch then runs until Close. An unknown service is an error here, at once.
func (c *Client) Watch(ctx context.Context, service string) (*Watch, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout())
		defer cancel()
	}
	w := &Watch{client: c, service: service, c: make(chan *Endpoints),
		stop: make(chan struct{}), done: make(chan struct{})}
	w.C = w.c
	nc, r, first, err := w.start(ctx)
	if err != nil {
		return nil, err
	}
	w.nc = nc
	go w.run(r, first)
	return w, nil
}

// Close ends the watch and closes C. Safe to call more than once.
func (w *Watch) Close() error {
	w.mu.Lock()
	select {
	case <-w.stop:
	default:
		close(w.stop)
		if w.nc != nil {
			w.nc.Close()
		}
	}
	w.mu.Unlock()
	<-w.done
	return nil
}

// Err says why the watch ended: nil after Close, else the error that ended it.
func (w *Watch) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// start connects, sends the watch, and reads its first answer, all within ctx.
func (w *Watch) start(ctx context.Context) (net.Conn, *bufio.Reader, *Endpoints, error) {
	nc, err := dial(ctx, w.client.network, w.client.address)
	if err != nil {
		return nil, nil, nil, err
	}
	frame, _ := wire.AppendFrame(nil, []wire.Field{{Key: "id", Value: 1}, {Key: "op", Value: "watch"},
		{Key: "service", Value: w.service}})
	deadline, _ := ctx.Deadline()
	nc.SetDeadline(deadline)
	r := bufio.NewReader(nc)
	var first *Endpoints
	if _, err = nc.Write(frame); err == nil {
		first, err = readUpdate(r)
	}
	if err != nil {
		nc.Close()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			err = &Error{Code: CodeTimeout, Message: "no watch answer in time", Err: context.DeadlineExceeded}
		} else if !errors.As(err, new(*Error)) {
			err = &Error{Code: CodeAgentUnavailable, Message: "the agent closed the watch connection", Err: err}
		}
		return nil, nil, nil, err
	}
	nc.SetDeadline(time.Time{})
	return nc, r, first, nil
}

// readUpdate reads one answer of the watch stream: an update, or the agent's error.
func readUpdate(r *bufio.Reader) (*Endpoints, error) {
	body, err := wire.ReadFrame(r)
	if errors.Is(err, wire.ErrFrameTooLarge) {
		return nil, &Error{Code: CodeProtocol, Message: err.Error()}
	}
	if err != nil {
		return nil, err
	}
	env, err := wire.ParseEnvelope(body)
	if err != nil {
		return nil, &Error{Code: CodeProtocol, Message: err.Error()}
	}
	if id, ok := answerID(env.ID); !ok || id != 1 {
		if env.IsError {
			return nil, &Error{Code: Code(env.Code), Message: env.Message}
		}
		return nil, &Error{Code: CodeProtocol, Message: "unexpected frame on a watch connection"}
	}
	if env.IsError {
		return nil, &Error{Code: Code(env.Code), Message: env.Message}
	}
	var u Endpoints
	if err := msgpack.Unmarshal(env.Result, &u); err != nil {
		return nil, &Error{Code: CodeProtocol, Message: "undecodable watch update: " + err.Error()}
	}
	return &u, nil
}

func (w *Watch) run(r *bufio.Reader, first *Endpoints) {
	defer close(w.done)
	defer close(w.c)
	var last *Endpoints
	u, err := first, error(nil)
	resumed := false
	for {
		if err == nil {
			if !(resumed && sameSet(u, last)) {
				select {
				case w.c <- u:
					last = u
				case <-w.stop:
					return
				}
			}
			resumed = false
			u, err = readUpdate(r)
			continue
		}
		var agentErr *Error
		if errors.As(err, &agentErr) {
			w.end(err) // the agent refused the watch (its catalog lost the service), or spoke garbage
			return
		}
		// The connection ended: the agent restarted, or is upgrading. Keep trying.
		if r, u, err = w.reconnect(); err != nil {
			w.end(err)
			return
		}
		resumed = true
	}
}

// reconnect retries start until it works, backing off from 50 ms to one try a second,
// until the watch is closed (errStopped) or the new agent refuses the watch.
func (w *Watch) reconnect() (*bufio.Reader, *Endpoints, error) {
	delay := 50 * time.Millisecond
	for {
		select {
		case <-w.stop:
			return nil, nil, errStopped
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), w.client.Timeout())
		go func() { // Close must not wait out a slow dial
			select {
			case <-w.stop:
			case <-ctx.Done():
			}
			cancel()
		}()
		nc, r, first, err := w.start(ctx)
		cancel()
		if err == nil {
			w.mu.Lock()
			stopped := isClosed(w.stop)
			w.nc = nc
			w.mu.Unlock()
			if stopped {
				nc.Close()
				return nil, nil, errStopped
			}
			return r, first, nil
		}
		var e *Error
		// UNAVAILABLE: the new agent's catalog source has not answered yet; keep trying.
		if errors.As(err, &e) && e.Code != CodeAgentUnavailable && e.Code != CodeTimeout && e.Code != CodeUnavailable {
			return nil, nil, err // the new agent answered, and refused
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-w.stop:
			t.Stop()
			return nil, nil, errStopped
		}
		if delay *= 2; delay > time.Second {
			delay = time.Second
		}
	}
}

var errStopped = errors.New("watch closed")

func (w *Watch) end(err error) {
	if err == errStopped || isClosed(w.stop) {
		return
	}
	w.mu.Lock()
	w.err = err
	w.mu.Unlock()
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// sameSet: what a watcher cares about is the set and its state, not the counters that
// restart with the agent (version), move with the clock (age), or the health checker's
// running detail.
func sameSet(a, b *Endpoints) bool {
	if a == nil || b == nil {
		return a == b
	}
	return reflect.DeepEqual(setView(a), setView(b))
}

func setView(e *Endpoints) Endpoints {
	v := *e
	v.Version, v.Age = 0, nil
	v.Endpoints = make([]Endpoint, len(e.Endpoints))
	for i, ep := range e.Endpoints {
		ep.Health = nil
		v.Endpoints[i] = ep
	}
	return v
}
