"""The mex target: the C target's files plus a MEX gateway (NAME_mex.c) and its help (NAME_mex.m).

:mod:`.roles` says what each C argument is to MATLAB; :mod:`.gateway` turns a C plan's functions
into MATLAB calls through it.
"""

from .gateway import MexPlan, mex_plan

__all__ = ["MexPlan", "mex_plan"]
