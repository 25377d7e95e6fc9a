"""The TorchServe handler, the archiver and the model registry."""
