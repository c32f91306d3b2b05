package softlb

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"sync"
	"testing"
	"time"
)

// Random sequences against an agent that answers late, out of order, not at all, or hangs
// up: every call gets its own answer or a TIMEOUT / AGENT_UNAVAILABLE error, never
// another call's answer, and returns close to its deadline. The seed is printed: a
// failure replays with SOFTLB_CHAOS_SEED.
func TestChaosAnswersNeverCross(t *testing.T) {
	seed := time.Now().UnixNano()
	if s := getenvInt("SOFTLB_CHAOS_SEED"); s != 0 {
		seed = s
	}
	t.Logf("seed %d", seed)
	var rmu sync.Mutex
	rng := rand.New(rand.NewSource(seed))
	intn := func(n int) int { rmu.Lock(); defer rmu.Unlock(); return rng.Intn(n) }

	a := newFakeAgent(t, func(fc *fakeConn, req map[string]interface{}) {
		switch r := intn(100); {
		case r < 3: // the agent restarts under this request
			fc.nc.Close()
		case r < 8: // never answered
		case r < 10:
			fc.fail(req["id"], "UNKNOWN_SERVICE", fmt.Sprint(req["service"]))
		default: // answered after 0-30 ms: out of order, and sometimes after the caller gave up
			d := time.Duration(intn(30)) * time.Millisecond
			go func() {
				time.Sleep(d)
				fc.reply(req["id"], resolved(req["service"]))
			}()
		}
	}).start()
	c := New(Options{Socket: a.path})
	defer c.Close()
	var wg sync.WaitGroup
	var mu sync.Mutex
	outcomes := map[string]int{}
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 40; i++ {
				svc := fmt.Sprintf("s-%d-%d", g, i)
				timeout := time.Duration(5+intn(40)) * time.Millisecond
				ctx, cancel := context.WithTimeout(context.Background(), timeout)
				t0 := time.Now()
				r, err := c.Resolve(ctx, svc)
				took := time.Since(t0)
				cancel()
				var e *Error
				switch {
				case err == nil && r.ID != svc:
					t.Errorf("asked %s, got the answer to %s", svc, r.ID)
				case err == nil:
					count(&mu, outcomes, "ok")
				case errors.As(err, &e) && e.Code == CodeUnknownService && e.Message != svc:
					t.Errorf("asked %s, got the error for %s", svc, e.Message)
				case errors.As(err, &e) && (e.Code == CodeUnknownService || e.Code == CodeTimeout ||
					e.Code == CodeAgentUnavailable):
					count(&mu, outcomes, string(e.Code))
				default:
					t.Errorf("%s: unexpected error %v", svc, err)
				}
				if took > timeout+2*time.Second { // bounded, not a timing claim
					t.Errorf("%s: took %v with a %v timeout", svc, took, timeout)
				}
			}
		}(g)
	}
	wg.Wait()
	t.Logf("outcomes %v over %d connections", outcomes, a.count())
	if outcomes["ok"] == 0 {
		t.Error("no call succeeded: the scenario tests nothing")
	}
}

func count(mu *sync.Mutex, m map[string]int, k string) {
	mu.Lock()
	m[k]++
	mu.Unlock()
}

func getenvInt(name string) int64 {
	var v int64
	fmt.Sscan(os.Getenv(name), &v)
	return v
}
