"""The description stage: what a layer computes (kinds, formats, layers, spec files)."""
