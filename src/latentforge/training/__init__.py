"""The training loop in plain PyTorch: objectives, ``fit``, EMA, checkpoints and the
runtimes it runs in (:class:`~latentforge.training.runtime.LocalRuntime` here; the Ray Train
runtime lives in :mod:`latentforge.platform.train`)."""
