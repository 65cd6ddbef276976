"""Exported students run in llama.cpp itself (llama-cpp-python, the `slimnas[llamacpp]` extra), with the logits of
PyTorch: a uniform student as `llama`, a per-layer one as `deci`. Skipped without the extra, failed under CI."""

import os

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_tokenizer
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

import slimnas.models  # noqa: F401  (the documented import: registers the per-layer students)
from slimnas.compress.arch import LayerShape, PerLayerArchitecture, architecture_of
from slimnas.compress.export import export_gguf
from slimnas.models import per_layer_config

VOCAB = 300
# Teacher layers: 4 heads in 2 KV groups, 96 neurons. Layer 0 whole, layer 1 narrower with 1 KV group, layer 2
# attention-free, layer 3 FFN-free (written with one zero neuron), layer 4 dropped; hidden 64 -> 48.
MIXED = PerLayerArchitecture(
    48,
    (LayerShape(96, 4, 2), LayerShape(40, 2, 1), LayerShape(64, 0, 0), LayerShape(0, 2, 2), LayerShape(0, 0, 0)),
)
UNIFORM = PerLayerArchitecture(48, (LayerShape(64, 2, 1),) * 3 + (LayerShape(0, 0, 0),) * 2)
TOLERANCE = 1e-2  # max |logit difference| in f32 (the bound); measured: see test output


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        reason = "llama-cpp-python missing (pip install -e .[llamacpp]; make test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return llama_cpp


def save_student(path, target: PerLayerArchitecture, model_type: str = "llama"):
    """A random student of this shape; norms and every weight random, so a misplaced tensor shows in the logits."""
    teacher = tiny_config(model_type, num_hidden_layers=len(target.layers), vocab_size=VOCAB)
    torch.manual_seed(0)
    uniform = target.uniform()
    config = per_layer_config(teacher, target)
    if uniform is not None:  # a uniform student is saved as its plain family
        config = tiny_config(model_type, vocab_size=VOCAB, **uniform.as_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(
                1 + 0.2 * torch.randn_like(parameter) if "norm" in name else 0.3 * torch.randn_like(parameter)
            )
    model.save_pretrained(path)
    tiny_tokenizer(VOCAB).save_pretrained(path)
    return model.eval()


def llama_cpp_logits(gguf_file, tokens: list[int]) -> np.ndarray:
    f32 = llama_cpp().GGML_TYPE_F32  # the KV cache in f32 too (llama.cpp's default is f16)
    llm = llama_cpp().Llama(model_path=str(gguf_file), n_ctx=len(tokens) + 8, n_batch=len(tokens), logits_all=True,
                            n_threads=2, type_k=f32, type_v=f32, verbose=False)  # fmt: skip
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def assert_same_logits_in_llama_cpp(gguf_file, model, tokens: list[int], what: str) -> None:
    """llama.cpp's logits at every position within TOLERANCE of PyTorch's (f32), with the same argmax."""
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].float().numpy()
    got = llama_cpp_logits(gguf_file, tokens)
    difference = float(np.abs(got - expected).max())
    print(f"{what}: max |logit difference| {difference:.2e} over {len(tokens)} positions x {got.shape[1]} tokens")
    assert difference <= TOLERANCE, f"{what}: max |logit difference| {difference:.3g} > {TOLERANCE}"
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("target, arch", [(MIXED, "deci"), (UNIFORM, "llama")], ids=["per-layer", "uniform"])
def test_exported_student_gives_pytorchs_logits_in_llama_cpp(tmp_path, target, arch):
    model = save_student(tmp_path / "student", target)
    assert architecture_of(model.config) == (target.uniform() or PerLayerArchitecture(48, MIXED.layers[:4]))
    gguf_file = export_gguf(tmp_path / "student", tmp_path / "student.gguf", "f32")
    assert GGUFReader(gguf_file).fields["general.architecture"].contents() == arch
    tokens = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_same_logits_in_llama_cpp(gguf_file, model, tokens, arch)
