package softlb

import (
	"context"
	"sync/atomic"
	"time"
)

// The protocol's ops, one method each. Every call goes through Client.Call.

// Hello negotiates the protocol version: the agent picks the highest of versions (default
// [1]) it speaks. Optional: a client that never says hello speaks version 1.
func (c *Client) Hello(ctx context.Context, versions ...int) (*Hello, error) {
	if len(versions) == 0 {
		versions = []int{1}
	}
	var h Hello
	if err := c.Call(ctx, "hello", &h, helloArgs(versions, c.name)...); err != nil {
		return nil, err
	}
	atomic.StoreInt64(&c.version, int64(h.Version))
	return &h, nil
}

func helloArgs(versions []int, name string) []Arg {
	return []Arg{{Key: "versions", Value: versions}, {Key: "client", Value: name}}
}

// ResolveOption narrows or changes a Resolve.
type ResolveOption func(*[]Arg)

// Key is the hash key for consistent-hash policies (same key, same endpoint).
func Key(key string) ResolveOption {
	return func(a *[]Arg) { *a = append(*a, Arg{Key: "key", Value: key}) }
}

// KeyBytes is a binary hash key.
func KeyBytes(key []byte) ResolveOption {
	return func(a *[]Arg) { *a = append(*a, Arg{Key: "key", Value: key}) }
}

// Tags picks only among endpoints carrying all of tags.
func Tags(tags ...string) ResolveOption {
	return func(a *[]Arg) {
		if len(tags) > 0 {
			*a = append(*a, Arg{Key: "tags", Value: tags})
		}
	}
}

// NoLease asks for no lease: for callers that never Report.
func NoLease() ResolveOption {
	return func(a *[]Arg) { *a = append(*a, Arg{Key: "lease", Value: false}) }
}

func resolveArgs(service string, opts []ResolveOption) []Arg {
	args := make([]Arg, 1, 4)
	args[0] = Arg{Key: "service", Value: service}
	for _, o := range opts {
		o(&args)
	}
	return args
}

// Resolve picks one endpoint of service. Unless NoLease, the answer carries a lease to
// Report the outcome under.
func (c *Client) Resolve(ctx context.Context, service string, opts ...ResolveOption) (*Resolved, error) {
	r := &Resolved{Weight: 1}
	if err := c.Call(ctx, "resolve", r, resolveArgs(service, opts)...); err != nil {
		return nil, err
	}
	return r, nil
}

// Report feeds back the outcome of the call made under lease. latency < 0 lets the
// agent measure it from the lease.
func (c *Client) Report(ctx context.Context, lease int64, ok bool, latency time.Duration) error {
	return c.Call(ctx, "report", nil, reportArgs([]Arg{{Key: "lease", Value: lease}}, ok, latency)...)
}

// ReportEndpoint feeds back an outcome without a lease, naming the endpoint by id.
func (c *Client) ReportEndpoint(ctx context.Context, service, endpoint string, ok bool, latency time.Duration) error {
	return c.Call(ctx, "report", nil,
		reportArgs([]Arg{{Key: "service", Value: service}, {Key: "endpoint", Value: endpoint}}, ok, latency)...)
}

func reportArgs(args []Arg, ok bool, latency time.Duration) []Arg {
	args = append(args, Arg{Key: "ok", Value: ok})
	if latency >= 0 {
		args = append(args, Arg{Key: "latency", Value: latency.Seconds()})
	}
	return args
}

// Services lists the catalog's services.
func (c *Client) Services(ctx context.Context) ([]Service, error) {
	var out []Service
	if err := c.Call(ctx, "services", &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Endpoints returns a service's endpoint set and state.
func (c *Client) Endpoints(ctx context.Context, service string) (*Endpoints, error) {
	var out Endpoints
	if err := c.Call(ctx, "endpoints", &out, Arg{Key: "service", Value: service}); err != nil {
		return nil, err
	}
	return &out, nil
}

// String names the agent's address, for logs.
func (c *Client) String() string {
	if c.network == "unix" {
		return "softlb.Client(" + c.address + ")"
	}
	return "softlb.Client(tcp:" + c.address + ")"
}
