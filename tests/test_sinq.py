"""SINQ (issue 28): the sinq package's own layer on a CPU, against transformers' own SINQ model.

The oracle is transformers itself: `from_pretrained(..., quantization_config=SinqConfig(...))` on the CPU builds
and quantizes its SINQLinear layers. It runs in a subprocess, because transformers' SINQ path monkey-patches
`PreTrainedModel` for the rest of the process (`sinq.hf_io.patch_hf_pretrained_io`). Its layers' dequantized
weights and its logits must equal quantlib's simulation bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantlib import parse_config
from quantlib.errors import ConfigError, QuantlibError
from quantlib.methods.sinq import SinqQuantizer, quantize_sinq
from quantlib.registry import get_quantizer

SINQ4 = {"quant_method": "sinq", "nbits": 4, "group_size": 64, "modules_to_not_convert": ["lm_head"]}

ORACLE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, SinqConfig
folder, config, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SinqConfig.from_dict(config),
                                             dtype=torch.float32, device_map="cpu")
weights = {name: m.dequantize() for name, m in model.named_modules() if type(m).__name__ == "SINQLinear"}
ids = torch.arange(3, 40).reshape(1, -1)
with torch.no_grad():
    logits = model(ids).logits
torch.save({"weights": weights, "logits": logits}, out)
"""


