"""Training of the small default model (issue 7): data encoding, tokenizer training, the training loop,
held-out perplexity and sample generation. Entry point: `python -m ringlinear train <subcommand>`."""
