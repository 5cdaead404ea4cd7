"""Layers quantized on worker threads (`Quantizer.quantize_ahead`, `quantlib.methods.base.ahead`) give what one layer
at a time gives, and `MatrixRef.set` writes the same bytes on its numpy path as torch's `copy_`."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

from quantlib.errors import Cancelled
from quantlib.methods.base.ahead import in_worker, quantized_in_turn
from quantlib.methods.base.records import MatrixRef
from quantlib.registry import get_quantizer
from tests.conftest import tiny_llama_config


class _Ref:
    def __init__(self, name: str, param: object = None, index: int | None = None):
        self.name, self.param, self.index = name, param if param is not None else object(), index
        self.reads = 0

    def read(self) -> torch.Tensor:
        self.reads += 1
        return torch.tensor([float(len(self.name))])


def test_results_come_in_order_or_as_they_finish_and_on_worker_threads() -> None:
    refs = [_Ref(f"layer{i}") for i in range(7)]

    def work(ref, w):  # the first layer is the slowest: in order, it still comes first
        time.sleep(0.2 if ref.name == "layer0" else 0.0)
        return ref.name, in_worker(), threading.current_thread() is threading.main_thread()

    ordered = list(quantized_in_turn(refs, work, 2))
    assert [name for name, _, _ in ordered] == [r.name for r in refs]
    assert all(worker and not main for _, worker, main in ordered)
    finished = [name for name, _, _ in quantized_in_turn(refs, work, 2, ordered=False)]
    assert sorted(finished) == sorted(r.name for r in refs) and finished[0] != "layer0"
    inline = list(quantized_in_turn(refs, work, 0))
    assert [name for name, _, _ in inline] == [r.name for r in refs] and all(main for _, _, main in inline)
    assert not in_worker() and all(r.reads == 3 for r in refs)


def test_a_worker_runs_under_the_caller_s_grad_mode_and_torch_function_modes() -> None:
    """Both are the calling thread's own: without them a worker would record grads, and the host-transfer audit
    (tests/test_device_work.py) would not see a worker's reads."""
    from quantlib.transfers import HostTransfers

    refs = [_Ref(f"layer{i}") for i in range(4)]
    with torch.no_grad(), HostTransfers() as audit:
        grads = list(quantized_in_turn(refs, lambda ref, w: (torch.randn(64, 64).cpu(), torch.is_grad_enabled())[1],
                                       2))
    assert grads == [False] * 4 and len(audit.transfers) == 4


def test_refs_naming_one_matrix_twice_run_one_at_a_time() -> None:
    shared = object()
    refs = [_Ref("a", shared, 0), _Ref("b", shared, 0), _Ref("c", shared, 1)]
    assert [on_worker for on_worker in quantized_in_turn(refs, lambda ref, w: in_worker(), 2)] == [False] * 3
    distinct = [_Ref("a", shared, 0), _Ref("c", shared, 1)]  # two experts of one fused tensor are two matrices
    assert all(quantized_in_turn(distinct, lambda ref, w: in_worker(), 2))


def test_a_cancel_names_the_first_layer_not_started_and_an_error_reaches_the_caller() -> None:
    refs = [_Ref(f"layer{i}") for i in range(10)]
    asked = []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) > 6

    with pytest.raises(Cancelled, match="layer errors cancelled at layer layer6"):
        list(quantized_in_turn(refs, lambda ref, w: ref.name, 2, cancel, "layer errors"))
    assert refs[6].reads == 0 and refs[5].reads == 1

    def fail(ref, w):
        if ref.name == "layer3":
            raise ValueError("layer3 has no blocks")
        return ref.name

    with pytest.raises(ValueError, match="layer3 has no blocks"):
        list(quantized_in_turn(refs, fail, 2, ordered=False))


def test_slices_of_a_layer_on_a_worker_run_there(monkeypatch) -> None:
    """A worker already shares the cores with the other: `by_rows` runs its slices in the worker itself (a pool of
    two inside a pool of two would run four at once), and the bytes are those of one call."""
    import quantlib.methods._gguf_tensor as gguf_tensor

    w = torch.randn(2048, 256, generator=torch.Generator().manual_seed(3))
    expected = gguf_tensor.quantize_gguf(w, qtype="Q4_K").data
    monkeypatch.setattr(gguf_tensor, "_pool", lambda: pytest.fail("a worker handed its slices to the pool"))
    got = list(quantized_in_turn([_Ref("w")], lambda ref, _: gguf_tensor.quantize_gguf(w, qtype="Q4_K").data, 1))
    assert np.array_equal(got[0], expected)


@pytest.mark.parametrize("quant_type", ["Q4_K_M", "Q6_K"])
def test_a_gguf_model_quantized_two_layers_at_a_time_equals_one_at_a_time(monkeypatch, quant_type) -> None:
    """The weights written back, the packed tensors kept (in the layers' order) and the memory are the same."""
    from transformers import LlamaForCausalLM

    from quantlib.methods.gguf import GGUFQuantizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2)).eval()
    runs = {}
    for ahead in (0, 2):
        monkeypatch.setattr(GGUFQuantizer, "quantize_ahead", ahead)
        quantizer = get_quantizer({"quant_method": "gguf", "quant_type": quant_type}, device="cpu")
        copied, kept = copy.deepcopy(model), {}
        memory = quantizer.simulate(copied, keep=kept)
        runs[ahead] = (copied.state_dict(), kept, memory.total_bytes)
    (weights0, kept0, bytes0), (weights2, kept2, bytes2) = runs[0], runs[2]
    layers = [ref.name for ref in quantizer.quantizable_layers(model)]
    assert list(kept0) == list(kept2) == layers and bytes0 == bytes2
    assert all(np.array_equal(kept0[n].data, kept2[n].data) for n in layers)
    assert all(torch.equal(weights0[k], weights2[k]) for k in weights0)
    assert not all(torch.equal(weights0[k], model.state_dict()[k]) for k in weights0)  # something was quantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_set_writes_what_copy_writes_into_a_transposed_or_expert_matrix(dtype, monkeypatch) -> None:
    """In slices of rows (here of 8 elements, so every matrix takes several) or in one copy: the same bytes."""
    import quantlib.methods.base.records as records
    from quantlib.shapes import WeightShape

    monkeypatch.setattr(records, "SERIAL_COPY", 8)
    g = torch.Generator().manual_seed(5)
    for index, transposed, shape in ((None, True, (6, 4)), (1, False, (3, 4, 6)), (None, False, (4, 6))):
        param = torch.nn.Parameter(torch.randn(*shape, generator=g).to(dtype))
        original, expected = param.detach().clone(), param.detach().clone()
        view = expected if index is None else expected[index]
        value = torch.randn(4, 6, generator=g)
        (view.t() if transposed else view).copy_(value.to(dtype))
        ref = MatrixRef("m", param, WeightShape("m", "m", "Linear", "linear", "mlp", shape, transposed=transposed), index)
        for in_this_thread in (True, False):
            param.data.copy_(original)
            ref.set(value, in_this_thread=in_this_thread)
            assert torch.equal(param.detach(), expected) and param.dtype == dtype
