"""CPU groups for benchmarks: each party (the agent, a bystander, an attacker) in a CPU
control group of its own with equal weight, as systemd runs each unit (and each login
user's slice) in its own cgroup. Without them, four attacker processes get four times the
agent's CPU share on a small machine and the figure measures the kernel's scheduler, not
the agent.

    groups = CpuGroups.open("bystander-bench")   # None where cgroups cannot be written
    groups.put("agent", pid); ...; groups.close()  # moves the pids back, removes the groups

Works with cgroup v1's cpu controller (/sys/fs/cgroup/cpu) or v2 with the cpu controller
enabled; needs write access there (root in a container here).
"""

from __future__ import annotations

import os

V1 = "/sys/fs/cgroup/cpu"
V2 = "/sys/fs/cgroup"


class CpuGroups:
    def __init__(self, root: str, parent: str, procs_file: str) -> None:
        self.root, self.parent, self.procs_file = root, parent, procs_file
        self.groups: dict[str, str] = {}

    @classmethod
    def open(cls, name: str) -> CpuGroups | None:
        for root, procs in ((V1, "cgroup.procs"), (V2, "cgroup.procs")):
            if root == V2 and "cpu" not in _read(os.path.join(V2, "cgroup.subtree_control")).split():
                continue
            if not os.access(os.path.join(root, procs), os.W_OK):
                continue
            parent = os.path.join(root, f"softlb-{name}-{os.getpid()}")
            try:
                os.mkdir(parent)
            except OSError:
                continue
            return cls(root, parent, procs)
        return None

    def put(self, group: str, pid: int) -> None:
        path = self.groups.get(group)
        if path is None:
            path = self.groups[group] = os.path.join(self.parent, group)
            os.mkdir(path)
        with open(os.path.join(path, self.procs_file), "w") as f:
            f.write(str(pid))

    def close(self) -> None:
        for path in self.groups.values():
            for pid in _read(os.path.join(path, self.procs_file)).split():
                try:
                    with open(os.path.join(self.root, self.procs_file), "w") as f:
                        f.write(pid)
                except OSError:
                    pass  # gone meanwhile
            try:
                os.rmdir(path)
            except OSError:
                pass
        try:
            os.rmdir(self.parent)
        except OSError:
            pass


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
