"""The stages of the pipeline; each imports the core, the runtime and the result types, never another stage."""
