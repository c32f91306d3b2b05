//go:build !linux

package softlb

import "time"

// waitReadable: elsewhere, the read parks in Go's network poller (see poll_linux.go).
func waitReadable(fd uintptr, deadline time.Time) {}
