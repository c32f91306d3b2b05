module softlb/clients/go

go 1.19

// Built offline from Debian's packaged sources (golang-github-vmihailenco-msgpack.v5-dev,
// which depends on golang-github-vmihailenco-tagparser.v2-dev): no module proxy needed.
// msgpack's own test-only requirement (testify) is never loaded for this module's builds.
require (
	github.com/vmihailenco/msgpack/v5 v5.3.5
	github.com/vmihailenco/tagparser/v2 v2.0.0
)

replace github.com/vmihailenco/msgpack/v5 => /usr/share/gocode/src/github.com/vmihailenco/msgpack/v5

replace github.com/vmihailenco/tagparser/v2 => /usr/share/gocode/src/github.com/vmihailenco/tagparser/v2
