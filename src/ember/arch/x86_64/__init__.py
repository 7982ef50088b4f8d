"""x86_64 guest set-up: loaders, boot_params, page tables, CPUID, MP table."""
