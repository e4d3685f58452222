"""Rendering plans into source files through the Jinja templates of each target."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from ..description.layers import Layer, check_source_name
from ..errors import NormgenError
from ..lowering import lower
from ..lowering.int8 import Int8Plan, lower_int8
from ..lowering.plan import Plan
from .c.sweep import sweep_of
from .cuda.fused import fused_cuda
from .cuda.plan import derive
from .cuda.sync import lower_sync_cuda
from .cuda.train import lower_train_cuda
from .mex import mex_plan

#: What each target is: ``mex`` is the C target's files plus a MEX gateway over them.
TARGETS = ("c", "cuda", "mex")
#: The targets normgen.build compiles and loads (``normgen check``): the mex target's C is the C target's.
BUILT = ("c", "cuda")
#: The targets that generate only a layer's ``functions`` where it names some.
FILTERED = ("c", "mex")
#: The target whose plan (element types) each target renders from.
LOWERED_AS = {"c": "c", "cuda": "cuda", "mex": "c"}


def template_dir() -> Path:
    """Installed: ``normgen/templates``; in a source checkout: ``templates/`` beside the package."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "common" / "macros.j2").is_file():
            return candidate
    raise NormgenError(f"normgen's templates are missing (looked in {here / 'templates'} and {here.parent / 'templates'})")


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.globals["ind"] = lambda n: "    " * n
    return env


#: The files each target writes, as (file name pattern, template).
FILES = {
    "c": (("{name}.h", "c/layer.h.j2"), ("{name}.c", "c/layer.c.j2")),
    "cuda": (("{name}.cuh", "cuda/layer.cuh.j2"), ("{name}.cu", "cuda/layer.cu.j2")),
}
#: An int8 layer's files (C target only): its own templates (lowering/int8.py).
INT8_FILES = (("{name}.h", "c/int8.h.j2"), ("{name}.c", "{template}"))
FILES["mex"] = FILES["c"] + (("{name}_mex.c", "mex/gateway.c.j2"), ("{name}_mex.m", "mex/help.m.j2"))


#: What each target adds to the plan before its templates see it (its plan extension), by name.
EXTENSIONS = {
    "c": lambda plan: {"sweep_plan": sweep_of(plan)},
    "cuda": lambda plan: _cuda(derive(plan), lower_train_cuda(plan), lower_sync_cuda(plan)),
}
EXTENSIONS["mex"] = lambda plan: {**EXTENSIONS["c"](plan), "mex": mex_plan(plan)}


def _cuda(cp, tc, sc) -> dict:
    return {"cp": cp, "tc": tc, "sc": sc, "fc": fused_cuda(cp.plan, cp, tc)}


def render(plan: Plan | Int8Plan, target: str) -> dict[str, str]:
    """A plan → {file name: text}."""
    env = environment()
    if isinstance(plan, Int8Plan):
        return {pattern.format(name=plan.name): env.get_template(tpl.format(template=plan.template)).render(plan=plan)
                for pattern, tpl in INT8_FILES}
    context = {"plan": plan, **EXTENSIONS[target](plan)}
    return {pattern.format(name=plan.name): env.get_template(tpl).render(context) for pattern, tpl in FILES[target]}


def emit(layer: Layer, target: str = "c") -> dict[str, str]:
    """Generate the source files of one layer: {file name: text}, byte-identical for the same layer."""
    if target not in TARGETS:
        raise NormgenError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    check_source_name(layer.name)
    if layer.functions is not None and target not in FILTERED:
        raise NormgenError(f"layer {layer.name!r}: functions (only some functions generated) is for the"
                           f" {' and '.join(FILTERED)} targets, not {target}")
    if layer.dtype == "int8":
        if target != "c":
            raise NormgenError(f"layer {layer.name!r}: dtype 'int8' is generated for the c target only, not {target}")
        return render(lower_int8(layer), target)
    return render(lower(layer, LOWERED_AS[target]), target)
