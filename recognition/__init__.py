"""Partial FC training on MXNet + Horovod: the operator, data, configuration and the training loop."""
