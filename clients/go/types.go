package softlb

// Resolved is one resolve answer: where to send this request, and the lease to report it under.
type Resolved struct {
	Address string            `msgpack:"address" json:"address"`
	Port    int               `msgpack:"port" json:"port"`
	ID      string            `msgpack:"id" json:"id"`
	Tags    []string          `msgpack:"tags" json:"tags"`
	Meta    map[string]string `msgpack:"meta" json:"meta"`
	Weight  int               `msgpack:"weight" json:"weight"`
	Node    string            `msgpack:"node" json:"node"`
	Zone    string            `msgpack:"zone" json:"zone"`
	Region  string            `msgpack:"region" json:"region"`
	Lease   *int64            `msgpack:"lease" json:"lease"`       // nil when asked with NoLease
	Panic   bool              `msgpack:"panic" json:"panic"`       // too few healthy: picking among all
	Stale   bool              `msgpack:"stale" json:"stale"`       // the catalog source is unreachable
	Age     *float64          `msgpack:"age" json:"age,omitempty"` // seconds, only when Stale
}

// Endpoint is one endpoint of an Endpoints answer, with its state.
type Endpoint struct {
	ID       string            `msgpack:"id" json:"id"`
	Address  string            `msgpack:"address" json:"address"`
	Port     int               `msgpack:"port" json:"port"`
	Weight   int               `msgpack:"weight" json:"weight"`
	Tags     []string          `msgpack:"tags" json:"tags"`
	Meta     map[string]string `msgpack:"meta" json:"meta"`
	Node     string            `msgpack:"node" json:"node"`
	Zone     string            `msgpack:"zone" json:"zone"`
	Region   string            `msgpack:"region" json:"region"`
	Registry string            `msgpack:"registry" json:"registry"` // passing, warning, critical, maintenance
	Eligible bool              `msgpack:"eligible" json:"eligible"`
	Served   bool              `msgpack:"served" json:"served"`
	// Health is the health checker's detail, when it runs (probe, ejection...): free-form.
	Health map[string]interface{} `msgpack:"health" json:"health,omitempty"`
}

// Endpoints is a service's endpoint set and state (the endpoints op, and each watch update).
type Endpoints struct {
	Service        string     `msgpack:"service" json:"service"`
	Policy         string     `msgpack:"policy" json:"policy"`
	Version        int64      `msgpack:"version" json:"version"`
	Panic          bool       `msgpack:"panic" json:"panic"`
	PanicThreshold float64    `msgpack:"panic_threshold" json:"panic_threshold"`
	Stale          bool       `msgpack:"stale" json:"stale"`
	Age            *float64   `msgpack:"age" json:"age"`
	Endpoints      []Endpoint `msgpack:"endpoints" json:"endpoints"`
}

// Service is one line of the services answer.
type Service struct {
	Name      string `msgpack:"name" json:"name"`
	Policy    string `msgpack:"policy" json:"policy"`
	Endpoints int    `msgpack:"endpoints" json:"endpoints"`
	Eligible  int    `msgpack:"eligible" json:"eligible"`
	Panic     bool   `msgpack:"panic" json:"panic"`
	Stale     bool   `msgpack:"stale" json:"stale"`
}

// Hello is the agent's answer to version negotiation.
type Hello struct {
	Version  int      `msgpack:"version" json:"version"`
	Agent    string   `msgpack:"agent" json:"agent"`
	Ops      []string `msgpack:"ops" json:"ops"`
	MaxFrame int      `msgpack:"max_frame" json:"max_frame"`
}
