"""Architecture-specific guest set-up."""
