"""The C target: the sweep (how the C core walks a statistic block), the cffi build and the
test bench."""
