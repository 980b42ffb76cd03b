"""The result types of the stages, each owning its file: the dataclass, its ``save`` and its ``load``.

These modules sit below the stages: a stage builds and saves its result, and the stages after it (the model
card among them) load it back, so no stage parses another stage's file or imports another stage. Every file
carries a ``schema_version``; ``load`` still reads the files of the release before it, which had none, and
refuses a newer version than it knows with ``ResultFileVersionError`` (see ``schema``).
"""
