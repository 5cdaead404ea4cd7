"""The CUDA path gives the numbers the CPU path promises. Skipped, with the reason, without a GPU."""

from __future__ import annotations

import pytest
import torch

from quantlib.methods.bitsandbytes import quantize_4bit
from quantlib.methods import get_quantizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch")]

NF4_DQ = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": True}


def test_factory_picks_cuda_and_says_why() -> None:
    quantizer = get_quantizer(NF4_DQ, device="auto")
    assert quantizer.backend.device == "cuda" and "CUDA" in quantizer.backend.reason
    assert quantizer.backend.device_name == torch.cuda.get_device_name(0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (100, 33)])
def test_cuda_kernels_give_the_reference_codes(quant_type: str, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float16)
    ref = quantize_4bit(w, quant_type, 64, True, backend="torch")
    cuda = quantize_4bit(w.cuda(), quant_type, 64, True, backend="bitsandbytes")
    assert torch.equal(cuda.packed.cpu().flatten(), ref.packed.flatten())
    assert torch.equal(cuda.dq.codes.cpu(), ref.dq.codes)
    assert torch.allclose(cuda.dequantize().cpu().float(), ref.dequantize().float(), rtol=0, atol=1e-3)


@pytest.mark.slow
def test_cuda_perplexity_agrees_with_cpu_within_one_percent(default_model) -> None:
    from quantlib.corpus import builtin_text
    from quantlib.evaluation import perplexity, tokenize_for_eval
    from quantlib.models import load_model

    ids = tokenize_for_eval(default_model.tokenizer, builtin_text("eval"), 1024)
    cpu = perplexity(default_model.model, ids, window=512)
    gpu_model = load_model("default", device="cuda")
    cuda = perplexity(gpu_model.model, ids, window=512)
    assert cuda.backend.startswith("cuda")
    assert abs(cuda.ppl / cpu.ppl - 1) < 0.01
