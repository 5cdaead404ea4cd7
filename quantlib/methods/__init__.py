"""Every quantization method, one module (or package) each.

A method module holds its config class, its quantizer and its tensor format and math, and marks its quantizers
with `@register("key")` (`base`). `quantlib.registry` discovers the modules: adding a method is adding a
module (and a preset line); nothing outside this package names one. Helper modules start with an underscore;
`DISPLAY_ORDER` (a module-level number, default 100) orders the registry, and so the builder's method list and
the CLI. Importing this package imports no method: the registry does.
"""
