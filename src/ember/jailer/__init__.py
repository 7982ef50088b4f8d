"""Confining a sandbox VMM on the host: cgroup quotas (made by the SDK), then namespaces,
chroot and a uid of its own (``jail``), and a seccomp filter per thread role (``seccomp``)."""
