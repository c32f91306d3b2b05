package softlb

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// SystemSocket is where the system agent (systemd units, root) serves every caller on the host.
const SystemSocket = "/run/softlb/softlb.sock"

// DefaultSocketPath is where the agent listens unless told otherwise, by the same rule as
// the agent and the Python client: $SOFTLB_SOCKET, else systemd's $RUNTIME_DIRECTORY, else
// the system socket when it exists or we are root, else a per-user socket in
// $XDG_RUNTIME_DIR/softlb or /tmp/softlb-<uid>.
func DefaultSocketPath() string {
	if env := os.Getenv("SOFTLB_SOCKET"); env != "" {
		return env
	}
	if rd := os.Getenv("RUNTIME_DIRECTORY"); rd != "" {
		return filepath.Join(strings.Split(rd, ":")[0], "softlb.sock")
	}
	// A host agent serves every user: non-root callers must find it without configuration.
	if _, err := os.Stat(SystemSocket); err == nil || os.Geteuid() == 0 {
		return SystemSocket
	}
	if xdg := os.Getenv("XDG_RUNTIME_DIR"); xdg != "" {
		return filepath.Join(xdg, "softlb", "softlb.sock")
	}
	return fmt.Sprintf("/tmp/softlb-%d/softlb.sock", os.Geteuid())
}
