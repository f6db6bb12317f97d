"""What samfunc knows about training frameworks (imported only when used; none is required).

* ``lightning``: how ``samfunc.SAM`` recognizes PyTorch Lightning's wrapper
  around it, without importing Lightning.
"""
