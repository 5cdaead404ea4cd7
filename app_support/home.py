"""Facts the home page shows: backend, library versions, the pages that exist."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PageInfo:
    path: str  # relative to the repo root, as st.page_link wants it
    label: str
    icon: str
    summary: str

    @property
    def exists(self) -> bool:
        return (ROOT / self.path).is_file()


def method_names() -> str:
    """Every registered method, as the builder lists them (the registry, so a new method is named here too)."""
    from quantlib.registry import registered_methods

    return ", ".join(registered_methods())


PAGES = (
    PageInfo("pages/1_Config_Builder.py", "Config Builder", ":material/construction:",
             f"Build and validate a quantization config ({method_names()}); export JSON for transformers, "
             "copy a Python snippet, share it as a link."),
    PageInfo("pages/2_Quantize_and_Inspect.py", "Quantize and Inspect", ":material/biotech:",
             "Quantize the model with one config and look inside: per-layer errors, histograms, code usage."),
    PageInfo("pages/3_Compare_Schemes.py", "Compare Schemes", ":material/compare_arrows:",
             "Run several configs side by side: memory, perplexity, KL divergence, speed."),
    PageInfo("pages/4_Memory_Planner.py", "Memory Planner", ":material/straighten:",
             "Predict a model's footprint under each config from config.json alone, against your RAM / GPU."),
    PageInfo("pages/5_Recommend.py", "Recommend", ":material/tune:",
             "The best per-layer mix under a memory budget: measure each layer's sensitivity, get the mix as the "
             "method's own config, and verify it against uniform settings."),
)

def discover_pages() -> list[PageInfo]:
    """Every script in pages/ (known ones with their titles, new ones named after the file), in order.

    The home page links to what exists, so pages added later get a link without touching app.py."""
    known = {page.path: page for page in PAGES}
    found = []
    for path in sorted((ROOT / "pages").glob("*.py")):
        rel = f"pages/{path.name}"
        if rel in known:
            found.append(known[rel])
            continue
        stem = path.stem.split("_", 1)[1] if path.stem.split("_", 1)[0].isdigit() and "_" in path.stem else path.stem
        found.append(PageInfo(rel, stem.replace("_", " "), ":material/article:", ""))
    return found


def versioned() -> tuple[str, ...]:
    """torch, transformers, streamlit and the library of every registered method."""
    from quantlib.registry import method_libraries

    return tuple(dict.fromkeys(("torch", "transformers", "streamlit", *method_libraries())))


def versions(packages: tuple[str, ...] | None = None) -> dict[str, str]:
    packages = versioned() if packages is None else packages
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def backend() -> tuple[str, str]:
    """(device kind, human name): ("cuda", "NVIDIA H100 …") or ("cpu", "CPU (2 cores)")."""
    from quantlib.runtime import cuda_available, device_name

    kind = "cuda" if cuda_available() else "cpu"
    return kind, device_name(kind)
