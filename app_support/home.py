"""The app's page list (one place: the navigation, the sidebar and the home page read it) and the facts the
home page shows: backend, library versions."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PageInfo:
    """One page of the app: the navigation (app.py's `st.navigation`), the sidebar and the home page's list all
    read `PAGES`, so a page is named, ordered and described in this one place."""

    path: str  # the script, relative to the repo root
    label: str
    icon: str
    summary: str
    url_path: str  # its address: /Config_Builder ...

    @property
    def exists(self) -> bool:
        return (ROOT / self.path).is_file()


#: The home page's name in the sidebar and the browser tab.
HOME_LABEL, HOME_ICON = "Home", ":material/home:"


def method_names() -> str:
    """Every registered method, as the builder lists them (the registry, so a new method is named here too)."""
    from quantlib.registry import registered_methods

    return ", ".join(registered_methods())


PAGES = (
    PageInfo("app_pages/1_Config_Builder.py", "Config Builder", ":material/construction:",
             f"Build and validate a quantization config ({method_names()}); export JSON for transformers, "
             "copy a Python snippet, share it as a link.", "Config_Builder"),
    PageInfo("app_pages/2_Quantize_and_Inspect.py", "Quantize and Inspect", ":material/biotech:",
             "Quantize the model with one config and look inside: per-layer errors, histograms, code usage.",
             "Quantize_and_Inspect"),
    PageInfo("app_pages/3_Compare_Schemes.py", "Compare Schemes", ":material/compare_arrows:",
             "Run several configs side by side: memory, perplexity, KL divergence, speed.", "Compare_Schemes"),
    PageInfo("app_pages/4_Memory_Planner.py", "Memory Planner", ":material/straighten:",
             "Predict a model's footprint under each config from config.json alone, against your RAM / GPU.",
             "Memory_Planner"),
    PageInfo("app_pages/5_Recommend.py", "Recommend", ":material/tune:",
             "The best per-layer mix under a memory budget: measure each layer's sensitivity, get the mix as the "
             "method's own config, and verify it against uniform settings.", "Recommend"),
)


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
