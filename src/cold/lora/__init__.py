"""Row-indexed LoRA: the delta ops side by side (`ops`), which adapter each row uses (`routing`), and the
layer that applies them over one copy of the base weights (`layer`)."""
