package softlb_test

import (
	"context"
	"time"

	softlb "softlb/clients/go"
)

func callBackend(address string, port int) bool { return true }

// The README's example, kept compiling here.
func Example() {
	run := func() error {
		c := softlb.New(softlb.Options{}) // the default socket, as the agent finds it; 1 s per call
		defer c.Close()
		ctx := context.Background()
		r, err := c.Resolve(ctx, "web", softlb.Tags("v2"))
		if err != nil {
			return err // a *softlb.Error: errors.Is(err, softlb.ErrNoHealthyEndpoint), ...
		}
		t0 := time.Now()
		ok := callBackend(r.Address, r.Port)
		return c.Report(ctx, *r.Lease, ok, time.Since(t0)) // feeds ejection, latency-aware policies
	}
	_ = run
}
