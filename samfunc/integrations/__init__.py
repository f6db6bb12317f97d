"""What samfunc knows about training frameworks (imported only when used; none is required).

* ``lightning``: how ``samfunc.SAM`` recognizes PyTorch Lightning's wrapper
  around it, and ``LightningSAMMixin``, which makes a ``LightningModule`` log and
  update its metrics in the first pass only; without importing Lightning.
"""
