package softlb

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"testing"
	"time"

	"softlb/clients/go/internal/vectors"
	"softlb/clients/go/internal/wire"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// The requests the client builds are the shared vectors' bytes, id for id.
func TestRequestsAreTheVectorBytes(t *testing.T) {
	vs, err := vectors.Load("../../tests/wire_vectors/vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for _, v := range vs {
		want[v.Name] = v.Hex
	}
	cases := []struct {
		name string
		id   uint64
		op   string
		args []Arg
	}{
		{"hello", 1, "hello", helloArgs([]int{1}, "vectors/1")},
		{"resolve", 2, "resolve", resolveArgs("web", nil)},
		{"resolve_key_tags", 3, "resolve", resolveArgs("cache", []ResolveOption{Key("user:42"), Tags("v2")})},
		{"resolve_no_lease", 4, "resolve", resolveArgs("web", []ResolveOption{NoLease()})},
		{"report_lease", 5, "report", reportArgs([]Arg{{Key: "lease", Value: int64(17)}}, false, 250*time.Millisecond)},
		{"report_endpoint", 6, "report", reportArgs([]Arg{{Key: "service", Value: "web"}, {Key: "endpoint", Value: "web-1"}}, true, -1)},
		{"endpoints", 7, "endpoints", []Arg{{Key: "service", Value: "web"}}},
		{"large_id", 1 << 32, "services", nil},
	}
	for _, c := range cases {
		got, err := encodeRequest(c.id, c.op, c.args)
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(got) != want[c.name] {
			t.Errorf("%s: %x, want %s", c.name, got, want[c.name])
		}
	}
}

// Many goroutines share one connection; the agent answers in random order; each call
// gets its own answer.
func TestPipelinedCallsFromManyGoroutines(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		go func() {
			time.Sleep(time.Duration(rand.Intn(2000)) * time.Microsecond)
			fc.reply(req["id"], resolved(req["service"]))
		}()
	}).start()
	c := New(Options{Socket: a.path, Timeout: 10 * time.Second})
	defer c.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 64*20)
	for g := 0; g < 64; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				svc := fmt.Sprintf("svc-%d-%d", g, i)
				r, err := c.Resolve(context.Background(), svc)
				if err == nil && r.ID != svc {
					err = fmt.Errorf("asked %s, got the answer for %s", svc, r.ID)
				}
				if err != nil {
					errs <- err
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if a.count() != 1 {
		t.Errorf("%d connections, want 1", a.count())
	}
}

// Send/Wait pipelines in issue order on one connection.
func TestSendThenWaitKeepsIssueOrder(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		mu.Lock()
		seen = append(seen, req["service"].(string))
		mu.Unlock()
		fc.reply(req["id"], resolved(req["service"]))
	}).start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	var ps []*Pending
	for i := 0; i < 10; i++ {
		ps = append(ps, c.Send(ctxFor(t, 5*time.Second), "resolve", Arg{Key: "service", Value: fmt.Sprint(i)}))
	}
	for i, p := range ps {
		var r Resolved
		if err := p.Wait(&r); err != nil || r.ID != fmt.Sprint(i) {
			t.Fatalf("call %d: %v %+v", i, err, r)
		}
	}
	if fmt.Sprint(seen) != "[0 1 2 3 4 5 6 7 8 9]" {
		t.Errorf("the agent saw %v", seen)
	}
}

// A timed-out call fails with TIMEOUT and drops the connection: its late answer reaches
// no one, and the next call runs on a new connection.
func TestTimeoutDropsTheConnection(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		if req["service"] == "slow" {
			go func() {
				<-fc.closed // answer only once the client has hung up: never read
				fc.reply(req["id"], resolved("slow"))
			}()
			return
		}
		fc.reply(req["id"], resolved(req["service"]))
	}).start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	_, err := c.Resolve(ctxFor(t, 100*time.Millisecond), "slow")
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want a TIMEOUT wrapping DeadlineExceeded, got %v", err)
	}
	r, err := c.Resolve(ctxFor(t, 5*time.Second), "fast")
	if err != nil || r.ID != "fast" {
		t.Fatalf("after a timeout: %v %+v", err, r)
	}
	if a.count() != 2 {
		t.Errorf("%d connections, want 2 (the timed-out one dropped)", a.count())
	}
}

