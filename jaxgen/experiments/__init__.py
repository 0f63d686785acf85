"""What the command line runs: data, models, training with online bound tracking."""
