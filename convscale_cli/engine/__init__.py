"""The training engine: pre-training and fine-tuning loops, optimiser, checkpoints, compute ledger."""