// The client's default timeout applies when the context has no deadline.
func TestDefaultTimeout(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {}).start()
	c := New(Options{Socket: a.path, Timeout: 50 * time.Millisecond})
	defer c.Close()
	done := make(chan error, 1)
	go func() { _, err := c.Services(context.Background()); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("got %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the default timeout did not apply")
	}
}

// The agent closes the connection before answering (a restart): the call is sent once
// more, transparently; a second close is AGENT_UNAVAILABLE.
func TestOneTransparentRetry(t *testing.T) {
	for _, closes := range []int{1, 2} {
		closes := closes
		a := newFakeAgent(t, nil)
		a.handle = func(fc *fakeConn, req map[string]interface{}) {
			if fc.n <= closes {
				fc.nc.Close()
				return
			}
			fc.reply(req["id"], resolved(req["service"]))
		}
		a.start()
		c := New(Options{Socket: a.path})
		r, err := c.Resolve(ctxFor(t, 5*time.Second), "web")
		if closes == 1 && (err != nil || r.ID != "web" || a.count() != 2) {
			t.Errorf("one close: %v %+v after %d connections", err, r, a.count())
		}
		if closes == 2 && !errors.Is(err, ErrAgentUnavailable) {
			t.Errorf("two closes: want AGENT_UNAVAILABLE, got %v", err)
		}
		c.Close()
	}
}

// The agent restarts between two calls: the second call reconnects, waiting (with
// backoff) for the new agent's socket, and succeeds.
func TestAgentRestartBetweenCalls(t *testing.T) {
	handle := func(fc *fakeConn, req map[string]interface{}) { fc.reply(req["id"], resolved(req["service"])) }
	a := newFakeAgent(t, handle).start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	if _, err := c.Resolve(ctxFor(t, 5*time.Second), "web"); err != nil {
		t.Fatal(err)
	}
	a.stop()
	go func() {
		time.Sleep(100 * time.Millisecond)
		a.start()
	}()
	if r, err := c.Resolve(ctxFor(t, 5*time.Second), "web"); err != nil || r.ID != "web" {
		t.Fatalf("after a restart: %v %+v", err, r)
	}
}

func TestNoAgentIsUnavailableWithinTheDeadline(t *testing.T) {
	c := New(Options{Socket: t.TempDir() + "/missing.sock", Timeout: 200 * time.Millisecond})
	t0 := time.Now()
	_, err := c.Resolve(context.Background(), "web")
	var e *Error
	if !errors.Is(err, ErrAgentUnavailable) || !errors.As(err, &e) || e.Code != CodeAgentUnavailable {
		t.Fatalf("got %v", err)
	}
	if time.Since(t0) > 5*time.Second {
		t.Errorf("took %v", time.Since(t0)) // bounded, not a timing claim
	}
}

func TestAgentErrorsCarryTheirCode(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		fc.fail(req["id"], "UNKNOWN_SERVICE", `unknown service "nope"`)
	}).start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	_, err := c.Resolve(ctxFor(t, 5*time.Second), "nope")
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeUnknownService || e.Message != `unknown service "nope"` {
		t.Fatalf("got %#v", err)
	}
	if !errors.Is(err, ErrUnknownService) || errors.Is(err, ErrNoHealthyEndpoint) || errors.Is(err, ErrTimeout) {
		t.Errorf("errors.Is does not match by code: %v", err)
	}
	if a.count() != 1 {
		t.Errorf("an error answer must not drop the connection")
	}
}

// A frame-level error (id nil) fails the calls on that connection with its code.
func TestConnectionLevelError(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		fc.fail(nil, "FRAME_TOO_LARGE", "frame over max_frame")
		fc.nc.Close()
	}).start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	if _, err := c.Services(ctxFor(t, 5*time.Second)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("got %v", err)
	}
}

