"""tfpar's strategies: one class per way of spreading a model over devices."""

from tfpar.strategies.data_parallel import DataParallel, MultiWorker, OneDevice

__all__ = ["OneDevice", "DataParallel", "MultiWorker"]

from tfpar.strategies.tensor_parallel import TensorParallel  # noqa: E402

__all__.append("TensorParallel")
