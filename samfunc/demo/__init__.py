"""``python -m samfunc.demo``: SGD vs SAM vs ASAM under label noise, on real data, offline.

Needs the ``demo`` extra: ``pip install "samfunc[demo]"`` (scikit-learn, matplotlib, tqdm).
"""
