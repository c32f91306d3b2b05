package softlb

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Live tests run against a real agent when SOFTLB_TEST_AGENT names the command that starts
// one, e.g. SOFTLB_TEST_AGENT="/repo/.venv/bin/softlb agent" (tests/clients/test_go_client.py
// sets it). The test appends --catalog-file, --socket, --listen and --admin.

type liveAgent struct {
	t       testing.TB
	dir     string
	socket  string
	addr    string
	catalog string
	cmd     *exec.Cmd
}

func catalogOf(n int) string {
	s := ""
	for i := 1; i <= n; i++ {
		s += fmt.Sprintf("[[services.web.endpoints]]\nid = \"web-%d\"\naddress = \"127.0.0.1\"\nport = %d\n", i, 18000+i)
		if i == 3 {
			s += "tags = [\"canary\"]\n"
		}
	}
	return s
}

func startLiveAgent(t testing.TB) *liveAgent {
	cmdline := os.Getenv("SOFTLB_TEST_AGENT")
	if cmdline == "" {
		t.Skip("SOFTLB_TEST_AGENT is not set: no real agent to test against (tests/clients/test_go_client.py sets it)")
	}
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	a := &liveAgent{t: t, dir: dir, socket: filepath.Join(dir, "softlb.sock"), addr: addr,
		catalog: filepath.Join(dir, "catalog.toml")}
	a.writeCatalog(catalogOf(3))
	t.Cleanup(a.stop)
	a.start()
	return a
}

func (a *liveAgent) writeCatalog(text string) {
	tmp := a.catalog + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
		a.t.Fatal(err)
	}
	if err := os.Rename(tmp, a.catalog); err != nil {
		a.t.Fatal(err)
	}
}

