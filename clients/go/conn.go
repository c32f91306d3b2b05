package softlb

import (
	"bufio"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"softlb/clients/go/internal/wire"
)

// errClosed: the connection ended before this call's answer arrived. The agent was
// restarted (or is stopping): the call is safe to send once more on a new connection.
var errClosed = errors.New("the agent closed the connection")

type answer struct {
	result msgpack.RawMessage
	err    error
}

// conn is one connection shared by every call: callers write whole frames under wmu,
// one reader goroutine routes answers to waiting callers by id.
type conn struct {
	nc  net.Conn
	wmu sync.Mutex

	mu      sync.Mutex
	pending map[uint64]chan answer
	err     error         // why it ended; set once, before done closes
	done    chan struct{} // closed when the connection is unusable
}

func newConn(nc net.Conn) *conn {
	cn := &conn{nc: nc, pending: map[uint64]chan answer{}, done: make(chan struct{})}
	go cn.readLoop()
	return cn
}

// register makes a slot for id's answer before the request is written, so an answer can
// never arrive unclaimed.
func (cn *conn) register(id uint64) (chan answer, error) {
	ch := make(chan answer, 1)
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.err != nil {
		return nil, cn.err
	}
	cn.pending[id] = ch
	return ch, nil
}

func (cn *conn) forget(id uint64) {
	cn.mu.Lock()
	delete(cn.pending, id)
	cn.mu.Unlock()
}

// write sends one whole frame. A failed or partial write leaves the stream unframeable,
// so it ends the connection.
func (cn *conn) write(frame []byte, deadline time.Time) error {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	cn.nc.SetWriteDeadline(deadline)
	if _, err := cn.nc.Write(frame); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			cn.close(errClosed)
			return &Error{Code: CodeTimeout, Message: "the agent did not take the request in time", Err: err}
		}
		cn.close(errClosed)
		return errClosed
	}
	return nil
}

// close ends the connection; calls still waiting on it see err.
func (cn *conn) close(err error) {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.err != nil {
		return
	}
	cn.err = err
	cn.nc.Close()
	close(cn.done)
}

func (cn *conn) dead() bool {
	select {
	case <-cn.done:
		return true
	default:
		return false
	}
}

func (cn *conn) readLoop() {
	r := bufio.NewReaderSize(cn.nc, 64<<10)
	for {
		body, err := wire.ReadFrame(r)
		if err != nil {
			if errors.Is(err, wire.ErrFrameTooLarge) {
				cn.close(&Error{Code: CodeProtocol, Message: err.Error()})
			} else {
				cn.close(errClosed)
			}
			return
		}
		env, err := wire.ParseEnvelope(body)
		if err != nil {
			cn.close(&Error{Code: CodeProtocol, Message: "undecodable answer: " + err.Error()})
			return
		}
		id, ok := answerID(env.ID)
		if !ok {
			if env.IsError {
				// An error about the connection, not a call (FRAME_TOO_LARGE, BAD_FRAME):
				// every call on it has lost its answer's place.
				cn.close(&Error{Code: Code(env.Code), Message: env.Message})
				return
			}
			continue // an answer to nobody (not ours): ignore it
		}
		cn.mu.Lock()
		ch := cn.pending[id]
		delete(cn.pending, id)
		cn.mu.Unlock()
		if ch == nil {
			continue // its caller timed out and left
		}
		if env.IsError {
			ch <- answer{err: &Error{Code: Code(env.Code), Message: env.Message}}
		} else {
			ch <- answer{result: env.Result}
		}
	}
}

func answerID(v interface{}) (uint64, bool) {
	switch x := v.(type) {
	case int64:
		return uint64(x), x >= 0
	case uint64:
		return x, true
	}
	return 0, false
}
