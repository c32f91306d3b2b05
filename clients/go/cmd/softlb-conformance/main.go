// Command softlb-conformance drives the Go client's public API for the conformance suite
// (tests/conformance/): JSON commands on stdin, one per line; JSON replies and watch
// events on stdout, one per line. The protocol is RUNNER-SPEC (docs/CLIENTS.md).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	softlb "softlb/clients/go"
	"softlb/clients/go/internal/vectors"
)

type command struct {
	Cmd      string          `json:"cmd"`
	Seq      int64           `json:"seq"`
	Addr     string          `json:"addr"`
	Timeout  *float64        `json:"timeout"`
	Versions []int           `json:"versions"`
	Service  string          `json:"service"`
	Key      *string         `json:"key"`
	Tags     []string        `json:"tags"`
	Lease    json.RawMessage `json:"lease"` // bool for resolve, int for report
	OK       *bool           `json:"ok"`
	Latency  *float64        `json:"latency"`
	Endpoint string          `json:"endpoint"`
	N        int             `json:"n"`
	Name     string          `json:"name"`
	Path     string          `json:"path"`
}

type runner struct {
	out     *json.Encoder
	outMu   sync.Mutex
	client  *softlb.Client
	timeout time.Duration
	watches map[string]*softlb.Watch
	wg      sync.WaitGroup
}

func main() {
	r := &runner{out: json.NewEncoder(os.Stdout), timeout: 2 * time.Second, watches: map[string]*softlb.Watch{}}
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	for {
		line, err := in.ReadBytes('\n')
		if len(strings.TrimSpace(string(line))) > 0 {
			var c command
			if jerr := json.Unmarshal(line, &c); jerr != nil {
				r.emit(map[string]interface{}{"seq": nil, "ok": false,
					"error": map[string]string{"code": "CLIENT", "message": "bad command: " + jerr.Error()}})
			} else if r.do(c) {
				break
			}
		}
		if err != nil {
			if err != io.EOF {
				fmt.Fprintln(os.Stderr, "softlb-conformance: reading stdin:", err)
			}
			break
		}
	}
	r.closeAll()
}

// emit writes one line; Encoder.Encode writes it whole, and stdout is unbuffered.
func (r *runner) emit(v interface{}) {
	r.outMu.Lock()
	defer r.outMu.Unlock()
	if err := r.out.Encode(v); err != nil {
		fmt.Fprintln(os.Stderr, "softlb-conformance: writing stdout:", err)
	}
}

// ctx: every call is bounded by the client's own per-call timeout (Options.Timeout,
// SetTimeout), so the bench command measures the client, not a context's timer.
func (r *runner) ctx() (context.Context, context.CancelFunc) {
	return context.Background(), func() {}
}

// do runs one command and replies; true means exit.
func (r *runner) do(c command) (exit bool) {
	res, err := r.run(c)
	if err != nil {
		r.emit(map[string]interface{}{"seq": c.Seq, "ok": false, "error": errorJSON(err)})
	} else {
		r.emit(map[string]interface{}{"seq": c.Seq, "ok": true, "result": res})
	}
	return c.Cmd == "exit"
}

func (r *runner) run(c command) (interface{}, error) {
	empty := map[string]interface{}{}
	if r.client == nil && c.Cmd != "connect" && c.Cmd != "vectors" && c.Cmd != "exit" && c.Cmd != "close" {
		return nil, errors.New("no client: send connect first")
	}
	switch c.Cmd {
	case "connect":
		if c.Timeout != nil {
			r.timeout = seconds(*c.Timeout)
		}
		o := softlb.Options{Timeout: r.timeout}
		if strings.Contains(c.Addr, "/") {
			o.Socket = c.Addr
		} else {
			o.Addr = c.Addr
		}
		if r.client != nil {
			r.client.Close()
		}
		r.client = softlb.New(o)
		return empty, nil
	case "set_timeout":
		if c.Timeout == nil {
			return nil, errors.New("set_timeout needs timeout")
		}
		r.timeout = seconds(*c.Timeout)
		r.client.SetTimeout(r.timeout)
		return empty, nil
	case "hello":
		ctx, cancel := r.ctx()
		defer cancel()
		return r.client.Hello(ctx, c.Versions...)
	case "resolve":
		ctx, cancel := r.ctx()
		defer cancel()
		var opts []softlb.ResolveOption
		if c.Key != nil {
			opts = append(opts, softlb.Key(*c.Key))
		}
		opts = append(opts, softlb.Tags(c.Tags...))
		if string(c.Lease) == "false" {
			opts = append(opts, softlb.NoLease())
		}
		res, err := r.client.Resolve(ctx, c.Service, opts...)
		return resolvedJSON(res), err
	case "report":
		ctx, cancel := r.ctx()
		defer cancel()
		ok, latency := true, time.Duration(-1)
		if c.OK != nil {
			ok = *c.OK
		}
		if c.Latency != nil {
			latency = seconds(*c.Latency)
		}
		if c.Service != "" {
			return empty, r.client.ReportEndpoint(ctx, c.Service, c.Endpoint, ok, latency)
		}
		var lease int64
		if err := json.Unmarshal(c.Lease, &lease); err != nil {
			return nil, fmt.Errorf("report needs an integer lease or service+endpoint: %v", err)
		}
		return empty, r.client.Report(ctx, lease, ok, latency)
	case "services":
		ctx, cancel := r.ctx()
		defer cancel()
		s, err := r.client.Services(ctx)
		if s == nil {
			s = []softlb.Service{}
		}
		return s, err
	case "endpoints":
		ctx, cancel := r.ctx()
		defer cancel()
		return r.client.Endpoints(ctx, c.Service)
	case "pipeline":
		return r.pipeline(c)
	case "bench":
		return r.bench(c)
	case "watch":
		return r.watch(c)
	case "unwatch":
		w := r.watches[c.Name]
		if w == nil {
			return nil, fmt.Errorf("no watch named %q", c.Name)
		}
		delete(r.watches, c.Name)
		w.Close()
		return empty, nil
	case "vectors":
		vs, err := vectors.Load(c.Path)
		if err != nil {
			return nil, err
		}
		passed, failed := vectors.Run(vs)
		return map[string]interface{}{"passed": passed, "failed": failed}, nil
	case "close":
		r.closeAll()
		return empty, nil
	case "exit":
		return empty, nil
	}
	return nil, fmt.Errorf("unknown command %q", c.Cmd)
}

