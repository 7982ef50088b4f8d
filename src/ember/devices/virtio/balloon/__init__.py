"""virtio-balloon (virtio 1.2 §5.5): guest memory given back to the host."""
