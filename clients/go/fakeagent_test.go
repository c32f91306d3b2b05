package softlb

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"softlb/clients/go/internal/wire"
)

// fakeAgent speaks the wire protocol on a real Unix socket, answering each request with
// handle: the unit tests script an agent that is slow, restarts, or answers out of order.
type fakeAgent struct {
	t       *testing.T
	path    string
	handle  func(fc *fakeConn, req map[string]interface{})
	accepts int32

	mu    sync.Mutex
	ln    net.Listener
	conns []*fakeConn
	wg    sync.WaitGroup
}

type fakeConn struct {
	nc     net.Conn
	n      int // connection number, from 1
	wmu    sync.Mutex
	closed chan struct{} // closed once the client side hung up (read EOF)
}

func newFakeAgent(t *testing.T, handle func(fc *fakeConn, req map[string]interface{})) *fakeAgent {
	a := &fakeAgent{t: t, path: filepath.Join(t.TempDir(), "agent.sock"), handle: handle}
	t.Cleanup(a.stop)
	return a
}

func (a *fakeAgent) start() *fakeAgent {
	ln, err := net.Listen("unix", a.path)
	if err != nil {
		a.t.Fatal(err)
	}
	a.mu.Lock()
	a.ln = ln
	a.mu.Unlock()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			fc := &fakeConn{nc: nc, n: int(atomic.AddInt32(&a.accepts, 1)), closed: make(chan struct{})}
			a.mu.Lock()
			a.conns = append(a.conns, fc)
			a.mu.Unlock()
			a.wg.Add(1)
			go func() { defer a.wg.Done(); a.serve(fc) }()
		}
	}()
	return a
}

func (a *fakeAgent) serve(fc *fakeConn) {
	defer close(fc.closed)
	r := bufio.NewReader(fc.nc)
	for {
		body, err := wire.ReadFrame(r)
		if err != nil {
			return
		}
		v, err := wire.Decode(body)
		if err != nil {
			a.t.Errorf("fake agent got an undecodable request: %v", err)
			return
		}
		a.handle(fc, v.(map[string]interface{}))
	}
}

// stop closes the listener and every connection, like an agent exiting.
func (a *fakeAgent) stop() {
	a.mu.Lock()
	if a.ln != nil {
		a.ln.Close()
		a.ln = nil
	}
	for _, fc := range a.conns {
		fc.nc.Close()
	}
	a.conns = nil
	a.mu.Unlock()
	a.wg.Wait()
}

func (a *fakeAgent) count() int { return int(atomic.LoadInt32(&a.accepts)) }

func (fc *fakeConn) send(fields []wire.Field) {
	frame, err := wire.AppendFrame(nil, fields)
	if err != nil {
		panic(err)
	}
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	fc.nc.Write(frame)
}

func (fc *fakeConn) reply(id interface{}, result interface{}) {
	fc.send([]wire.Field{{Key: "id", Value: id}, {Key: "result", Value: result}})
}

func (fc *fakeConn) fail(id interface{}, code, msg string) {
	fc.send([]wire.Field{{Key: "id", Value: id},
		{Key: "error", Value: []wire.Field{{Key: "code", Value: code}, {Key: "message", Value: msg}}}})
}

// resolved is a resolve answer naming the service it answers, so a test can tell whose it is.
func resolved(service interface{}) map[string]interface{} {
	return map[string]interface{}{"address": "127.0.0.1", "port": 8080, "id": service, "tags": []string{},
		"meta": map[string]string{}, "weight": 1, "node": "", "zone": "", "region": "", "lease": nil,
		"panic": false, "stale": false}
}

func systemSocketApplies() bool {
	_, err := os.Stat(SystemSocket)
	return err == nil || os.Geteuid() == 0
}

func geteuid() int { return os.Geteuid() }