// pipeline: n resolves written back to back on the one connection, then awaited, in
// order of issue.
func (r *runner) pipeline(c command) (interface{}, error) {
	ctx, cancel := r.ctx()
	defer cancel()
	calls := make([]*softlb.Pending, c.N)
	for i := range calls {
		calls[i] = r.client.Send(ctx, "resolve", softlb.Arg{Key: "service", Value: c.Service},
			softlb.Arg{Key: "lease", Value: false})
	}
	ids := make([]string, c.N)
	var first error
	for i, p := range calls {
		var res softlb.Resolved
		if err := p.Wait(&res); err != nil && first == nil {
			first = err
		}
		ids[i] = res.ID
	}
	return ids, first
}

// bench: one untimed resolve to connect, then n sequential resolves, timed.
func (r *runner) bench(c command) (interface{}, error) {
	ctx, cancel := r.ctx()
	_, err := r.client.Resolve(ctx, c.Service, softlb.NoLease())
	cancel()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	for i := 0; i < c.N; i++ {
		ctx, cancel := r.ctx()
		_, err := r.client.Resolve(ctx, c.Service, softlb.NoLease())
		cancel()
		if err != nil {
			return nil, err
		}
	}
	return map[string]float64{"seconds": time.Since(t0).Seconds()}, nil
}

func (r *runner) watch(c command) (interface{}, error) {
	if r.watches[c.Name] != nil {
		return nil, fmt.Errorf("a watch named %q is running", c.Name)
	}
	ctx, cancel := r.ctx()
	defer cancel()
	w, err := r.client.Watch(ctx, c.Service)
	if err != nil {
		return nil, err
	}
	r.watches[c.Name] = w
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for u := range w.C {
			r.emit(map[string]interface{}{"event": "watch", "watch": c.Name, "update": u})
		}
		if err := w.Err(); err != nil {
			fmt.Fprintf(os.Stderr, "softlb-conformance: watch %s ended: %v\n", c.Name, err)
		}
	}()
	return map[string]interface{}{}, nil
}

func (r *runner) closeAll() {
	for name, w := range r.watches {
		w.Close()
		delete(r.watches, name)
	}
	r.wg.Wait()
	if r.client != nil {
		r.client.Close()
		r.client = nil
	}
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// resolvedJSON: the resolve result map, lists and maps never null.
func resolvedJSON(r *softlb.Resolved) interface{} {
	if r == nil {
		return nil
	}
	if r.Tags == nil {
		r.Tags = []string{}
	}
	if r.Meta == nil {
		r.Meta = map[string]string{}
	}
	return r
}

// errorJSON maps the client's errors to the runner protocol's codes.
func errorJSON(err error) map[string]string {
	code, msg := "CLIENT", err.Error()
	var e *softlb.Error
	if errors.As(err, &e) {
		msg = e.Message
		switch e.Code {
		case softlb.CodeAgentUnavailable:
			code = "UNAVAILABLE_AGENT"
		case softlb.CodeProtocol:
			code = "CLIENT"
		default:
			code = string(e.Code) // TIMEOUT, and the agent's own codes
		}
	}
	return map[string]string{"code": code, "message": msg}
}
