"""Model files to networks: :mod:`engine.models.loader` turns a weights file into a ready ``nn.Module``
(:mod:`engine.models.networks` builds the catalog's RRDBNet and Compact, spandrel the rest);
:mod:`engine.models.user_catalog` holds the models a user imported.

Nothing is imported here; import the submodules directly.
"""
