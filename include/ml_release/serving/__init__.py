"""TorchServe: a typed client and the local process that the embedded stack runs."""
