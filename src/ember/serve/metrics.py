"""Prometheus metrics of one daemon (its own registry, so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ember.serve.manager import Manager

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sandboxes = Gauge("ember_sandboxes", "Sandboxes by state", ["state"], registry=r)
        self.events = Counter(
            "ember_sandbox_events", "Sandbox life-cycle events (created, deleted, reaped, "
            "adopted, crashed)", ["event"], registry=r,
        )  # fmt: skip
        self.create_seconds = Histogram(
            "ember_create_seconds", "Time to create (restore) a sandbox",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.exec_seconds = Histogram(
            "ember_exec_seconds", "Time of exec and run_code requests", ["op"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.file_bytes = Counter(
            "ember_file_bytes", "Bytes moved through files", ["direction"], registry=r
        )
        self.channel_bytes = Counter(
            "ember_channel_bytes", "Bytes of channel messages relayed to clients", registry=r
        )
        self.memory_bytes = Gauge(
            "ember_sandbox_memory_bytes", "Memory charged to a sandbox's VMM now (cgroup)",
            ["id"], registry=r,
        )  # fmt: skip
        self.cpu_seconds = Gauge(
            "ember_sandbox_cpu_seconds", "CPU time of a sandbox's VMM (cgroup)", ["id"],
            registry=r,
        )  # fmt: skip

    def event(self, event: str, _sandbox_id: str) -> None:
        self.events.labels(event).inc()

    def render(self, manager: Manager) -> bytes:
        for state, n in manager.counts().items():
            self.sandboxes.labels(state).set(n)
        self.cpu_seconds.clear()
        self.memory_bytes.clear()
        for entry in manager.find(state="running"):
            group = entry.sandbox.cgroup if entry.sandbox is not None else None
            if group is not None:
                try:
                    self.cpu_seconds.labels(entry.record.id).set(group.cpu_usage_seconds())
                except OSError:
                    pass
                memory = group.memory_current_bytes()
                if memory is not None:
                    self.memory_bytes.labels(entry.record.id).set(memory)
        return generate_latest(self.registry)
