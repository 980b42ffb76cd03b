"""The core: errors, the architecture registry, options, devices and dtypes, file names, atomic writing, calibration text."""
