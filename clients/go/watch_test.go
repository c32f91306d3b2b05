package softlb

import (
	"context"
	"errors"
	"testing"
	"time"
)

func endpointsOf(version int, ids ...string) map[string]interface{} {
	eps := []interface{}{}
	for _, id := range ids {
		eps = append(eps, map[string]interface{}{"id": id, "address": "127.0.0.1", "port": 80, "weight": 1,
			"tags": []string{}, "meta": map[string]string{}, "registry": "passing", "eligible": true,
			"health": map[string]interface{}{"last_probe_age": float64(version)}})
	}
	return map[string]interface{}{"service": "web", "policy": "round_robin", "version": version,
		"panic": false, "stale": false, "age": float64(version) / 10, "endpoints": eps}
}

func next(t *testing.T, w *Watch) *Endpoints {
	t.Helper()
	select {
	case u, ok := <-w.C:
		if !ok {
			t.Fatalf("watch ended: %v", w.Err())
		}
		return u
	case <-time.After(10 * time.Second):
		t.Fatal("no watch update")
	}
	return nil
}

func ids(u *Endpoints) []string {
	var out []string
	for _, e := range u.Endpoints {
		out = append(out, e.ID)
	}
	return out
}

// The agent restarts under a watch: the watch reconnects and watches again; the same set
// (new version, age and health detail) is not delivered twice; a changed set is.
func TestWatchSurvivesRestartWithoutDuplicate(t *testing.T) {
	restarted := make(chan struct{})
	a := newFakeAgent(t, nil)
	a.handle = func(fc *fakeConn, req map[string]interface{}) {
		if req["op"] != "watch" || req["service"] != "web" {
			t.Errorf("unexpected request %v", req)
			return
		}
		switch fc.n {
		case 1:
			fc.reply(req["id"], endpointsOf(1, "a", "b"))
			fc.reply(req["id"], endpointsOf(2, "a", "b", "c"))
		case 2:
			fc.reply(req["id"], endpointsOf(1, "a", "b", "c")) // the same set: no update
			fc.reply(req["id"], endpointsOf(2, "a", "c"))
			close(restarted)
		}
	}
	a.start()
	c := New(Options{Socket: a.path})
	w, err := c.Watch(ctxFor(t, 5*time.Second), "web")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if got := ids(next(t, w)); len(got) != 2 {
		t.Fatalf("first update %v", got)
	}
	if got := ids(next(t, w)); len(got) != 3 {
		t.Fatalf("second update %v", got)
	}
	a.stop()
	a.start()
	if got := ids(next(t, w)); len(got) != 2 || got[1] != "c" {
		t.Fatalf("after the restart: %v (a duplicate of the unchanged set?)", got)
	}
	<-restarted
	if a.count() != 2 {
		t.Errorf("%d connections, want 2", a.count())
	}
	w.Close()
	if _, ok := <-w.C; ok || w.Err() != nil {
		t.Errorf("after Close: C open or Err %v", w.Err())
	}
}

// Within one stream every update is delivered, even one equal to the last (the agent
// only sends on change; the dedup is for the first answer after a reconnect).
func TestWatchDeliversEveryStreamUpdate(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		fc.reply(req["id"], endpointsOf(1, "a"))
		fc.reply(req["id"], endpointsOf(2, "a"))
	}).start()
	c := New(Options{Socket: a.path})
	w, err := c.Watch(ctxFor(t, 5*time.Second), "web")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if v1, v2 := next(t, w).Version, next(t, w).Version; v1 != 1 || v2 != 2 {
		t.Errorf("versions %d %d", v1, v2)
	}
}

func TestWatchOfUnknownServiceFailsAtOnce(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		fc.fail(req["id"], "UNKNOWN_SERVICE", "unknown service")
	}).start()
	c := New(Options{Socket: a.path})
	if _, err := c.Watch(ctxFor(t, 5*time.Second), "nope"); !errors.Is(err, ErrUnknownService) {
		t.Fatalf("got %v", err)
	}
}

// After a restart the new agent no longer knows the service: the watch ends with that error.
func TestWatchEndsWhenTheNewAgentRefuses(t *testing.T) {
	a := newFakeAgent(t, nil)
	a.handle = func(fc *fakeConn, req map[string]interface{}) {
		if fc.n == 1 {
			fc.reply(req["id"], endpointsOf(1, "a"))
		} else {
			fc.fail(req["id"], "UNKNOWN_SERVICE", "unknown service")
		}
	}
	a.start()
	c := New(Options{Socket: a.path})
	w, err := c.Watch(ctxFor(t, 5*time.Second), "web")
	if err != nil {
		t.Fatal(err)
	}
	next(t, w)
	a.stop()
	a.start()
	select {
	case _, ok := <-w.C:
		if ok {
			t.Fatal("an update after the refusal")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the watch did not end")
	}
	if !errors.Is(w.Err(), ErrUnknownService) {
		t.Errorf("Err() = %v", w.Err())
	}
}

// Close while the agent is down (the watch retrying) returns promptly.
func TestWatchCloseWhileReconnecting(t *testing.T) {
	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		fc.reply(req["id"], endpointsOf(1, "a"))
	}).start()
	c := New(Options{Socket: a.path})
	w, err := c.Watch(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	next(t, w)
	a.stop()
	time.Sleep(100 * time.Millisecond) // let it start retrying
	done := make(chan struct{})
	go func() { w.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung")
	}
}

// After a restart the new agent's catalog source has not answered yet (UNAVAILABLE): the
// watch keeps trying, and goes on once the service is there.
func TestWatchRetriesWhileTheNewAgentIsUnavailable(t *testing.T) {
	a := newFakeAgent(t, nil)
	a.handle = func(fc *fakeConn, req map[string]interface{}) {
		switch fc.n {
		case 1:
			fc.reply(req["id"], endpointsOf(1, "a"))
		case 2:
			fc.fail(req["id"], "UNAVAILABLE", "the catalog source has not answered yet")
		default:
			fc.reply(req["id"], endpointsOf(1, "a", "b"))
		}
	}
	a.start()
	c := New(Options{Socket: a.path})
	w, err := c.Watch(ctxFor(t, 5*time.Second), "web")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	next(t, w)
	a.stop()
	a.start()
	if got := ids(next(t, w)); len(got) != 2 {
		t.Fatalf("after UNAVAILABLE then the set: %v (err %v)", got, w.Err())
	}
	if a.count() < 3 {
		t.Errorf("%d connections, want 3", a.count())
	}
}
