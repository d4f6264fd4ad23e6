"""APT LoRA trainer library."""
