"""Model files to networks: :mod:`engine.models.loader` turns a weights file into a ready ``nn.Module``.

Nothing is imported here; import the submodules directly.
"""
