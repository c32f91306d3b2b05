package softlb

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
)

// BenchmarkLiveResolve: sequential resolve round trips (lease false) through the client,
// beside a raw blocking socket writing the same frame and reading the answer frame (no
// decoding: the floor). Needs SOFTLB_TEST_AGENT; compare the two in one run:
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
