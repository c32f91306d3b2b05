package softlb

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// BenchmarkLiveResolve: sequential resolve round trips (lease false) through the client
// (with and without a context.WithTimeout per call), beside raw sockets writing the same
// frame and reading the answer frame without decoding it: a blocking socket on syscalls
// (the floor), and a Go net.Conn (parked in the runtime's poller between the two). Needs SOFTLB_TEST_AGENT; compare the two in one run:
//
//	SOFTLB_TEST_AGENT="$PWD/../../.venv/bin/softlb agent" go test -run '^$' -bench LiveResolve -benchtime 2000x
func BenchmarkLiveResolve(b *testing.B) {
	a := startLiveAgent(b)
	for round := 0; round < 5; round++ { // interleaved: the machine's noise hits both alike
		benchRound(b, a)
	}
}

func benchRound(b *testing.B, a *liveAgent) {
	b.Run("client", func(b *testing.B) {
		c := New(Options{Socket: a.socket})
		defer c.Close()
		ctx := context.Background()
		if _, err := c.Resolve(ctx, "web", NoLease()); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := c.Resolve(ctx, "web", NoLease()); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("client-netpoll", func(b *testing.B) {
		pollBeforeRead = false
		defer func() { pollBeforeRead = true }()
		c := New(Options{Socket: a.socket})
		defer c.Close()
		for i := 0; i < b.N; i++ {
			if _, err := c.Resolve(context.Background(), "web", NoLease()); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("clientctx", func(b *testing.B) {
		c := New(Options{Socket: a.socket})
		defer c.Close()
		for i := 0; i < b.N; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if _, err := c.Resolve(ctx, "web", NoLease()); err != nil {
				b.Fatal(err)
			}
			cancel()
		}
	})
	b.Run("blocking", func(b *testing.B) {
		// The floor: a blocking socket straight on syscalls, as a C or Python caller has.
		fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
		if err != nil {
			b.Fatal(err)
		}
		defer syscall.Close(fd)
		if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: a.socket}); err != nil {
			b.Fatal(err)
		}
		frame, _ := encodeRequest(1, "resolve", resolveArgs("web", []ResolveOption{NoLease()}))
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
	})
	b.Run("raw", func(b *testing.B) {
		nc, err := net.Dial("unix", a.socket)
		if err != nil {
			b.Fatal(err)
		}
		defer nc.Close()
		frame, _ := encodeRequest(1, "resolve", resolveArgs("web", []ResolveOption{NoLease()}))
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
	})
}
