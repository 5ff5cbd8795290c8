"""Tools a learner meets after the model and the training loop: evaluation, pictures, curves, reports, GPT-2."""
