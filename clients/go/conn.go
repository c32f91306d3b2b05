package softlb

import (
	"bufio"
	"context"
	"errors"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"softlb/clients/go/internal/wire"
)

var (
	// errClosed: the agent closed the connection before this call's answer arrived. It was
	// restarted (or is stopping): the call is safe to send once more on a new connection.
	errClosed = errors.New("the agent closed the connection")
	// errDropped: this side dropped the connection because another call on it timed out.
	// Not the agent's doing: the call is sent again, within its own deadline.
	errDropped = errors.New("the connection was dropped after another call timed out")
)

type answer struct {
	result msgpack.RawMessage
	err    error
}

// conn is one connection shared by every call: callers write whole frames under wmu;
// one waiting caller at a time (the holder of readTok) reads, routing answers by id.
type conn struct {
	nc      net.Conn
	wmu     sync.Mutex
	readTok chan struct{}
	r       *bufio.Reader // read only by the holder of readTok
	raw     syscall.RawConn

	mu      sync.Mutex
	pending map[uint64]chan answer
	err     error         // why it ended; set once, before done closes
	done    chan struct{} // closed when the connection is unusable
}

func newConn(nc net.Conn) *conn {
	cn := &conn{nc: nc, pending: map[uint64]chan answer{}, done: make(chan struct{}),
		readTok: make(chan struct{}, 1), r: bufio.NewReaderSize(nc, 64<<10)}
	if sc, ok := nc.(syscall.Conn); ok {
		cn.raw, _ = sc.SyscallConn()
	}
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
			cn.close(errDropped)
			return &Error{Code: CodeTimeout, Message: "the agent did not take the request in time",
				Err: context.DeadlineExceeded}
		}
		return cn.close(errClosed)
	}
	return nil
}

// close ends the connection; calls still waiting on it see err. It returns the reason
// the connection ended, which is err unless it had ended already.
func (cn *conn) close(err error) error {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.err != nil {
		return cn.err
	}
	cn.err = err
	if cn.raw != nil { // wake a reader blocked in waitReadable now, not at its deadline
		cn.raw.Control(func(fd uintptr) { syscall.Shutdown(int(fd), syscall.SHUT_RDWR) })
	}
	cn.nc.Close()
	close(cn.done)
	return err
}

func (cn *conn) dead() bool {
	select {
	case <-cn.done:
		return true
	default:
		return false
	}
}

// readFor reads answers for the call waiting on id, handing others' answers to their
// callers, until its own arrives, the deadline passes, or the connection ends. Only the
// holder of readTok calls it: the waiting caller reads the socket itself, so a sequential
// call costs no hand-off between goroutines (measured: that hand-off doubled a round trip).
func (cn *conn) readFor(id uint64, deadline time.Time) (answer, bool) {
	cn.nc.SetReadDeadline(deadline)
	for {
		if cn.raw != nil && cn.r.Buffered() == 0 && pollBeforeRead {
			// Control holds the fd open (a concurrent Close waits for it to return).
			cn.raw.Control(func(fd uintptr) { waitReadable(fd, deadline) })
		}
		body, err := wire.ReadFrame(cn.r)
		if err != nil {
			var ne net.Error
			switch {
			case errors.As(err, &ne) && ne.Timeout():
				// Maybe mid-frame: the stream cannot be trusted past this point.
				cn.close(errDropped)
				return answer{err: errDeadline}, true
			case errors.Is(err, wire.ErrFrameTooLarge):
				cn.close(&Error{Code: CodeProtocol, Message: err.Error()})
			default:
				cn.close(errClosed)
			}
			return answer{}, false
		}
		env, err := wire.ParseEnvelope(body)
		if err != nil {
			cn.close(&Error{Code: CodeProtocol, Message: "undecodable answer: " + err.Error()})
			return answer{}, false
		}
		aid, ok := answerID(env.ID)
		if !ok {
			if env.IsError {
				// An error about the connection, not a call (FRAME_TOO_LARGE, BAD_FRAME):
				// every call on it has lost its answer's place.
				cn.close(&Error{Code: Code(env.Code), Message: env.Message})
				return answer{}, false
			}
			continue // an answer to nobody (not ours): ignore it
		}
		a := answer{result: env.Result}
		if env.IsError {
			a = answer{err: &Error{Code: Code(env.Code), Message: env.Message}}
		}
		cn.mu.Lock()
		ch := cn.pending[aid]
		delete(cn.pending, aid)
		cn.mu.Unlock()
		if aid == id {
			return a, true
		}
		if ch != nil { // nil: its caller timed out and left
			ch <- a
		}
	}
}

// errDeadline: the reading caller's own deadline passed.
var errDeadline = errors.New("deadline")

func answerID(v interface{}) (uint64, bool) {
	switch x := v.(type) {
	case int64:
		return uint64(x), x >= 0
	case uint64:
		return x, true
	}
	return 0, false
}

// pollBeforeRead: wait for an answer in ppoll(2), not the runtime's poller (poll_linux.go).
// A variable so the benchmark can compare both in one run.
var pollBeforeRead = true
