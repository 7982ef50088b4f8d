"""The KVM ioctl layer: ABI structs and thin System/Vm/Vcpu wrappers."""
