"""The CPU kernels compile as two translation units (nn/csrc/unit_*.cpp) that include the kernel
files: a kernel file no unit includes would silently never be built, one included twice would
register its operators twice."""

import re

from exaflop.nn.kernels import HEADERS, SOURCES, UNITS


def test_every_kernel_file_is_in_exactly_one_unit():
    included = [name for unit in UNITS for name in re.findall(r'#include "(\w+\.cpp)"', unit.read_text())]
    assert sorted(included) == sorted(p.name for p in SOURCES), included
    assert len(UNITS) == 2 and all(p.name.startswith("unit_") for p in UNITS)


def test_units_include_the_headers_before_the_kernel_files():
    """Each kernel file is included inside a namespace; its own #includes must be no-ops there,
    so every header it uses must already be included by the unit at file scope."""
    for unit in UNITS:
        text = unit.read_text()
        first_kernel = text.index('#include "', text.index("namespace exaflop_"))
        before = set(re.findall(r"#include ([<\"][^>\"]+[>\"])", text[:first_kernel]))
        for name in re.findall(r'#include "(\w+\.cpp)"', text):
            body = (unit.parent / name).read_text()
            needed = set(re.findall(r"#include ([<\"][^>\"]+[>\"])", body))
            assert needed <= before, f"{unit.name} must include {sorted(needed - before)} before {name}"
    assert all("#pragma once" in h.read_text() for h in HEADERS)
