"""Arguments, the trainer loop, optimizer set-up, checkpoints and metrics."""
