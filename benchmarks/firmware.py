"""Firmware figures for README "Firmware": each kind's predict (float32, batch at run time) built
with arm-none-eabi-gcc -Os for Cortex-M0, M4F and M7, with statistics in double and in float:
.text and .rodata bytes of its object, its stack (-fstack-usage), and its instructions per element
under QEMU's -icount (virtual time advances by one nanosecond per instruction; SysTick, at the
board's 25 MHz, counts it). QEMU is not cycle-accurate: the figure compares code, not cores.

    python3 benchmarks/firmware.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from test_firmware import CPUS, GCC, HERE, QEMU, cross_compile, layers  # noqa: E402

BATCH = 3
REPEAT = 20
#: SysTick: its registers, and nanoseconds of virtual time (instructions) per tick at 25 MHz.
NS_PER_TICK = 40

MAIN = """#include <stdint.h>
#include <stdio.h>
#include "{name}.h"
#define SYST_CSR (*(volatile uint32_t *)0xE000E010)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018)
static float x[{n}], y[{n}];
int main(void)
{{
    for (int i = 0; i < {n}; ++i) {{
        x[i] = (float)((i * 37) % 101) / 8.0f - 6.0f;
    }}
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 5u; /* enabled, the processor clock */
    uint32_t ticks = 0;
    for (int r = 0; r < {repeat}; ++r) {{
        const uint32_t t0 = SYST_CVR;
        {name}_predict(x, y, {batch});
        const uint32_t t1 = SYST_CVR;
        ticks += (t0 - t1) & 0xFFFFFFu;
    }}
    printf("%lu\\n", (unsigned long)ticks);
    return 0;
}}
"""


def sections(obj: Path) -> tuple[int, int]:
    out = subprocess.run(["arm-none-eabi-size", "-A", str(obj)], capture_output=True, text=True, check=True).stdout
    text = rodata = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            text += int(parts[1]) if parts[0].startswith(".text") else 0
            rodata += int(parts[1]) if parts[0].startswith(".rodata") else 0
    return text, rodata


def instructions_per_element(layer, cpu: str, work: Path) -> float:
    n = BATCH * int(np.prod(layer.dims))
    (work / "main.c").write_text(MAIN.format(name=layer.name, n=n, repeat=REPEAT, batch=BATCH))
    flags, board = CPUS[cpu]
    elf = work / f"{layer.name}_{cpu}.elf"
    subprocess.run([GCC, *flags, "-Os", "-std=c99", "-nostartfiles", "--specs=rdimon.specs", "-T", str(HERE / "link.ld"),
                    "-I", str(work), str(HERE / "start.c"), str(work / "main.c"), str(work / f"{layer.name}_{cpu}.o"),
                    "-lm", "-o", str(elf)], check=True)
    run = subprocess.run([QEMU, "-M", board, "-icount", "shift=0", "-nographic", "-monitor", "none", "-serial", "none",
                          "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)],
                         capture_output=True, text=True, timeout=120, check=True)
    return int(run.stdout.split()[0]) * NS_PER_TICK / (REPEAT * n)


def main() -> None:
    print("| kind | statistics | " + " | ".join(f"{c}: .text / .rodata / stack / instr. per element" for c in CPUS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in CPUS) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for base in layers():
            for statistics in ("double", "float"):
                layer = base.replace(name=f"{base.name}_{statistics[0]}", statistics=statistics)
                cells = []
                for cpu in CPUS:
                    stacks = cross_compile(layer, cpu, work)
                    text, rodata = sections(work / f"{layer.name}_{cpu}.o")
                    ipe = instructions_per_element(layer, cpu, work)
                    cells.append(f"{text} / {rodata} / {stacks[f'{layer.name}_predict'][0]} / {ipe:.0f}")
                print(f"| {base.kind} | {statistics} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