// start runs the agent (exec'd by sh, so the pid is the agent's) and waits until it answers.
func (a *liveAgent) start() {
	log, err := os.OpenFile(filepath.Join(a.dir, "agent.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		a.t.Fatal(err)
	}
	a.cmd = exec.Command("sh", "-c", `exec `+os.Getenv("SOFTLB_TEST_AGENT")+` "$@"`, "sh",
		"--catalog-file", a.catalog, "--socket", a.socket, "--listen", a.addr, "--admin", "")
	a.cmd.Stdout, a.cmd.Stderr = log, log
	if err := a.cmd.Start(); err != nil {
		a.t.Fatal(err)
	}
	log.Close()
	c := New(Options{Socket: a.socket})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		if _, err := c.Hello(ctx); err == nil {
			return
		} else if ctx.Err() != nil {
			b, _ := os.ReadFile(filepath.Join(a.dir, "agent.log"))
			a.t.Fatalf("agent not ready: %v\n%s", err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends the agent by its pid: SIGTERM, then SIGKILL after 10 s.
func (a *liveAgent) stop() {
	if a.cmd == nil {
		return
	}
	cmd := a.cmd
	a.cmd = nil
	cmd.Process.Signal(syscall.SIGCONT)
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

func TestLiveCalls(t *testing.T) {
	a := startLiveAgent(t)
	for _, o := range []Options{{Socket: a.socket}, {Addr: a.addr}} {
		c := New(o)
		ctx := ctxFor(t, 10*time.Second)
		h, err := c.Hello(ctx, 1, 2) // a newer client offering [1, 2] to a v1 agent
		if err != nil || h.Version != 1 || c.Version() != 1 || h.MaxFrame <= 0 {
			t.Fatalf("%v: hello %+v %v", c, h, err)
		}
		// Round robin: three consecutive picks are the three endpoints, and the cycle repeats.
		var seq []string
		for i := 0; i < 6; i++ {
			r, err := c.Resolve(ctx, "web", NoLease())
			if err != nil || r.Lease != nil {
				t.Fatalf("resolve: %+v %v", r, err)
			}
			seq = append(seq, r.ID)
		}
		if seq[0] == seq[1] || seq[1] == seq[2] || seq[0] == seq[2] || fmt.Sprint(seq[:3]) != fmt.Sprint(seq[3:]) {
			t.Errorf("not a round robin: %v", seq)
		}
		r, err := c.Resolve(ctx, "web")
		if err != nil || r.Lease == nil || r.Address != "127.0.0.1" {
			t.Fatalf("resolve with lease: %+v %v", r, err)
		}
		if err := c.Report(ctx, *r.Lease, false, 10*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		if err := c.Report(ctx, *r.Lease, true, -1); !errors.Is(err, ErrUnknownLease) {
			t.Errorf("a second report of one lease: %v", err)
		}
		if err := c.ReportEndpoint(ctx, "web", "web-1", true, -1); err != nil {
			t.Error(err)
		}
		if r, err := c.Resolve(ctx, "web", Tags("canary"), Key("user:42")); err != nil || r.ID != "web-3" {
			t.Errorf("tagged resolve: %+v %v", r, err)
		}
		if _, err := c.Resolve(ctx, "nope"); !errors.Is(err, ErrUnknownService) {
			t.Errorf("unknown service: %v", err)
		}
		if _, err := c.Resolve(ctx, "web", Tags("nope")); !errors.Is(err, ErrNoHealthyEndpoint) {
			t.Errorf("no endpoint with a tag: %v", err)
		}
		if err := c.Call(ctx, "frobnicate", nil); !errors.Is(err, ErrUnknownOp) {
			t.Errorf("unknown op: %v", err)
		}
		s, err := c.Services(ctx)
		if err != nil || len(s) != 1 || s[0].Name != "web" || s[0].Endpoints != 3 {
			t.Errorf("services: %+v %v", s, err)
		}
		e, err := c.Endpoints(ctx, "web")
		if err != nil || len(e.Endpoints) != 3 || e.Endpoints[0].Registry != "passing" || !e.Endpoints[0].Eligible {
			t.Errorf("endpoints: %+v %v", e, err)
		}
		c.Close()
	}
}

// Many goroutines, one connection, a real agent.
func TestLivePipelined(t *testing.T) {
	a := startLiveAgent(t)
	c := New(Options{Socket: a.socket, Timeout: 20 * time.Second})
	defer c.Close()
	var wg sync.WaitGroup
	counts := make([]map[string]int, 50)
	errs := make(chan error, 50)
	for g := range counts {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			counts[g] = map[string]int{}
			for i := 0; i < 6; i++ {
				r, err := c.Resolve(context.Background(), "web", NoLease())
				if err != nil {
					errs <- err
					return
				}
				counts[g][r.ID]++
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	total := map[string]int{}
	for _, m := range counts {
		for id, n := range m {
			total[id] += n
		}
	}
	// 300 round-robin picks over three endpoints: 100 each, whatever the interleaving.
	if total["web-1"] != 100 || total["web-2"] != 100 || total["web-3"] != 100 {
		t.Errorf("picks %v", total)
	}
}

func TestLiveTimeoutThenRecovery(t *testing.T) {
	a := startLiveAgent(t)
	c := New(Options{Socket: a.socket})
	defer c.Close()
	if _, err := c.Resolve(ctxFor(t, 10*time.Second), "web"); err != nil {
		t.Fatal(err)
	}
	a.cmd.Process.Signal(syscall.SIGSTOP)
	_, err := c.Resolve(ctxFor(t, 300*time.Millisecond), "web")
	a.cmd.Process.Signal(syscall.SIGCONT)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("a stopped agent: %v", err)
	}
	if r, err := c.Resolve(ctxFor(t, 10*time.Second), "web"); err != nil || r.Port < 18001 {
		t.Fatalf("after SIGCONT: %+v %v", r, err)
	}
}

// The agent is restarted between two calls, and under a watch.
func TestLiveRestart(t *testing.T) {
	a := startLiveAgent(t)
	c := New(Options{Socket: a.socket, Timeout: 20 * time.Second})
	defer c.Close()
	ctx := ctxFor(t, 30*time.Second)
	if _, err := c.Resolve(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	w, err := c.Watch(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if u := next(t, w); len(u.Endpoints) != 3 {
		t.Fatalf("first update: %v", ids(u))
	}
	a.stop()
	a.start()
	if r, err := c.Resolve(ctx, "web"); err != nil || r.Port < 18001 {
		t.Fatalf("after a restart: %+v %v", r, err)
	}
	// Give the watch time to reconnect (its backoff tops out at 1 s), and only then change
	// the set: had it passed on the unchanged set after the restart, that would be the next
	// update instead of this one. (watch_test.go pins this without timing, on a fake agent.)
	time.Sleep(1500 * time.Millisecond)
	a.writeCatalog(catalogOf(4))
	if u := next(t, w); len(u.Endpoints) != 4 {
		t.Fatalf("after the restart and the change: %v (a duplicate?)", ids(u))
	}
}
