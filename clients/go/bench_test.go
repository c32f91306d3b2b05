package softlb

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// BenchmarkLiveResolve: sequential resolve round trips (lease false, one connection)
// through the client, beside raw sockets writing the same frame and reading the answer
// frame without decoding it. Needs SOFTLB_TEST_AGENT:
//
//	SOFTLB_TEST_AGENT="$PWD/../../.venv/bin/softlb agent" go test -run '^$' -bench LiveResolve -benchtime 1000x
//
// Variants, run in rounds whose order rotates (the machine's noise then hits all alike):
// client; client with a context.WithTimeout per call; client parked in the runtime's
// poller instead of ppoll(2); a blocking socket on syscalls (the floor, as C or Python
// callers have it); a Go net.Conn. Compare variants within a round, not across rounds
// (-count repeats each variant back to back; set SOFTLB_BENCH_ROUNDS for more rounds).
func BenchmarkLiveResolve(b *testing.B) {
	a := startLiveAgent(b)
	frame, _ := encodeRequest(1, "resolve", resolveArgs("web", []ResolveOption{NoLease()}))
	variants := []struct {
		name string
		run  func(b *testing.B)
	}{
		{"client", func(b *testing.B) { benchClient(b, a, false) }},
		{"client-ctx", func(b *testing.B) { benchClient(b, a, true) }},
		{"client-netpoll", func(b *testing.B) {
			pollBeforeRead = false
			defer func() { pollBeforeRead = true }()
			benchClient(b, a, false)
		}},
		{"client-ctx-netpoll", func(b *testing.B) {
			pollBeforeRead = false
			defer func() { pollBeforeRead = true }()
			benchClient(b, a, true)
		}},
		{"blocking", func(b *testing.B) { benchBlocking(b, a, frame) }},
		{"netconn", func(b *testing.B) { benchNetConn(b, a, frame) }},
	}
	rounds := 8
	if n, err := strconv.Atoi(os.Getenv("SOFTLB_BENCH_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	for round := 0; round < rounds; round++ {
		for i := range variants {
			v := variants[(i+round)%len(variants)]
			b.Run(v.name, v.run)
		}
	}
}

func benchClient(b *testing.B, a *liveAgent, ctxPerCall bool) {
	c := New(Options{Socket: a.socket})
	defer c.Close()
	if _, err := c.Resolve(context.Background(), "web", NoLease()); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ctx, cancel := context.Background(), context.CancelFunc(func() {})
		if ctxPerCall {
			ctx, cancel = context.WithTimeout(ctx, time.Second)
		}
		_, err := c.Resolve(ctx, "web", NoLease())
		cancel()
		if err != nil {
			b.Fatal(err)
		}
	}
}

func benchBlocking(b *testing.B, a *liveAgent, frame []byte) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: a.socket}); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	roundTrip := func() {
		if _, err := syscall.Write(fd, frame); err != nil {
			b.Fatal(err)
		}
		for got := 0; got < 4 || got < 4+int(binary.BigEndian.Uint32(buf[:4])); {
			n, err := syscall.Read(fd, buf[got:])
			if err != nil || n == 0 {
				b.Fatal(err)
			}
			got += n
		}
	}
	roundTrip()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		roundTrip()
	}
}

func benchNetConn(b *testing.B, a *liveAgent, frame []byte) {
	nc, err := net.Dial("unix", a.socket)
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	buf := make([]byte, 64<<10)
	roundTrip := func() {
		if _, err := nc.Write(frame); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(nc, buf[:4]); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(nc, buf[:binary.BigEndian.Uint32(buf[:4])]); err != nil {
			b.Fatal(err)
		}
	}
	roundTrip()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		roundTrip()
	}
}
