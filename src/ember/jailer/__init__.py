"""Confining a sandbox VMM on the host: cgroup quotas (later namespaces and seccomp)."""