// Unknown result fields (a newer agent) are ignored.
func TestNewerAgentFieldsIgnored(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		r := resolved("web")
		r["shiny"] = map[string]interface{}{"new": []int{1, 2}}
		fc.send([]wire.Field{{Key: "id", Value: req["id"]}, {Key: "result", Value: r}, {Key: "trace", Value: "x"}})
	}).start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	if r, err := c.Resolve(ctxFor(t, 5*time.Second), "web"); err != nil || r.ID != "web" {
		t.Fatalf("%v %+v", err, r)
	}
}

func TestClosedClientFails(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {}).start()
	c := New(Options{Socket: a.path})
	c.Close()
	if _, err := c.Services(ctxFor(t, time.Second)); !errors.Is(err, ErrAgentUnavailable) {
		t.Fatalf("got %v", err)
	}
}

func TestDefaultSocketPath(t *testing.T) {
	t.Setenv("SOFTLB_SOCKET", "/x/y.sock")
	t.Setenv("RUNTIME_DIRECTORY", "/rd1:/rd2")
	if p := DefaultSocketPath(); p != "/x/y.sock" {
		t.Errorf("SOFTLB_SOCKET: %s", p)
	}
	t.Setenv("SOFTLB_SOCKET", "")
	if p := DefaultSocketPath(); p != "/rd1/softlb.sock" {
		t.Errorf("RUNTIME_DIRECTORY: %s", p)
	}
	t.Setenv("RUNTIME_DIRECTORY", "")
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	p := DefaultSocketPath()
	if systemSocketApplies() {
		if p != SystemSocket {
			t.Errorf("root or a system agent: %s", p)
		}
		return
	}
	if p != "/run/user/1000/softlb/softlb.sock" {
		t.Errorf("XDG_RUNTIME_DIR: %s", p)
	}
	t.Setenv("XDG_RUNTIME_DIR", "")
	if p := DefaultSocketPath(); p != fmt.Sprintf("/tmp/softlb-%d/softlb.sock", geteuid()) {
		t.Errorf("fallback: %s", p)
	}
}

// Close wakes a call waiting for its answer (blocked in the kernel on Linux) at once,
// not at its deadline.
func TestCloseWakesAWaitingCall(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {}).start()
	c := New(Options{Socket: a.path})
	done := make(chan error, 1)
	go func() { _, err := c.Services(ctxFor(t, 30*time.Second)); done <- err }()
	for a.count() == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // let it reach its wait
	closed := make(chan struct{})
	go func() { c.Close(); close(closed) }() // net.Conn.Close itself waits for the fd's users
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung behind the waiting call")
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrAgentUnavailable) {
			t.Errorf("got %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not wake the waiting call")
	}
}

func TestEndedContextFailsBeforeSending(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		t.Errorf("the agent got %v", req)
	}).start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Services(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v", err)
	}
}

// A call whose connection is dropped because another call on it timed out is sent again
// on a new connection: the other call's timeout is not its failure, nor its one retry.
func TestAnotherCallsTimeoutDoesNotFailThisOne(t *testing.T) {
	a := newFakeAgent(t, nil)
	a.handle = func(fc *fakeConn, req map[string]interface{}) {
		switch {
		case req["service"] == "slow": // never answered
		case fc.n == 1: // "b" on the first connection: not answered before the drop
		case fc.n == 2: // the agent restarts under b's second send: its one retry
			fc.nc.Close()
		default:
			fc.reply(req["id"], resolved(req["service"]))
		}
	}
	a.start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	b := c.Send(ctxFor(t, 10*time.Second), "resolve", Arg{Key: "service", Value: "b"})
	if _, err := c.Resolve(ctxFor(t, 50*time.Millisecond), "slow"); !errors.Is(err, ErrTimeout) {
		t.Fatalf("slow: %v", err)
	}
	var r Resolved
	if err := b.Wait(&r); err != nil || r.ID != "b" {
		t.Fatalf("b: %v %+v", err, r)
	}
	if a.count() != 3 {
		t.Errorf("%d connections, want 3", a.count())
	}
}