@pytest.fixture(scope="module")
def transformers_sinq(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sinq") / "oracle.pt"
    proc = subprocess.run([sys.executable, "-c", ORACLE, str(tiny_llama_dir), json.dumps(SINQ4), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_the_simulation_equals_transformers_own_sinq_model(tiny_llama_dir, transformers_sinq) -> None:
    from quantlib.models import load_model

    base = load_model(str(tiny_llama_dir))
    quantizer = get_quantizer(SINQ4, device="cpu")
    qm = quantizer.quantize_model(base=base)
    assert set(qm.packed_layers) == set(transformers_sinq["weights"])  # the same layers (the head skipped)
    assert len(qm.packed_layers) == 14
    for name, packed in qm.packed_layers.items():
        assert torch.equal(packed.dequantize(), transformers_sinq["weights"][name]), name
    with torch.no_grad():
        logits = qm.model(torch.arange(3, 40).reshape(1, -1)).logits
    assert torch.equal(logits, transformers_sinq["logits"])


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("shape,group_size", [((96, 192), 64), ((64, 256), 32), ((128, 256), 128)])
def test_planned_bytes_equal_the_layer_tensors(nbits, shape, group_size) -> None:
    config = parse_config({**SINQ4, "nbits": nbits, "group_size": group_size})
    torch.manual_seed(nbits)
    packed = quantize_sinq(torch.randn(*shape), config)
    assert SinqQuantizer.storage_bytes(config, *shape) == {**packed.storage_by_component(), "code_tables": 0.0}
    codes = packed.codes_unpacked()
    assert codes.numel() == shape[0] * shape[1] and 0 <= int(codes.min()) and int(codes.max()) < 2 ** nbits


def test_the_output_head_is_quantized_unless_named_as_transformers_does(tiny_llama_dir) -> None:
    """transformers' SINQ has no default skips: with modules_to_not_convert null it quantizes lm_head, and the tiny
    model's head (78 x 64: 78 groups) fails sinq's 8-bit scale quantization there (the subprocess below shows it);
    quantlib refuses it before any work, naming the layer."""
    from quantlib.errors import QuantlibError as Refused
    from quantlib.models import load_model
    from quantlib.shapes import describe_model

    base = load_model(str(tiny_llama_dir))
    config = parse_config({"quant_method": "sinq", "nbits": 4, "group_size": 64})
    names = [name for name, _, _ in SinqQuantizer.quantized_matrices(config, describe_model(base.model))]
    assert "lm_head" in names and len(names) == 15
    with pytest.raises(Refused, match="lm_head: 78 groups of 64 are not a multiple of 32"):
        get_quantizer(config, device="cpu").quantize_model(base=base)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}  # the loading report names the tensor (other tests
    # of the same session may have set a quieter verbosity)
    proc = subprocess.run([sys.executable, "-c", ORACLE, str(tiny_llama_dir), json.dumps(config.to_dict()), "-"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "lm_head.weight" in proc.stderr and "[32, -1]" in proc.stderr


def test_dequantized_weights_are_sinq_layer_forward(tiny_llama_dir) -> None:
    """quantlib's layer output (x @ W.T on the dequantized weight) is the SINQLinear's own PyTorch forward."""
    torch.manual_seed(0)
    w, x = torch.randn(128, 256), torch.randn(5, 256)
    packed = quantize_sinq(w, parse_config(SINQ4))
    quantizer = get_quantizer(SINQ4, device="cpu")
    assert torch.equal(quantizer.layer_output(x, packed), packed.layer(x))


def test_shapes_sinq_cannot_take_are_refused_with_the_reason() -> None:
    config = parse_config(SINQ4)
    assert "not a whole number of groups of 64" in SinqQuantizer.shape_problem(config, "m.q", (96, 200))
    assert "not a multiple of 32" in SinqQuantizer.shape_problem(config, "m.k", (8, 192))
    assert SinqQuantizer.shape_problem(config, "m.v", (32, 64)) is None
    with pytest.raises(ValueError, match="not a multiple of 32"):
        quantize_sinq(torch.randn(8, 192), config)


@pytest.mark.parametrize("changes,reason", [({"method": "asinq"}, "A-SINQ is calibrated"),
                                            ({"tiling_mode": "2D"}, "tiling_mode 2D")])
def test_settings_quantlib_does_not_model_are_refused(changes, reason) -> None:
    with pytest.raises(QuantlibError, match=reason):
        get_quantizer({**SINQ4, **changes}, device="cpu")


def test_a_saved_checkpoint_config_parses_and_unknown_extras_are_refused() -> None:
    from transformers import SinqConfig

    saved = SinqConfig.from_dict(SINQ4).to_dict()  # what save_pretrained writes: quant_method in _extra_kwargs
    assert saved["_extra_kwargs"] == {"quant_method": "sinq"}
    assert parse_config(json.loads(json.dumps(saved, default=str))).to_dict() == parse_config(SINQ4).to_dict()
    with pytest.raises(ConfigError, match="_extra_kwargs"):
        parse_config({**SINQ4, "_extra_kwargs": {"awq_scales": True}})


def test_sinq_patches_nothing_in_this_process() -> None:
    """sinq's wheel ships a sitecustomize.py that patches transformers at every start; install.sh removes it, and
    quantizing through quantlib patches nothing either."""
    import transformers

    spec = importlib.util.find_spec("sitecustomize")
    assert spec is None or "sinq" not in Path(spec.origin).read_text(errors="replace")
    quantize_sinq(torch.randn(32, 64), parse_config(SINQ4))
    assert transformers.PreTrainedModel.from_pretrained.__module__.startswith("transformers.")
    assert transformers.PreTrainedModel.save_pretrained.__module__.startswith("transformers.")


def test_a_tied_output_head_left_to_sinq_is_refused_as_transformers_fails_on_it(tiny_tokenizer, tmp_path) -> None:
    """A head tied to the embedding and not skipped: transformers' SINQ builds a SINQLinear for it that never gets a
    weight, and its forward fails (the subprocess shows it). quantlib refuses it in the preflight and before
    quantizing, naming the fix; skipping lm_head makes the same model quantize."""
    from transformers import LlamaForCausalLM

    from quantlib.models import load_model
    from quantlib.registry import preflight
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(128, tie_word_embeddings=True)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model_config = json.loads((tmp_path / "config.json").read_text())
    bare = {"quant_method": "sinq", "nbits": 4, "group_size": 64}
    problems = preflight(bare, model_config)
    assert len(problems) == 1 and "lm_head is tied to the token embedding" in problems[0]
    assert "modules_to_not_convert" in problems[0]
    base = load_model(str(tmp_path))
    with pytest.raises(QuantlibError, match="lm_head is tied"):
        get_quantizer(bare, device="cpu").quantize_model(base=base)
    assert preflight(SINQ4, model_config) == []
    get_quantizer(SINQ4, device="cpu").quantize_model(base=base)
    script = (ORACLE.replace("torch.save(", "print('forward ok'); torch.save(")
              .replace("weights = {name: m.dequantize()", "weights = {name: m.dequantize() if m.ready else None"))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(bare), str(tmp_path / "o.pt")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "model was not quantized" in proc.stderr, proc.stderr[-2000:]
