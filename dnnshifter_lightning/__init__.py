"""DNNShifter for PyTorch Lightning and TorchServe."""
__version__ = "0.1.0"
